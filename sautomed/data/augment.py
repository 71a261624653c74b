"""In-plane augmentation of a training window, identical for every slice of the window.

Small rotation and scaling, intensity gamma, contrast and noise (design.md section 2). Never a left-right
flip: classes that name a side (right and left kidney) would swap. Two optional extras, off by default (a
config turns them on): an in-plane shift (organs of other patients lie elsewhere in the slice; whole-slice
models never see a random crop position) and a smooth multiplicative bias field (MR coil inhomogeneity).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Augmentation:
    """Augmentation ranges; `enabled=False` turns all of it off."""

    enabled: bool = True
    rotate_deg: float = 15.0
    scale: tuple[float, float] = (0.85, 1.15)
    gamma: tuple[float, float] = (0.7, 1.5)
    contrast: tuple[float, float] = (0.75, 1.25)
    noise_std: float = 0.03
    probability: float = 0.8
    shift: float = 0.0
    bias_field: float = 0.0


def _bias_field(shape: tuple[int, int], strength: float, rng: np.random.Generator) -> torch.Tensor:
    """(H, W) smooth multiplicative field exp(p(x, y)), p a random 2nd-order polynomial of amplitude
    ``strength`` on [-1, 1]^2 (its mean factor near 1)."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, shape[0]), torch.linspace(-1, 1, shape[1]), indexing="ij")
    terms = torch.stack([x, y, x * y, x * x - 1 / 3, y * y - 1 / 3])  # (5, H, W), zero-mean terms
    coef = torch.from_numpy(rng.uniform(-strength, strength, 5).astype(np.float32))
    return torch.exp((coef.view(5, 1, 1) * terms).sum(0))


def augment_window(
    images: torch.Tensor, label: torch.Tensor, rng: np.random.Generator, cfg: Augmentation
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment one window: images (L, S, S) in [0, 1], label (S, S) or (K, S, S) long (the labels of K of the
    window's slices); the same transform for every slice and label.

    ``cfg.shift`` moves the slice by up to that fraction of its side in x and y; ``cfg.bias_field`` multiplies
    it by a smooth field (``_bias_field``). Both draw from ``rng`` only when on, so a config without them
    repeats the draws of the plain augmentation exactly."""
    if not cfg.enabled or rng.random() >= cfg.probability:
        return images, label
    angle = math.radians(rng.uniform(-cfg.rotate_deg, cfg.rotate_deg))
    scale = rng.uniform(*cfg.scale)
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    tx, ty = (rng.uniform(-2 * cfg.shift, 2 * cfg.shift, 2).tolist()) if cfg.shift > 0 else (0.0, 0.0)
    theta = torch.tensor([[cos, -sin, tx], [sin, cos, ty]], dtype=torch.float32)[None]  # (1, 2, 3)
    size = (1, 1, *images.shape[-2:])
    grid = F.affine_grid(theta, list(size), align_corners=False)  # (1, S, S, 2)
    stack = images[None]  # (1, L, S, S)
    images = F.grid_sample(stack, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    labels = label.reshape(1, -1, *label.shape[-2:]).float()  # (1, K, S, S)
    label = (
        F.grid_sample(labels, grid, mode="nearest", padding_mode="zeros", align_corners=False)
        .round()
        .long()
        .reshape(label.shape)
    )
    if cfg.bias_field > 0:
        images = images * _bias_field(tuple(images.shape[-2:]), cfg.bias_field, rng)
    gamma = rng.uniform(*cfg.gamma)
    images = images.clamp(0, 1) ** gamma
    contrast = rng.uniform(*cfg.contrast)
    mean = images.mean()
    images = (images - mean) * contrast + mean
    if cfg.noise_std > 0:
        gen = torch.Generator().manual_seed(int(rng.integers(0, 2**31 - 1)))
        images = images + torch.randn(images.shape, generator=gen) * rng.uniform(0, cfg.noise_std)
    return images.clamp(0, 1), label
