"""SAM's image encoder, prompt encoder and mask decoder built from segment-anything's own classes.

The official variants (vit_b / vit_l / vit_h) use the hyper-parameters of ``segment_anything.build_sam``; only
the input size S is free (the checkpoint loader interpolates what depends on it). ``tiny`` is ours: a small
encoder for tests and the CPU demo. There is no pretrained tiny checkpoint. ``litemedsam`` is LiteMedSAM: a
TinyViT-5M encoder (``tiny_vit.py``, features at S/4) with SAM's own prompt encoder and mask decoder,
medically pretrained (``sautomed weights litemedsam``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import Literal, NamedTuple

import torch
from torch import nn

from sautomed.errors import UserError
from sautomed.models.sam.tiny_vit import TinyViTEncoder
from sautomed.models.sam.upstream import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer

Backbone = Literal["tiny", "vit_b", "vit_l", "vit_h", "litemedsam"]
BACKBONES: tuple[str, ...] = ("tiny", "vit_b", "vit_l", "vit_h", "litemedsam")

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class SamVariant:
    """Hyper-parameters of one SAM size (names follow ``segment_anything.build_sam``)."""

    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    window_size: int = 14
    patch_size: int = 16
    mlp_ratio: float = 4.0
    prompt_embed_dim: int = 256  # encoder output channels = prompt / decoder transformer dim
    decoder_depth: int = 2
    decoder_num_heads: int = 8
    decoder_mlp_dim: int = 2048
    mask_in_chans: int = 16


SAM_VARIANTS: dict[str, SamVariant] = {
    "vit_b": SamVariant(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": SamVariant(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": SamVariant(1280, 32, 16, (7, 15, 23, 31)),
    # Tiny: 4 blocks of 192 channels (head dim 64 as in SAM), windows of 8 tokens, the last block global;
    # the decoder keeps SAM's 256-d two-way transformer but with a 512-d MLP. Encoder 2.6 M parameters,
    # mask decoder 2.5 M (the whole 3D-SAutoMed network with C = 8: 10.6 M).
    "tiny": SamVariant(
        encoder_embed_dim=192,
        encoder_depth=4,
        encoder_num_heads=3,
        encoder_global_attn_indexes=(3,),
        window_size=8,
        decoder_mlp_dim=512,
    ),
}


class SamParts(NamedTuple):
    image_encoder: ImageEncoderViT | TinyViTEncoder
    prompt_encoder: PromptEncoder
    mask_decoder: MaskDecoder


def build_sam_parts(
    backbone: Backbone, image_size: int, patch_size: int = 16, feature_pool: int = 1
) -> SamParts:
    """Build SAM's three modules for input size ``image_size`` (a multiple of the patch size).

    ``patch_size`` other than 16 is for ``tiny`` only (official checkpoints are patch 16).
    ``feature_pool`` k > 1: the network average-pools the encoder's features by k, so the prompt encoder's
    grid is the encoder's divided by k.
    """
    if backbone == "litemedsam":
        return build_litemedsam_parts(image_size, feature_pool)
    if backbone not in SAM_VARIANTS:
        raise UserError(f"unknown backbone {backbone!r}; choose from {list(BACKBONES)}")
    v = SAM_VARIANTS[backbone]
    if patch_size != v.patch_size:
        if backbone != "tiny":
            raise UserError(f"patch_size {patch_size}: only the tiny backbone takes another than 16")
        v = replace(v, patch_size=patch_size)
    if image_size % v.patch_size:
        raise UserError(f"image_size {image_size} must be a multiple of the patch size {v.patch_size}")
    grid = image_size // v.patch_size // feature_pool
    image_encoder = ImageEncoderViT(
        depth=v.encoder_depth,
        embed_dim=v.encoder_embed_dim,
        img_size=image_size,
        mlp_ratio=v.mlp_ratio,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        num_heads=v.encoder_num_heads,
        patch_size=v.patch_size,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=v.encoder_global_attn_indexes,
        window_size=v.window_size,
        out_chans=v.prompt_embed_dim,
    )
    prompt_encoder, mask_decoder = _prompt_and_decoder(v, image_size, grid)
    return SamParts(image_encoder, prompt_encoder, mask_decoder)


def build_litemedsam_parts(image_size: int, feature_pool: int = 1) -> SamParts:
    """LiteMedSAM: TinyViT encoder (features S/4) + SAM's prompt encoder and mask decoder (SAM's sizes).

    LiteMedSAM was trained at S = 256 (64 x 64 features); any multiple of 16 builds (nothing in it depends
    on S but the prompt encoder's embedding size, which is not a weight).
    """
    if image_size % 16:
        raise UserError(f"image_size {image_size} must be a multiple of 16 for litemedsam")
    encoder = TinyViTEncoder()
    prompt_encoder, mask_decoder = _prompt_and_decoder(
        SAM_VARIANTS["vit_b"], image_size, image_size // 4 // feature_pool
    )
    return SamParts(encoder, prompt_encoder, mask_decoder)


def _prompt_and_decoder(v: SamVariant, image_size: int, grid: int) -> tuple[PromptEncoder, MaskDecoder]:
    prompt_encoder = PromptEncoder(
        embed_dim=v.prompt_embed_dim,
        image_embedding_size=(grid, grid),
        input_image_size=(image_size, image_size),
        mask_in_chans=v.mask_in_chans,
    )
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(
            depth=v.decoder_depth,
            embedding_dim=v.prompt_embed_dim,
            mlp_dim=v.decoder_mlp_dim,
            num_heads=v.decoder_num_heads,
        ),
        transformer_dim=v.prompt_embed_dim,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    return prompt_encoder, mask_decoder


def init_random_position_embedding(image_encoder: nn.Module, std: float = 0.02) -> None:
    """SAM creates ``pos_embed`` as zeros (a placeholder for pretrained values). Without a checkpoint that
    leaves the encoder with no absolute position information, so give it the usual ViT init instead."""
    if getattr(image_encoder, "pos_embed", None) is not None:
        with torch.no_grad():
            nn.init.trunc_normal_(image_encoder.pos_embed, std=std)
