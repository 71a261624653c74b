"""LoRA (loralib) on the q and v parts of every SAM encoder block's fused qkv projection."""

from __future__ import annotations

from typing import Literal

import loralib
import torch
from torch import nn

from sautomed.models.sam.upstream import ImageEncoderViT

EncoderFinetune = Literal["lora", "full", "frozen"]


def lora_qkv(qkv: nn.Linear, rank: int, alpha: float) -> loralib.MergedLinear:
    """A ``loralib.MergedLinear`` copy of ``qkv`` with LoRA on q and v (not k).

    The pretrained weight and bias are copied in, so the state-dict names ``weight``/``bias`` are unchanged
    (official checkpoints stay loadable); ``lora_A``/``lora_B`` are new. ``lora_B`` starts at zero, so the
    layer computes exactly what ``qkv`` did. ``merge_weights=False``: ``eval()`` must never fold LoRA into
    ``weight`` (that would change the saved weight and double-count LoRA on reload).
    """
    layer = loralib.MergedLinear(
        qkv.in_features,
        qkv.out_features,
        r=rank,
        lora_alpha=alpha,
        enable_lora=[True, False, True],
        bias=qkv.bias is not None,
        merge_weights=False,
    ).to(device=qkv.weight.device, dtype=qkv.weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(qkv.weight)
        if qkv.bias is not None:
            layer.bias.copy_(qkv.bias)
    # loralib keeps its row mask as a plain attribute, which .to(device) would not move: make it a buffer.
    lora_ind = layer.lora_ind
    del layer.lora_ind
    layer.register_buffer("lora_ind", lora_ind, persistent=False)
    return layer


def apply_lora(image_encoder: ImageEncoderViT, rank: int, alpha: float) -> None:
    """Replace every block's ``attn.qkv`` by its LoRA version, in place."""
    for block in image_encoder.blocks:
        block.attn.qkv = lora_qkv(block.attn.qkv, rank, alpha)


def set_encoder_trainable(image_encoder: ImageEncoderViT, mode: EncoderFinetune) -> None:
    """``lora``: only LoRA parameters train; ``full``: everything trains; ``frozen``: nothing does."""
    for name, p in image_encoder.named_parameters():
        if mode == "full":
            p.requires_grad_(True)
        elif mode == "lora":
            p.requires_grad_("lora_" in name)
        else:
            p.requires_grad_(False)
