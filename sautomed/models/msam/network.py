"""M-SAM: SAM-Med3D's 3D SAM (+LoRA) with the Mask-Enhanced Adapter between prompt encoder and decoder.

Use: ``emb = net.encode(image)`` once per crop, then per refinement iteration
``low = net.decode(emb, points, prev_low)`` (``points`` the newest click, ``prev_low`` the previous low-res
logits, zeros at the first iteration) and ``net.upscale(low)`` for full-size logits.

Shapes at the default ``vit_b_ori`` (S = 128)::

    image (B, 1, 128^3) --image_encoder--> E_I (B, 384, 8^3)
    points (B, N, 3), labels (B, N) + prev_low (B, 1, 32^3) --prompt_encoder--> sparse (B, N+1, 384), E_M
    fusion(E_I, E_M) (MEA / sum / cross-attention) --mask_decoder--> low-res logits (B, 1, 32^3)
    trilinear --> logits (B, 1, 128^3)

State-dict names: ``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*`` are SAM-Med3D's (LoRA adds
``lora_A``/``lora_B`` beside ``attn.qkv.weight``); ``fusion.*`` is new.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sautomed.errors import UserError
from sautomed.guards import check_encoder_finetune
from sautomed.models.msam.decoder3d import MaskDecoder3D
from sautomed.models.msam.encoder3d import ImageEncoder3D, RelPosIndexing
from sautomed.models.msam.local_head import LocalClickHead
from sautomed.models.msam.mea import Fusion, SumFusion, build_fusion
from sautomed.models.msam.prompt3d import PEAxisOrder, PromptEncoder3D, click_maps
from sautomed.models.sam.lora import lora_qkv, set_encoder_trainable

log = logging.getLogger(__name__)

Variant = Literal["vit_b_ori", "tiny"]
NEW_MODULE_PREFIXES = (
    "fusion.",
    "local_head.",
)  # modules SAM-Med3D does not have (besides LoRA's lora_A / lora_B)


@dataclass(frozen=True)
class MSAMVariant:
    """Hyper-parameters of one network size (names after SAM-Med3D's ``build_sam3D``)."""

    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    window_size: int
    patch_size: int
    prompt_embed_dim: int  # encoder output = prompt / decoder dim
    decoder_num_heads: int
    decoder_mlp_dim: int
    mask_in_chans: int = 16
    iou_head_hidden_dim: int = 256


VARIANTS: dict[str, MSAMVariant] = {
    # SAM-Med3D "vit_b_ori" (the layout of sam_med3d.pth / sam_med3d_turbo.pth, which M-SAM starts from)
    "vit_b_ori": MSAMVariant(768, 12, 12, (2, 5, 8, 11), 14, 16, 384, 8, 2048),
    # tests and CPU runs: patch 8 (32^3 input -> 4^3 tokens, 16^3 low-res logits), 2 blocks of 48 channels,
    # one windowed (3^3 windows over the zero-padded 6^3 grid) and one global.
    "tiny": MSAMVariant(48, 2, 4, (1,), 3, 8, 48, 4, 96, 16, 32),
}


@dataclass
class MSAMConfig:
    """Settings of the M-SAM network.

    Attributes:
        variant: ``vit_b_ori`` (SAM-Med3D's layout, pretrained weights exist) or ``tiny`` (tests, CPU).
        image_size: cubic crop size S (128 for vit_b_ori); a multiple of the patch size.
        fusion: how E_I and E_M meet: ``mea`` (M-SAM), ``sum`` (SAM / SAM-Med3D), ``cross_attention``.
        mea_blocks: mutual-residual blocks in the MEA (1 in the public code).
        mea_heads: attention heads of the MEA / cross-attention (6 in the public code).
        lora_rank: LoRA rank on q and v of every encoder block (0: no LoRA).
        lora_alpha: LoRA alpha (scaling alpha / rank; 4 with rank 4 = the public code's unscaled LoRA).
        encoder_finetune: ``auto`` (``lora`` when a checkpoint is loaded, ``full`` otherwise), ``lora`` (only
            LoRA trains; the public code), ``full``, or ``frozen`` (the rebuttal's wording).
        sam_med3d_checkpoint: path of a SAM-Med3D checkpoint (``image_encoder.*``, ``prompt_encoder.*``,
            ``mask_decoder.*``) loaded at construction; None: random init.
        rel_pos_indexing: how the encoder's (and the MEA's) relative-position terms broadcast:
            ``sam_med3d`` (SAM-Med3D's own expression, which its pretrained weights expect; needs cubic token
            grids) or ``decomposed`` (MViTv2's intended decomposition); see ``encoder3d``.
        dense_pe_order: the dense positional grid's axis order: ``sam_med3d`` (its first two axes swapped
            against the points', as SAM-Med3D's pretrained weights have it) or ``consistent``.
        input_norm: ``zscore_nonzero`` (each crop z-scored over its non-zero voxels, as SAM-Med3D's
            ``tio.ZNormalization(masking_method=x > 0)``) or ``none``.
        click_maps: our addition, not M-SAM's or SAM-Med3D's: the clicks so far also enter as two dense
            maps (positive, negative; Gaussians of ``click_sigma`` low-res cells) beside the previous logits
            in the coarse-mask branch, so they reach E_M and the MEA as well as the point tokens. Trained
            from scratch on a CPU budget, the point tokens alone taught the tiny network nothing (DSC flat
            from 1 to 10 clicks; ``README.md``). A SAM-Med3D checkpoint loads with the maps' input weights
            at zero (the network then starts as SAM-Med3D); it cannot be exported to SAM-Med3D's format.
        click_sigma: width of a click's Gaussian in low-res cells (4g cells across the crop).
        local_head: our addition: a small convolutional head adds a local correction, read from the
            decoder's logits, the previous logits and the click maps, to the decoder's low-res logits
            (``local_head.py``); zero at initialisation; no SAM-Med3D equivalent (export refused).
        in_channels: input channels (= ``data.channels``: FLAIR, T1c, ... as nnU-Net's ``_0000``, ``_0001``);
            each is z-scored on its own. SAM-Med3D has one: a checkpoint's patch embedding is shared out
            over the channels (each gets its kernel / C); such a network is not exported to its format.
    """

    variant: Variant = "vit_b_ori"
    image_size: int = 128
    fusion: Fusion = "mea"
    mea_blocks: int = 1
    mea_heads: int = 6
    lora_rank: int = 4
    lora_alpha: float = 4.0
    encoder_finetune: Literal["auto", "lora", "full", "frozen"] = "auto"
    sam_med3d_checkpoint: str | None = None
    rel_pos_indexing: RelPosIndexing = "sam_med3d"
    dense_pe_order: PEAxisOrder = "sam_med3d"
    input_norm: Literal["zscore_nonzero", "none"] = "zscore_nonzero"
    click_maps: bool = False
    click_sigma: float = 1.5
    local_head: bool = False
    in_channels: int = 1


def zscore_nonzero(image: Tensor, eps: float = 1e-6) -> Tensor:
    """Per sample and channel: (x - mean) / std over the voxels > 0 (all voxels when none is); shape kept."""
    b, c = image.shape[:2]
    flat = image.reshape(b * c, -1).float()
    mask = flat > 0
    mask = torch.where(mask.any(1, keepdim=True), mask, torch.ones_like(mask))
    n = mask.sum(1, keepdim=True).clamp_min(1)
    mean = (flat * mask).sum(1, keepdim=True) / n
    var = (((flat - mean) * mask) ** 2).sum(1, keepdim=True) / n
    out = (flat - mean) / (var.sqrt() + eps)
    return out.reshape(image.shape).to(image.dtype)


class MSAMNet(nn.Module):
    """The M-SAM network (see module docstring).

    Args:
        config: the network's settings.
    """

    def __init__(self, config: MSAMConfig) -> None:
        super().__init__()
        self.config = config
        v = VARIANTS[config.variant]
        s = config.image_size
        if config.in_channels < 1:
            raise UserError(f"in_channels must be >= 1, got {config.in_channels}")
        self.image_encoder = ImageEncoder3D(
            img_size=s,
            patch_size=v.patch_size,
            in_chans=config.in_channels,
            embed_dim=v.encoder_embed_dim,
            depth=v.encoder_depth,
            num_heads=v.encoder_num_heads,
            out_chans=v.prompt_embed_dim,
            window_size=v.window_size,
            global_attn_indexes=v.encoder_global_attn_indexes,
            rel_pos_indexing=config.rel_pos_indexing,
        )
        grid = self.image_encoder.grid
        self.grid = grid
        self.low_res_size = tuple(4 * g for g in grid)  # (4g, 4g, 4g)
        self.prompt_encoder = PromptEncoder3D(
            v.prompt_embed_dim,
            grid,
            (s, s, s),
            v.mask_in_chans,
            pe_axis_order=config.dense_pe_order,
            mask_channels=3 if config.click_maps else 1,
        )
        self.mask_decoder = MaskDecoder3D(
            transformer_dim=v.prompt_embed_dim,
            transformer_heads=v.decoder_num_heads,
            transformer_mlp_dim=v.decoder_mlp_dim,
            iou_head_hidden_dim=v.iou_head_hidden_dim,
        )
        self.fusion = build_fusion(
            config.fusion,
            v.prompt_embed_dim,
            grid,
            config.mea_blocks,
            config.mea_heads,
            config.rel_pos_indexing,
        )
        self.local_head = LocalClickHead() if config.local_head else None
        if config.lora_rank > 0:
            for block in self.image_encoder.blocks:
                block.attn.qkv = lora_qkv(block.attn.qkv, config.lora_rank, config.lora_alpha)
        if config.sam_med3d_checkpoint:
            from sautomed.models.msam.checkpoint import load_sam_med3d

            log.info("%s", load_sam_med3d(self, config.sam_med3d_checkpoint))
        mode = config.encoder_finetune
        check_encoder_finetune(mode, config.sam_med3d_checkpoint, "sam_med3d_checkpoint")
        if mode == "auto":
            pretrained = bool(config.sam_med3d_checkpoint)
            mode = ("lora" if config.lora_rank > 0 else "frozen") if pretrained else "full"
        if mode == "lora" and config.lora_rank == 0:
            raise UserError("encoder_finetune 'lora' needs lora_rank > 0")
        set_encoder_trainable(self.image_encoder, mode)  # type: ignore[arg-type]
        # kept for SAM-Med3D's state-dict names, unused by M-SAM (one mask, logits always given): no grad
        for p in (
            *self.mask_decoder.iou_prediction_head.parameters(),
            self.prompt_encoder.no_mask_embed.weight,
        ):
            p.requires_grad_(False)

    def encode(self, image: Tensor) -> Tensor:
        """(B, C_in, S, S, S) crop -> E_I (B, C, g, g, g). Called once per crop; refinement reuses it."""
        if self.config.input_norm == "zscore_nonzero":
            image = zscore_nonzero(image)
        return self.image_encoder(image)

    def decode(
        self,
        embedding: Tensor,
        points: tuple[Tensor, Tensor] | None,
        prev_low_res: Tensor | None,
        clicks: tuple[Tensor, Tensor] | None = None,
        local_head: bool = True,
    ) -> Tensor:
        """One refinement step. embedding (B, C, g^3); points ((B, N, 3) voxel indices, (B, N) labels) or
        None (prompt-free: only the padding point); prev_low_res (B, 1, 4g^3) logits or None (zeros)
        -> low-res logits (B, 1, 4g, 4g, 4g). ``clicks``: every click so far, for the click maps
        (``config.click_maps``; default: ``points``). ``local_head`` False: the decoder's logits before the
        local head (``consistency.py`` optimises through the head alone)."""
        b = embedding.shape[0]
        if prev_low_res is None:
            prev_low_res = embedding.new_zeros(b, 1, *self.low_res_size)
        mask_input = prev_low_res
        if self.config.click_maps or self.local_head is not None:
            maps = self.click_maps_of(clicks if clicks is not None else points, prev_low_res)
        if self.config.click_maps:
            mask_input = torch.cat([prev_low_res, maps.to(prev_low_res.dtype)], dim=1)  # (B, 3, 4g^3)
        sparse, dense = self.prompt_encoder(points, mask_input)  # (B, N+1, C), E_M (B, C, g^3)
        fusion = None if isinstance(self.fusion, SumFusion) else self.fusion
        low, _ = self.mask_decoder(
            embedding,
            self.prompt_encoder.get_dense_pe(),
            sparse,
            dense,
            multimask_output=False,
            fusion=fusion,
        )
        if (
            self.local_head is not None and local_head
        ):  # a local correction from the logits and the click maps
            low = self.local_head(low, prev_low_res, maps)
        return low  # (B, 1, 4g, 4g, 4g)

    def click_maps_of(self, given: tuple[Tensor, Tensor] | None, like: Tensor) -> Tensor:
        """(B, 2, 4g^3) positive / negative click maps of ``given`` clicks (zeros for None), as ``like``."""
        if given is None:
            return like.new_zeros(like.shape[0], 2, *self.low_res_size)
        size = (self.config.image_size,) * 3
        return click_maps(given[0], given[1], self.low_res_size, size, self.config.click_sigma)

    def upscale(self, low_res: Tensor, size: tuple[int, int, int] | None = None) -> Tensor:
        """(B, 1, 4g^3) logits -> (B, 1, *size) trilinear (default the crop size S^3)."""
        size = size or (self.config.image_size,) * 3
        return F.interpolate(low_res, size=size, mode="trilinear", align_corners=False)

    def forward(
        self, image: Tensor, points: tuple[Tensor, Tensor] | None = None, prev_low_res: Tensor | None = None
    ) -> Tensor:
        """One-shot: encode and decode once -> low-res logits (B, 1, 4g, 4g, 4g)."""
        return self.decode(self.encode(image), points, prev_low_res)


def build_network(config: MSAMConfig) -> MSAMNet:
    """The network for ``config``."""
    return MSAMNet(config)
