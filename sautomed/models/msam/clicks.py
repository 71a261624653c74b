"""Simulated clicks: a random voxel of the error region, positive on a miss, negative on a false alarm.

As SAM-Med3D's ``get_next_click3D_torch_2`` (the sampler M-SAM's training script uses), with two changes:
the prediction is thresholded at probability 0.5 (logit 0; the public code compares logits with 0.5), and an
empty error region does not crash (the public sampler indexes an empty list). Then the click is a random
voxel labelled by the ground truth there (positive inside the target, negative outside), so it never
contradicts the reference. Every draw comes from the given ``torch.Generator``: a seed repeats the clicks.

At the first iteration the previous prediction is empty, so the error region is the whole target: the first
click is a random foreground voxel, positive.

``center`` mode (:func:`sample_center_clicks`, like SAM-Med3D's ``get_next_click3D_torch_ritm``): the click
is the error voxel farthest from the error region's border (ties broken at random), so it lies deep inside
the largest mistake: a more informative click than a random (often boundary) voxel.

Coordinates are voxel indices along the crop's (D, H, W) axes, as the prompt encoder expects.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

ClickMode = Literal["random", "center"]


def _draw(n: int, generator: torch.Generator | None) -> int:
    return int(torch.randint(n, (1,), generator=generator).item())


def _unravel(index: int, shape: tuple[int, ...]) -> list[int]:
    out = []
    for size in reversed(shape):
        out.append(index % size)
        index //= size
    return out[::-1]


def sample_error_clicks(
    pred: Tensor, target: Tensor, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """One click per sample from the error region of ``pred`` against ``target``.

    Args:
        pred: (B, D, H, W) or (B, 1, D, H, W) boolean prediction (e.g. ``logits > 0``).
        target: same shape, boolean reference.
        generator: source of randomness (CPU generator).

    Returns:
        points (B, 1, 3) long voxel indices (d, h, w), labels (B, 1) long: 1 false negative (positive
        click), 0 false positive (negative click).
    """
    if pred.dim() == 5:
        pred, target = pred[:, 0], target[:, 0]
    pred, target = pred.bool(), target.bool()
    shape = tuple(target.shape[1:])
    points, labels = [], []
    for b in range(target.shape[0]):
        error = (pred[b] ^ target[b]).flatten()
        where = error.nonzero().squeeze(1)
        if where.numel() > 0:
            k = int(where[_draw(where.numel(), generator)])
        else:  # prediction == target: a random voxel, labelled by the target
            k = _draw(error.numel(), generator)
        points.append(_unravel(k, shape))
        labels.append(int(target[b].flatten()[k]))
    dev = target.device
    return torch.tensor(points, device=dev).view(-1, 1, 3), torch.tensor(labels, device=dev).view(-1, 1)


def sample_center_clicks(
    pred: Tensor, target: Tensor, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """One click per sample at the error voxel farthest from the error region's border (see module doc).

    Same arguments and returns as :func:`sample_error_clicks`; an empty error region falls back to it.
    """
    if pred.dim() == 5:
        pred, target = pred[:, 0], target[:, 0]
    pred, target = pred.bool(), target.bool()
    points, labels = [], []
    for b in range(target.shape[0]):
        error = (pred[b] ^ target[b]).cpu().numpy()
        if not error.any():
            p, lab = sample_error_clicks(pred[b : b + 1], target[b : b + 1], generator)
            points.append(p[0, 0].tolist())
            labels.append(int(lab[0, 0]))
            continue
        dist = ndimage.distance_transform_edt(np.pad(error, 1))[1:-1, 1:-1, 1:-1]
        best = np.flatnonzero(dist.ravel() == dist.max())
        k = int(best[_draw(len(best), generator)])
        points.append(_unravel(k, tuple(error.shape)))
        labels.append(int(target[b].flatten()[k]))
    dev = target.device
    return torch.tensor(points, device=dev).view(-1, 1, 3), torch.tensor(labels, device=dev).view(-1, 1)


def sample_clicks(
    pred: Tensor, target: Tensor, generator: torch.Generator | None = None, mode: ClickMode = "random"
) -> tuple[Tensor, Tensor]:
    """The click sampler of ``mode``: ``random`` (the public code) or ``center``."""
    if mode == "center":
        return sample_center_clicks(pred, target, generator)
    return sample_error_clicks(pred, target, generator)
