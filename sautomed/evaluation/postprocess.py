"""Post-processing every family shares: logits -> label maps on the original in-plane grid, and the optional
largest-connected-component step (plain numpy / scipy)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor


def keep_largest_component(
    labels: np.ndarray, num_classes: int, classes: Iterable[int] | None = None
) -> np.ndarray:
    """Keep the largest 3D connected component (26-connectivity) of each class (of ``classes`` only, when
    given); the rest -> background."""
    out = labels.copy()
    structure = np.ones((3,) * labels.ndim, dtype=bool)
    for c in range(1, num_classes + 1) if classes is None else sorted(set(classes)):
        mask = labels == c
        if not mask.any():
            continue
        comp, n = ndimage.label(mask, structure=structure)
        if n <= 1:
            continue
        sizes = np.bincount(comp.ravel())
        sizes[0] = 0
        out[(comp != 0) & (comp != int(sizes.argmax()))] = 0
    return out


def resolve_classes(spec: Sequence[str], class_names: Sequence[str], what: str) -> tuple[int, ...]:
    """Class names, label values or ``all`` (``predict --keep-largest liver spleen``) -> the label values
    1..C of ``class_names`` (the foreground classes, in label order); an unknown one is a ValueError that
    names it and the classes there are."""
    out: set[int] = set()
    for item in spec:
        if item == "all":
            out.update(range(1, len(class_names) + 1))
        elif item in class_names:
            out.add(list(class_names).index(item) + 1)
        elif item.isdigit() and 1 <= int(item) <= len(class_names):
            out.add(int(item))
        else:
            raise ValueError(
                f"{what}: no class {item!r} here; give names or label values of {', '.join(class_names)}, "
                "or all"
            )
    return tuple(sorted(out))


def logits_to_labels(
    logits: Tensor,
    out_hw: tuple[int, int],
    chunk: int = 16,
    postprocess: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """(Z, C+1, h, w) logits -> (Z, H, W) uint8 argmax labels, resized bilinearly in slice chunks."""
    labels = []
    for start in range(0, logits.shape[0], chunk):
        part = F.interpolate(
            logits[start : start + chunk].float(), size=out_hw, mode="bilinear", align_corners=False
        )
        # max(1).indices == argmax(1) (first maximum on ties), but a reduction over the channel dim of an
        # NCHW tensor via argmax is ~5x slower on the CPU
        labels.append(part.max(1).indices.to(torch.uint8))
    out = torch.cat(labels, 0)
    return postprocess(out) if postprocess is not None else out


def class_probabilities(
    scores: Tensor, out_hw: tuple[int, int], are_probabilities: bool = False, chunk: int = 16
) -> Tensor:
    """(Z, C+1, h, w) scores -> (Z, C+1, H, W) float32 class probabilities, resized bilinearly in slice
    chunks: a softmax of logits, or probabilities scaled to sum to 1 (argmax: ``logits_to_labels``')."""
    parts = []
    for start in range(0, scores.shape[0], chunk):
        part = F.interpolate(
            scores[start : start + chunk].float(), size=out_hw, mode="bilinear", align_corners=False
        )
        if are_probabilities:
            parts.append(part.clamp_min(0) / part.clamp_min(0).sum(1, keepdim=True).clamp_min(1e-8))
        else:
            parts.append(part.softmax(1))
    return torch.cat(parts, 0)
