"""Lesion cut-out in training (our addition): parts of the lesion that only the clicks can show.

On a few training cases the image alone segments the training lesions almost perfectly, so a network trained
from scratch never needs its clicks and learns to ignore them (BraTS, ``README.md``: DSC flat from 1 to 10
clicks). Here, for a chosen crop of a clicked batch, a box around a random lesion voxel (its side a random
fraction of the crop side) is painted over with the median intensity outside the lesion, the target left as
it was: the hidden part is still lesion, and the error-region clicks that land in it are the only evidence.
Prompt-free batches (the automatic mode's first pass) never get it.

Two variants (off by default): ``fill="random"`` paints the box with a random level between the crop's 1st
and 99th percentile instead (on a held-out case the lesion the network missed was dark necrosis, 0.04 against
a lesion mean of 0.76: a median fill never shows the network a dark lesion to follow a click into), and
``fake_probability`` paints, outside the lesion, a box at the lesion's median intensity, the target again
unchanged: a false alarm that only a negative click can remove.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sautomed.errors import UserError


def cut_out_lesion(
    image: Tensor,
    target: Tensor,
    probability: float,
    size: tuple[float, float],
    generator: torch.Generator | None = None,
    fill: str = "median",
    fake_probability: float = 0.0,
) -> Tensor:
    """(B, C, S, S, S) crops and (B, 1, S, S, S) binary targets -> the crops with a lesion box painted over
    in every channel (a copy).

    Args:
        image: the crops.
        target: their binary targets (> 0: lesion); crops without lesion are left alone.
        probability: chance per crop.
        size: the box side's range as fractions of the crop side.
        generator: randomness (CPU generator; a seed repeats the draws).
        fill: ``median`` (the median outside the lesion) or ``random`` (a random level, see module doc).
        fake_probability: chance per crop of a fake-lesion box outside the lesion (module doc).
    """
    if fill not in ("median", "random"):
        raise UserError(f"cutout fill must be 'median' or 'random', got {fill!r}")
    out = image.clone()
    S = image.shape[-3:]
    for b in range(image.shape[0]):
        draw = torch.rand(5, generator=generator)
        lesion = target[b, 0] > 0
        inside = image[b, 0] != 0  # the head: channel 0's non-zero voxels
        if fake_probability > 0:
            fake = torch.rand(3, generator=generator)
            outside = (~lesion & inside).nonzero()
            if float(fake[0]) < fake_probability and lesion.any() and len(outside):
                box = _box(outside[int(fake[1] * len(outside)) % len(outside)], size, float(fake[2]), S)
                keep = lesion[box]
                for ch in range(image.shape[1]):  # every channel: the lesion's median level
                    patch = out[(b, ch, *box)]
                    out[(b, ch, *box)] = torch.where(keep, patch, image[b, ch][lesion].median())
        if float(draw[0]) >= probability or not lesion.any():
            continue
        where = lesion.nonzero()  # (N, 3)
        box = _box(where[int(draw[1] * len(where)) % len(where)], size, float(draw[2]), S)
        for ch in range(image.shape[1]):
            x = image[b, ch]
            nonzero = x[inside]
            if fill == "random" and nonzero.numel():
                lo, hi = torch.quantile(nonzero.float(), torch.tensor([0.01, 0.99]))
                level = lo + float(draw[3]) * (hi - lo)
            else:
                rest = x[~lesion & inside]
                level = rest.median() if rest.numel() else x.median()
            out[(b, ch, *box)] = level
    return out


def _box(centre: Tensor, size: tuple[float, float], u: float, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """A box around ``centre``, its side the fraction ``size[0] + u (size[1] - size[0])`` of ``shape``."""
    side = size[0] + u * (size[1] - size[0])
    half = [max(1, int(side * n / 2)) for n in shape]
    return tuple(slice(max(0, int(c) - h), min(n, int(c) + h)) for c, h, n in zip(centre, half, shape))
