"""Helpers for the M-SAM tests: the tiny network at S = 32 and a blob phantom crop."""

from __future__ import annotations

import torch

from sautomed.models.msam.network import MSAMConfig, MSAMNet

S = 32


def tiny_config(**overrides) -> MSAMConfig:
    kw = dict(variant="tiny", image_size=S)
    kw.update(overrides)
    return MSAMConfig(**kw)


def make_net(seed: int = 0, **overrides) -> MSAMNet:
    torch.manual_seed(seed)
    return MSAMNet(tiny_config(**overrides))


def blob_batch(batch: int = 2, size: int = S, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 1, S^3) images (a bright ball on a noisy background) and their (B, 1, S^3) binary targets."""
    g = torch.Generator().manual_seed(seed)
    z, y, x = torch.meshgrid(*(torch.arange(size, dtype=torch.float32),) * 3, indexing="ij")
    images, targets = [], []
    for _ in range(batch):
        c = size * (0.3 + 0.4 * torch.rand(3, generator=g))
        r = size * (0.12 + 0.1 * torch.rand(1, generator=g))
        ball = ((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2) < r**2
        img = 0.3 + 0.05 * torch.randn(size, size, size, generator=g) + 0.5 * ball.float()
        images.append(img)
        targets.append(ball.float())
    return torch.stack(images)[:, None], torch.stack(targets)[:, None]
