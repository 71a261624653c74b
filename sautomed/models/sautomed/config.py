"""``NetworkConfig``: the settings of the 3D-SAutoMed network, and the combinations it refuses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sautomed.errors import UserError

__all__ = ["NetworkConfig", "check_network_config"]


@dataclass
class NetworkConfig:
    """Settings of the 3D-SAutoMed network.

    Attributes:
        backbone: SAM size: ``vit_b``/``vit_l``/``vit_h`` (official), ``tiny`` (tests, CPU demo), or
            ``litemedsam`` (LiteMedSAM's TinyViT-5M encoder with SAM's decoder, medically pretrained;
            features at S/4 instead of S/16, logits at S).
        image_size: input size S (multiple of 16); features are S/16 (S/4 for litemedsam), logits 4x that.
        num_classes: number of foreground classes C (the decoder predicts C+1 with background).
        lora_rank: LoRA rank on q and v of every encoder block (0 = no LoRA).
        lora_alpha: LoRA alpha (scaling alpha / rank).
        encoder_finetune: ``lora`` (paper: only LoRA trains), ``full`` (whole encoder trains; sensible
            without a checkpoint), ``frozen`` (nothing in the encoder trains).
        slice_attention: local 3D awareness (inter/intra-slice attention) on or off (ablation).
        slice_attention_depth: number of slice-attention blocks.
        slice_attention_heads: attention heads of the slice attention.
        history: global 3D awareness (history tokens) on or off (ablation).
        history_tokens: number K of history tokens.
        box_prompts: box prompt generator on or off (off = no prompt tokens; ablation).
        box_decoder_layers: decoder layers of the box prompt generator.
        box_decoder_heads: attention heads of the box prompt generator.
        box_decoder_ffn_dim: FFN width of the box prompt generator.
        sam_checkpoint: path to an official SAM checkpoint (``sam_vit_b_01ec64.pth`` format) or to
            ``lite_medsam.pth`` for litemedsam; the name ``litemedsam`` means the file fetched by
            ``sautomed weights litemedsam`` (its cache); None or "" = random initialisation.
        grad_checkpointing: activation checkpointing of the encoder blocks in training (saves memory).
        patch_size: patch side of the ``tiny`` encoder (16 as SAM; 8 gives a 4x finer token grid at 4x the
            encoder cost). The official ViTs and litemedsam keep their own.
        feature_pool: average-pool the encoder's features by this factor before everything else (1 = off):
            the decoder chain costs about k^2 less (litemedsam at S = 128: 32 x 32 -> 16 x 16 tokens, logits
            at S/2), at the price of resolution. The encoder still sees the full S x S slice.
        state_presence_gate: the next slice's state keeps a class only where this slice's presence head says
            it is there (box prompts on); a stray pixel then no longer carries a class down the chain.
        state_min_area: the next state keeps a class only with at least this many pixels (logit grid).
        state_largest_component: the next slice's anchor box is the box of the class's largest connected
            component, not of all its pixels (a far-off false positive no longer stretches it).
        decoder: ``joint`` (one decoder pass per slice over all classes' tokens, new class tokens and MLPs)
            or ``per_class`` (SAM's own single-mask box path once per class, every SAM decoder weight used as
            trained, history tokens per class; its class-c logits are shifted by log sigmoid of the class's
            presence logit). ``per_class`` is what keeps a pretrained decoder's skill (see ``decoder.py``).
        sam_decoder_finetune: ``full`` (SAM's mask decoder and prompt encoder train) or ``frozen`` (they keep
            their checkpoint's weights; the new modules, the class embeddings / tokens among them, train).
            On a few training cases a fine-tuned pretrained decoder overfits them and loses what it knew.
        context: where the 3D context goes. ``decoder`` (the paper): the slice-attended features z and the
            history tokens enter SAM's decoder, the prompts carry the query features. ``prompts`` (needs
            ``decoder: per_class``): SAM's decoder sees the slice's own encoder features and SAM's own box
            embedding, exactly as published; z is the box prompt generator's memory and the history tokens
            are extra queries of the generator. With a pretrained decoder and a few training cases, what
            the decoder knew then cannot be overwritten by the new modules.
        dense_head: dense class proposals on the encoder features of the slice and its neighbours
            (``dense.py``, needs box prompts): a class absent from the previous slice gets its anchor from
            them, and they give the presence that gates the per-class decoder's logits.
        presence_gate: ``soft`` (that shift alone), ``hard`` or ``region`` (eval mode; ``gate_class_logits``
            in dense.py): a class the presence says is absent, or far from its proposal, cannot win a pixel.
    """

    backbone: Literal["tiny", "vit_b", "vit_l", "vit_h", "litemedsam"] = "tiny"
    image_size: int = 256
    num_classes: int = 4
    lora_rank: int = 4
    lora_alpha: float = 4.0
    encoder_finetune: Literal["lora", "full", "frozen"] = "lora"
    slice_attention: bool = True
    slice_attention_depth: int = 1
    slice_attention_heads: int = 8
    history: bool = True
    history_tokens: int = 4
    box_prompts: bool = True
    box_decoder_layers: int = 3
    box_decoder_heads: int = 8
    box_decoder_ffn_dim: int = 1024
    sam_checkpoint: str | None = None
    grad_checkpointing: bool = False
    patch_size: int = 16
    feature_pool: int = 1
    state_presence_gate: bool = False
    state_min_area: int = 0
    state_largest_component: bool = False
    decoder: Literal["joint", "per_class"] = "joint"
    presence_gate: Literal["soft", "hard", "region"] = "soft"
    sam_decoder_finetune: Literal["full", "frozen"] = "full"
    context: Literal["decoder", "prompts"] = "decoder"
    dense_head: bool = False


def check_network_config(cfg: NetworkConfig) -> None:
    """A ValueError naming the setting, for combinations that cannot work (the network checks on build)."""
    if cfg.context == "prompts" and (cfg.decoder != "per_class" or not cfg.box_prompts):
        raise UserError("network.context 'prompts' needs network.decoder: per_class and box_prompts on")
    if cfg.dense_head and not cfg.box_prompts:
        raise UserError("network.dense_head needs network.box_prompts on (it proposes their anchors)")
    gate = cfg.presence_gate
    if gate != "soft" and not (
        cfg.decoder == "per_class" and cfg.box_prompts and (cfg.dense_head or gate == "hard")
    ):
        raise UserError(
            f"network.presence_gate: {gate} needs box prompts, decoder: per_class (region: dense_head)"
        )
