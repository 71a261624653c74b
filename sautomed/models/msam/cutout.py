"""Lesion cut-out in training (our addition): parts of the lesion that only the clicks can show.

On a few training cases the image alone segments the training lesions almost perfectly, so a network trained
from scratch never needs its clicks and learns to ignore them (BraTS, ``README.md``: DSC flat from 1 to 10
clicks). Here, for a chosen crop of a clicked batch, a box around a random lesion voxel (its side a random
fraction of the crop side) is painted over with the median intensity outside the lesion, the target left as
it was: the hidden part is still lesion, and the error-region clicks that land in it are the only evidence.
Prompt-free batches (the automatic mode's first pass) never get it.
"""

from __future__ import annotations

import torch
from torch import Tensor


def cut_out_lesion(
    image: Tensor,
    target: Tensor,
    probability: float,
    size: tuple[float, float],
    generator: torch.Generator | None = None,
) -> Tensor:
    """(B, 1, S, S, S) crops and binary targets -> the crops with a lesion box painted over (a copy).

    Args:
        image: the crops.
        target: their binary targets (> 0: lesion); crops without lesion are left alone.
        probability: chance per crop.
        size: the box side's range as fractions of the crop side.
        generator: randomness (CPU generator; a seed repeats the draws).
    """
    out = image.clone()
    S = image.shape[-3:]
    for b in range(image.shape[0]):
        draw = torch.rand(5, generator=generator)
        lesion = target[b, 0] > 0
        if float(draw[0]) >= probability or not lesion.any():
            continue
        where = lesion.nonzero()  # (N, 3)
        centre = where[int(draw[1] * len(where)) % len(where)]
        side = size[0] + float(draw[2]) * (size[1] - size[0])
        half = [max(1, int(side * n / 2)) for n in S]
        box = tuple(slice(max(0, int(c) - h), min(n, int(c) + h)) for c, h, n in zip(centre, half, S))
        rest = image[b, 0][~lesion & (image[b, 0] != 0)]
        fill = rest.median() if rest.numel() else image[b, 0].median()
        out[(b, 0, *box)] = fill
    return out
