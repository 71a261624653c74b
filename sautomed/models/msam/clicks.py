"""Simulated clicks: a random voxel of the error region, positive on a miss, negative on a false alarm.

As SAM-Med3D's ``get_next_click3D_torch_2`` (the sampler M-SAM's training script uses), with two changes:
the prediction is thresholded at probability 0.5 (logit 0; the public code compares logits with 0.5), and an
empty error region does not crash (the public sampler indexes an empty list). Then the click is a random
voxel labelled by the ground truth there (positive inside the target, negative outside), so it never
contradicts the reference. Every draw comes from the given ``torch.Generator``: a seed repeats the clicks.

At the first iteration the previous prediction is empty, so the error region is the whole target: the first
click is a random foreground voxel, positive.

Coordinates are voxel indices along the crop's (D, H, W) axes, as the prompt encoder expects.
"""

from __future__ import annotations

import torch
from torch import Tensor


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
