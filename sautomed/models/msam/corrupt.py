"""Corrupted previous masks in training (our addition): mistakes for the clicks to correct.

On a few training cases the network's own first prediction is almost right (0.93 DSC after one click on the
BraTS training cases), so the error-region clicks that follow fall on boundary noise and it never learns to
correct a mistake where a click shows it. On an unseen case it then answers a click globally (a positive
click grew the whole mask from 55,000 to 103,000 voxels, adding 37,000 false positives). Here a clicked batch
may instead start its refinement from a corrupted copy of the reference (RITM's and nnInteractive's
simulated prior masks): balls of lesion removed and balls of background added near it. The first click
then lands in one of those local mistakes, and the loss asks the network to fix it and keep the rest.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _ball(grids: tuple[Tensor, ...], centre: Tensor, radius: float) -> Tensor:
    """The voxels of the index ``grids`` (one per axis) within ``radius`` of ``centre``."""
    dist2 = sum((g - float(c)) ** 2 for g, c in zip(grids, centre))
    return dist2 <= radius**2


def corrupt_masks(
    target: Tensor,
    radius: tuple[float, float],
    generator: torch.Generator | None = None,
    balls: int = 2,
) -> Tensor:
    """(B, 1, S, S, S) binary targets -> (B, 1, S, S, S) bool masks with local mistakes.

    Per crop, up to ``balls`` balls (radius a random fraction in ``radius`` of the crop side) removed at
    random lesion voxels, and up to ``balls`` added at random voxels within one largest radius of the lesion
    (anywhere in a crop without lesion); at least one of each kind, so every crop has a mistake to click.
    """
    out = target > 0
    shape = tuple(target.shape[-3:])
    side = min(shape)
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij")
    masks = []
    for b in range(target.shape[0]):
        lesion = out[b, 0]
        mask = lesion.clone()
        draw = torch.rand(4 * balls + 2, generator=generator)
        r_max = radius[1] * side
        if lesion.any():
            zyx = lesion.nonzero()  # (N, 3)
            lo, hi = zyx.min(0).values.float() - r_max, zyx.max(0).values.float() + r_max
            n_remove = 1 + int(draw[0] * balls) % balls
            for k in range(n_remove):
                centre = zyx[int(draw[2 + k] * len(zyx)) % len(zyx)]
                r = (radius[0] + float(draw[2 + balls + k]) * (radius[1] - radius[0])) * side
                mask &= ~_ball(grids, centre, r)
        else:
            lo, hi = torch.zeros(3), torch.tensor(shape, dtype=torch.float32) - 1  # anywhere
        n_add = 1 + int(draw[1] * balls) % balls
        top = torch.tensor(shape, dtype=torch.float32) - 1
        for _ in range(n_add):
            u = torch.rand(4, generator=generator)
            centre = (lo + u[:3] * (hi - lo)).clamp(torch.zeros(3), top)
            r = (radius[0] + float(u[3]) * (radius[1] - radius[0])) * side
            mask |= _ball(grids, centre, r) & ~lesion
        masks.append(mask)
    return torch.stack(masks)[:, None]


def mask_to_low_res(mask: Tensor, size: tuple[int, int, int], magnitude: float = 6.0) -> Tensor:
    """(B, 1, S, S, S) bool mask -> (B, 1, *size) logits of +-``magnitude`` (the fraction of each low-res
    cell inside the mask mapped to [-magnitude, magnitude]), the previous logits the network is given."""
    frac = torch.nn.functional.adaptive_avg_pool3d(mask.float(), size)
    return (2 * frac - 1) * magnitude
