"""unet3d over patches: whole-volume inference with MONAI's sliding window and Gaussian blending.

A volume smaller than the patch along an axis is padded (with zeros, the preprocessed background) to the
patch and cropped back; a larger one is covered by windows overlapping by `overlap`, each window's logits
weighted by a Gaussian centred on it (nnU-Net's blending: the borders of a window, which see least context,
count least).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from monai.inferers import sliding_window_inference
from torch import Tensor

from sautomed.errors import UserError


@torch.no_grad()
def segment_patches(
    net: Callable[[Tensor], Tensor],
    volume: Tensor,
    patch_size: Sequence[int],
    overlap: float = 0.5,
    batch: int = 2,
    blend: Literal["gaussian", "constant"] = "gaussian",
) -> Tensor:
    """(Z, S, S) preprocessed volume (or (C_in, Z, S, S) of C_in input channels) -> (Z, C+1, S, S) logits,
    by sliding (pz, py, px) windows."""
    if volume.ndim not in (3, 4) or volume.shape[-3] == 0:
        raise UserError(f"expected a (Z, S, S) or (C, Z, S, S) volume with Z >= 1, got {tuple(volume.shape)}")
    x = (volume[None] if volume.ndim == 4 else volume[None, None]).float()  # (1, C_in, Z, S, S)
    logits = sliding_window_inference(
        x,
        tuple(patch_size),
        batch,
        net,
        overlap=overlap,
        mode=blend,
        sigma_scale=0.125,
        padding_mode="constant",
    )  # (1, C+1, Z, S, S)
    return logits[0].transpose(0, 1)  # (Z, C+1, S, S): slices first, as the 2D path and the resizer take them
