"""Test-time augmentation for the slice-based families (``predict --tta``): the class probabilities of the
volume as it is, zoomed in-plane (``SCALES``) and, where no class is sided, flipped left-right, each mapped
back and averaged on the original grid before the argmax.

A flip is left out when a class name is sided (``left_kidney``, ``kidney_r``, ...): a mirrored left kidney
is a right one, and averaging the two would make the argmax confuse them. A zoom by ``f`` resamples every
slice by ``f`` about its centre (cropped or padded back to S); its scores are resampled by ``1 / f`` the same
way.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sautomed.evaluation.postprocess import class_probabilities

SCALES = (0.9, 1.1)
SIDED = re.compile(r"(^|_)(left|right|l|r)(_|$)", re.IGNORECASE)


def sided(class_names: Sequence[str]) -> list[str]:
    """The class names that name a side (a left-right flip would swap them)."""
    return [n for n in class_names if SIDED.search(n)]


def zoom(x: Tensor, factor: float) -> Tensor:
    """(N, ..., H, W) resampled in-plane by ``factor`` about the centre, cropped or edge-padded to (H, W)."""
    H, W = x.shape[-2:]
    h, w = max(1, round(H * factor)), max(1, round(W * factor))
    flat = x.reshape(-1, 1, H, W) if x.dim() == 3 else x
    z = F.interpolate(flat.float(), size=(h, w), mode="bilinear", align_corners=False)
    if h >= H:  # crop the centre
        top, left = (h - H) // 2, (w - W) // 2
        z = z[..., top : top + H, left : left + W]
    else:  # pad the edge
        top, left = (H - h) // 2, (W - w) // 2
        z = F.pad(z, (left, W - w - left, top, H - h - top), mode="replicate")
    return z.reshape(x.shape) if x.dim() == 3 else z


def tta_probabilities(module: Any, image: Tensor, geom: Any, scales: Sequence[float] = SCALES) -> Tensor:
    """(Z, C+1, Y, X) class probabilities of ``module`` (a family with ``volume_scores``) averaged over the
    identity, the in-plane zooms and, when no class is sided, the left-right flip."""
    out_hw = tuple(geom.shape_zyx[1:])
    total = module.case_probabilities(image, geom)
    count = 1
    for f in scales:
        scores, are_probabilities = module.volume_scores(zoom(image, f))
        total = total + class_probabilities(zoom(scores, 1.0 / f), out_hw, are_probabilities)
        count += 1
    if not sided(module.class_names):
        scores, are_probabilities = module.volume_scores(torch.flip(image, (-1,)))
        total = total + class_probabilities(torch.flip(scores, (-1,)), out_hw, are_probabilities)
        count += 1
    return total / count
