"""LoRA (loralib) on the q and v parts of every encoder block's fused qkv projection.

SAM's ViT lays its qkv output out as [q | k | v] (thirds); LiteMedSAM's TinyViT interleaves them by head
([q_h, k_h, v_h] for each head h). The row mask that tells loralib where its q and v updates go follows the
layout, so LoRA adapts exactly the q and v rows in both.
"""

from __future__ import annotations

from typing import Literal

import loralib
import torch
from torch import nn

EncoderFinetune = Literal["lora", "full", "frozen"]


def _qv_rows(out_features: int, head_dim: int | None) -> torch.Tensor:
    """Bool mask over the qkv rows that are q or v: thirds (head_dim None) or interleaved by head."""
    rows = torch.arange(out_features)
    part = rows // (out_features // 3) if head_dim is None else (rows // head_dim) % 3  # 0 q, 1 k, 2 v
    return part != 1


def lora_qkv(qkv: nn.Linear, rank: int, alpha: float, head_dim: int | None = None) -> loralib.MergedLinear:
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
    lora_ind = _qv_rows(qkv.out_features, head_dim).to(layer.lora_ind.device)
    assert int(lora_ind.sum()) == int(layer.lora_ind.sum())
    del layer.lora_ind
    layer.register_buffer("lora_ind", lora_ind, persistent=False)
    return layer


def apply_lora(image_encoder: nn.Module, rank: int, alpha: float) -> None:
    """Replace every attention block's ``attn.qkv`` by its LoRA version, in place.

    SAM's ViT: ``image_encoder.blocks``; TinyViT: ``image_encoder.attention_blocks()`` (head-interleaved).
    """
    if hasattr(image_encoder, "attention_blocks"):
        for block in image_encoder.attention_blocks():
            block.attn.qkv = lora_qkv(block.attn.qkv, rank, alpha, head_dim=block.attn.head_dim)
        return
    for block in image_encoder.blocks:
        block.attn.qkv = lora_qkv(block.attn.qkv, rank, alpha)


def set_encoder_trainable(image_encoder: nn.Module, mode: EncoderFinetune) -> None:
    """``lora``: only LoRA parameters train; ``full``: everything trains; ``frozen``: nothing does."""
    for name, p in image_encoder.named_parameters():
        if mode == "full":
            p.requires_grad_(True)
        elif mode == "lora":
            p.requires_grad_("lora_" in name)
        else:
            p.requires_grad_(False)
