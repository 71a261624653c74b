"""Helpers for the model tests: the tiny network at S = 64 with C = 8, phantom slices."""

from __future__ import annotations

import torch

from sautomed.models.sautomed.network import NetworkConfig, SAutoMedNet, build_network

S = 64
C = 8


def tiny_config(**overrides) -> NetworkConfig:
    kw = dict(backbone="tiny", image_size=S, num_classes=C)
    kw.update(overrides)
    return NetworkConfig(**kw)


def make_net(seed: int = 0, **overrides) -> SAutoMedNet:
    torch.manual_seed(seed)
    return build_network(tiny_config(**overrides))


def phantom_labels(batch: int, size: int = S, shift: int = 0) -> torch.Tensor:
    """(batch, size, size) labels: rectangles of classes 1..4, moved by ``shift`` and the batch index."""
    y = torch.zeros(batch, size, size, dtype=torch.long)
    q = size // 8
    for b in range(batch):
        o = shift + b
        y[b, q + o : 3 * q + o, q : 4 * q] = 1
        y[b, 4 * q : 6 * q, q + o : 3 * q + o] = 2
        y[b, 5 * q : 7 * q, 5 * q : 7 * q] = 3
        y[b, q : 2 * q, 5 * q : 7 * q - o] = 4
    return y


def phantom_images(labels: torch.Tensor) -> torch.Tensor:
    """Intensities in [0, 1] from labels, plus a little noise."""
    g = torch.Generator().manual_seed(1)
    return (labels.float() / 5 + 0.1 + 0.02 * torch.randn(labels.shape, generator=g)).clamp(0, 1)
