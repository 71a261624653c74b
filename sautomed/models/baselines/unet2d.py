"""unet2d over slices: its training input from the shared slice windows, and slice-by-slice inference.

The shared data module's training windows hold, at positions n, n+1, n+2, the target slice t and its spatial
neighbours in processing order (t - d, t, t + d for direction d = +1 or -1, clamped at the volume's ends);
2.5D input takes them in spatial order (t - 1, t, t + 1) as channels. Inference builds the same channels for
every slice, clamped the same way.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from sautomed.errors import UserError


def window_slices(image: Tensor, direction: Tensor, context: int) -> Tensor:
    """(B, n+3, S, S) training window, (B,) directions -> (B, 1 + 2 * context, S, S) network input."""
    n = image.shape[1] - 3
    if context == 0:
        return image[:, n + 1 : n + 2]  # (B, 1, S, S): the target slice
    three = image[:, n : n + 3]  # (B, 3, S, S): t - d, t, t + d
    backwards = direction.to(image.device).view(-1) < 0
    return torch.where(backwards.view(-1, 1, 1, 1), three.flip(1), three)  # (B, 3, S, S): t - 1, t, t + 1


def volume_slices(volume: Tensor, start: int, stop: int, context: int) -> Tensor:
    """Slices start..stop-1 of a (Z, S, S) volume as (stop - start, 1 + 2 * context, S, S) input."""
    z = volume.shape[0]
    offsets = torch.arange(-context, context + 1)
    index = (torch.arange(start, stop)[:, None] + offsets[None]).clamp(0, z - 1)  # (k, 1 + 2c)
    return volume[index.to(volume.device)]  # (k, 1 + 2c, S, S)


@torch.no_grad()
def segment_slices(net: Callable[[Tensor], Tensor], volume: Tensor, context: int, chunk: int = 16) -> Tensor:
    """(Z, S, S) preprocessed volume -> (Z, C+1, S, S) logits, `chunk` slices per forward."""
    if volume.ndim != 3 or volume.shape[0] == 0:
        raise UserError(f"expected a (Z, S, S) volume with Z >= 1, got {tuple(volume.shape)}")
    parts = [
        net(volume_slices(volume, s, min(s + chunk, volume.shape[0]), context).float())
        for s in range(0, volume.shape[0], chunk)
    ]
    return torch.cat(parts, 0)
