"""A local click head on the low-res logits (our addition to M-SAM, ``MSAMConfig.local_head``).

M-SAM's clicks reach the mask through the point tokens and (with ``click_maps``) the coarse-mask branch, both
through the 8^3 token grid and the two-way transformer's global attention. Trained from scratch on three
BraTS cases, the tiny network answered a click on an unseen case globally or not at all: a positive click at
the centre of the largest miss raised that voxel's logit from -5.1 to only -1.7, while the whole mask moved.
This head adds a local path: a small dilated 3D convolution stack over the decoder's low-res logits, the
previous logits and the two click maps, whose output is added to the decoder's logits::

    low = decoder(...) + head([decoder(...), prev_low, positive_map, negative_map])

Its receptive field is 15 low-res cells (30 voxels of a 64^3 crop), so a click can only change the mask near
it. The last convolution starts at zero: at initialisation, and for a loaded SAM-Med3D checkpoint, the network
is M-SAM's own.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LocalClickHead(nn.Module):
    """(B, 4, l, l, l) [decoder logits, previous logits, positive map, negative map] -> (B, 1, l, l, l)
    a correction of the decoder logits.

    Args:
        hidden: channels of the hidden layers.
    """

    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv3d(4, hidden, 3, padding=1),
            nn.GELU(),
            nn.Conv3d(hidden, hidden, 3, padding=2, dilation=2),
            nn.GELU(),
            nn.Conv3d(hidden, hidden, 3, padding=4, dilation=4),
            nn.GELU(),
            nn.Conv3d(hidden, 1, 1),
        )
        nn.init.zeros_(self.layers[-1].weight)
        nn.init.zeros_(self.layers[-1].bias)

    def forward(self, low: Tensor, prev: Tensor, maps: Tensor) -> Tensor:
        """low, prev (B, 1, l^3) logits, maps (B, 2, l^3) -> the corrected logits (B, 1, l^3)."""
        return low + self.layers(torch.cat([low, prev, maps.to(low.dtype)], dim=1))
