"""Small 3D building blocks shared by the M-SAM pieces: LayerNorm over the channels of a 3D grid.

segment-anything's ``LayerNorm2d`` normalises (B, C, H, W) over C; the 3D version only broadcasts its affine
parameters over one more axis. State-dict names (``weight``, ``bias``) are SAM-Med3D's ``LayerNorm3d``'s.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sautomed.models.sam.upstream import LayerNorm2d


class LayerNorm3d(LayerNorm2d):
    """LayerNorm over the channel axis of a (B, C, D, H, W) tensor.

    Args:
        num_channels: C.
        eps: added to the variance.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__(num_channels, eps)

    def forward(self, x: Tensor) -> Tensor:
        u = x.mean(1, keepdim=True)  # (B, 1, D, H, W)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None, None] * x + self.bias[:, None, None, None]


def channels_last(x: Tensor) -> Tensor:
    """(B, C, D, H, W) -> (B, D, H, W, C)."""
    return x.permute(0, 2, 3, 4, 1)


def channels_first(x: Tensor) -> Tensor:
    """(B, D, H, W, C) -> (B, C, D, H, W)."""
    return x.permute(0, 4, 1, 2, 3)
