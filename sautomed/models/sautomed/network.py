"""3D-SAutoMed: SAM (+LoRA) encoder, slice attention, box prompts, history tokens, multi-class decoder.

Use: ``f = net.encode(slices)`` once per slice, then for each slice t in propagation order
``out = net.step(f[t-1], f[t], f[t+1], state); state = out.state``, starting from ``net.initial_state(B)``.
``step`` is batched over independent chains (a training batch, or inference's two chains).

State-dict names of the SAM parts are SAM's own (``image_encoder.*``, ``prompt_encoder.*``,
``mask_decoder.transformer.*``, ``mask_decoder.output_upscaling.*``), so official checkpoints load directly.
"""

from __future__ import annotations

import logging
import os
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from sautomed.errors import UserError
from sautomed.models.sam.build import PIXEL_MEAN, PIXEL_STD, build_sam_parts, init_random_position_embedding
from sautomed.models.sam.checkpoint import LoadReport, load_sam_checkpoint
from sautomed.models.sam.lora import EncoderFinetune, apply_lora, set_encoder_trainable
from sautomed.models.sam.upstream import ImageEncoderViT
from sautomed.models.sam.weights import resolve_weights
from sautomed.models.sautomed.box_prompt import BoxPromptGenerator
from sautomed.models.sautomed.boxes import boxes_from_labels
from sautomed.models.sautomed.config import NetworkConfig, check_network_config
from sautomed.models.sautomed.decoder import SAM_DECODER_UNUSED, MultiClassMaskDecoder, PerClassMaskDecoder
from sautomed.models.sautomed.dense import (
    DenseHead,
    dense_boxes,
    dense_presence,
    gate_class_logits,
    largest_component_2d,
)
from sautomed.models.sautomed.history import HistoryTokens
from sautomed.models.sautomed.slice_attention import SliceAttention

log = logging.getLogger(__name__)

# state-dict prefixes of modules SAM does not have (may be missing from a SAM checkpoint)
NEW_MODULE_PREFIXES = (
    "slice_attention.",
    "history.",
    "box_prompt.",
    "mask_decoder.class_tokens.",
    "mask_decoder.class_hypernetworks_mlps.",
    "mask_decoder.class_embed.",
    "dense_head.",
)


class State(NamedTuple):
    """What one slice passes to the next."""

    history: Tensor | None  # (B, K, D) ((B, C, K, D) with the per-class decoder), or None when history is off
    boxes: Tensor  # (B, C, 4) previous slice's predicted boxes (cxcywh, [0, 1])
    present: Tensor  # (B, C) bool: class present in the previous slice's prediction


class StepOutput(NamedTuple):
    logits: Tensor  # (B, C+1, S/4, S/4)
    boxes: Tensor  # (B, C, 4) generator's boxes for this slice (zeros when box prompts are off)
    presence: Tensor  # (B, C) presence logits (zeros when box prompts are off)
    state: State  # for the next slice
    dense: Tensor | None = None  # (B, C+1, h, w) dense proposals (network.dense_head), else None


class SAutoMedNet(nn.Module):
    """The 3D-SAutoMed network. See the module docstring for the calling pattern."""

    def __init__(self, cfg: NetworkConfig) -> None:
        super().__init__()
        self.cfg = cfg
        parts = build_sam_parts(cfg.backbone, cfg.image_size, cfg.patch_size, cfg.feature_pool)
        D = parts.prompt_encoder.embed_dim
        self.image_encoder = parts.image_encoder
        self.prompt_encoder = parts.prompt_encoder
        check_network_config(cfg)
        decoder_cls = PerClassMaskDecoder if cfg.decoder == "per_class" else MultiClassMaskDecoder
        self.mask_decoder = decoder_cls(parts.mask_decoder, cfg.num_classes)
        self.slice_attention = (
            SliceAttention(D, cfg.slice_attention_depth, cfg.slice_attention_heads)
            if cfg.slice_attention
            else None
        )
        self.history = HistoryTokens(D, cfg.history_tokens) if cfg.history else None
        self.box_prompt = (
            BoxPromptGenerator(
                cfg.num_classes, D, cfg.box_decoder_layers, cfg.box_decoder_heads, cfg.box_decoder_ffn_dim
            )
            if cfg.box_prompts
            else None
        )
        self.dense_head = DenseHead(D, cfg.num_classes) if cfg.dense_head else None
        if self.box_prompt is not None and cfg.decoder == "per_class":
            # the prompt tokens start as SAM's own box embedding
            nn.init.zeros_(self.box_prompt.feature_proj.weight)
            nn.init.zeros_(self.box_prompt.feature_proj.bias)
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(1, 3, 1, 1), persistent=False)

        if cfg.lora_rank > 0:
            apply_lora(self.image_encoder, cfg.lora_rank, cfg.lora_alpha)
        self.load_report: LoadReport | None = None
        if cfg.sam_checkpoint:
            self.load_report = self.load_sam_checkpoint(resolve_weights(cfg.sam_checkpoint))
            log.info("%s", self.load_report)
        else:
            init_random_position_embedding(self.image_encoder)
        self._set_trainable(cfg.encoder_finetune)

    # ---------------------------------------------------------------- properties
    @property
    def num_classes(self) -> int:
        return self.cfg.num_classes

    @property
    def feature_dim(self) -> int:
        """Channels D of the encoder output / decoder (256 for every variant)."""
        return self.prompt_encoder.embed_dim

    @property
    def feature_size(self) -> int:
        """Side of the encoder output: S/16 (S/4 for litemedsam)."""
        return self.prompt_encoder.image_embedding_size[0]

    @property
    def logit_size(self) -> int:
        """Side of the logits: 4x the features (S/4; S for litemedsam)."""
        return 4 * self.feature_size

    # ---------------------------------------------------------------- setup
    def _set_trainable(self, encoder_finetune: EncoderFinetune) -> None:
        set_encoder_trainable(self.image_encoder, encoder_finetune)
        # Prompt-encoder parts this method never uses (mask input, point labels; box corners without box
        # prompts) stay frozen, so that exactly the trainable parameters receive gradients.
        unused = ["mask_downscaling.", "point_embeddings.0.", "point_embeddings.1.", "not_a_point_embed."]
        if self.box_prompt is None:
            unused += ["point_embeddings.2.", "point_embeddings.3."]
        for name, p in self.prompt_encoder.named_parameters():
            p.requires_grad_(not name.startswith(tuple(unused)) and self.cfg.sam_decoder_finetune == "full")
        if self.cfg.context == "prompts":  # the decoder's input is SAM's own: nothing new enters it
            self.mask_decoder.class_embed.weight.requires_grad_(False)
            if self.box_prompt is not None:
                self.box_prompt.feature_proj.requires_grad_(False)
        if self.cfg.sam_decoder_finetune == "frozen":
            own = "mask_decoder."
            new = tuple(k[len(own) :] for k in NEW_MODULE_PREFIXES if k.startswith(own))
            for name, p in self.mask_decoder.named_parameters():
                if not name.startswith(new):
                    p.requires_grad_(False)

    def load_sam_checkpoint(self, source: str | os.PathLike | dict[str, Tensor]) -> LoadReport:
        """Load an official SAM checkpoint (path or state dict); interpolates for S != 1024.

        Raises ``SamCheckpointError`` (naming the keys) when keys other than new modules' are missing, when
        the checkpoint has keys this model neither has nor knows, or when shapes do not fit.
        """
        global_rel_pos = {
            f"image_encoder.blocks.{i}.attn.rel_pos_{a}"
            for i, blk in enumerate(getattr(self.image_encoder, "blocks", []))  # SAM's ViT only
            if blk.window_size == 0
            for a in "hw"
        }
        report = load_sam_checkpoint(
            self,
            source,
            is_new_key=lambda k: k.startswith(NEW_MODULE_PREFIXES) or "lora_" in k,
            known_unused=lambda k: k.startswith(SAM_DECODER_UNUSED),
            global_rel_pos_keys=global_rel_pos,
            derived=getattr(self.mask_decoder, "init_from_sam", None),  # the joint decoder's new tokens
        )
        self.load_report = report
        return report

    # ---------------------------------------------------------------- forward pieces
    def encode(self, images: Tensor) -> Tensor:
        """(N, S, S) slices in [0, 1] (or (N, 1|3, S, S)) -> (N, D, h, w) features (h = S/16, or S/4)."""
        x = images.unsqueeze(1) if images.dim() == 3 else images  # (N, 1|3, S, S)
        S = self.cfg.image_size
        if x.dim() != 4 or x.shape[1] not in (1, 3) or x.shape[-2:] != (S, S):
            raise UserError(f"expected (N, {S}, {S}) slices, got {tuple(images.shape)}")
        x = x.expand(-1, 3, -1, -1)  # (N, 3, S, S)
        enc = self.image_encoder
        if not isinstance(enc, ImageEncoderViT):  # an encoder object: (N, 3, S, S) in [0, 1] -> features
            enc.grad_checkpointing = self.cfg.grad_checkpointing
            return self._pool(enc(x))
        x = (x * 255.0 - self.pixel_mean) / self.pixel_std  # SAM's pixel normalisation
        x = enc.patch_embed(x)  # (N, S/16, S/16, E)
        if enc.pos_embed is not None:
            x = x + enc.pos_embed
        use_ckpt = self.cfg.grad_checkpointing and self.training and torch.is_grad_enabled()
        for blk in enc.blocks:
            x = checkpoint(blk, x, use_reentrant=False) if use_ckpt else blk(x)
        return self._pool(enc.neck(x.permute(0, 3, 1, 2)))  # (N, D, S/16, S/16)

    def _pool(self, feats: Tensor) -> Tensor:
        """(N, D, h, w) -> (N, D, h/k, w/k) for ``feature_pool`` k (identity for k = 1)."""
        k = self.cfg.feature_pool
        return feats if k == 1 else torch.nn.functional.avg_pool2d(feats, k)

    def initial_state(self, batch: int, device: torch.device | None = None) -> State:
        """Initial history tokens, default anchors as boxes, nothing present."""
        C = self.cfg.num_classes
        ref = self.pixel_mean
        device = ref.device if device is None else torch.device(device)
        history = self._initial_history(batch).to(device) if self.history is not None else None
        if self.box_prompt is not None:
            boxes = self.box_prompt.default_anchors().detach().unsqueeze(0).expand(batch, -1, -1).to(device)
        else:
            boxes = torch.zeros(batch, C, 4, device=device)
        present = torch.zeros(batch, C, dtype=torch.bool, device=device)
        return State(history, boxes, present)

    def _initial_history(self, batch: int) -> Tensor:
        """(B, K, D) learnable initial history, or (B, C, K, D) (one per class) with the per-class decoder."""
        assert self.history is not None
        h = self.history.initial_state(batch)
        if self.cfg.decoder == "per_class" and self.cfg.context == "decoder":
            h = h.unsqueeze(1).expand(-1, self.cfg.num_classes, -1, -1)
        return h

    def step(
        self,
        f_prev: Tensor,
        f_t: Tensor,
        f_next: Tensor,
        state: State,
        forced_boxes: tuple[Tensor, Tensor] | None = None,
    ) -> StepOutput:
        """One slice for B independent chains. f_*: (B, D, S/16, S/16) features of t-1, t, t+1.

        ``forced_boxes`` (training only, ``teacher.py``): (boxes (B, C, 4), use (B, C) bool): the prompt of
        class c of sample b is made from the given box where ``use`` is set, instead of the generator's
        box (its query feature still enters); the returned boxes stay the generator's (its losses)."""
        B = f_t.shape[0]
        C = self.cfg.num_classes
        pe = self.prompt_encoder.get_dense_pe()  # (1, D, h, w)
        z = self.slice_attention(f_prev, f_t, f_next, pe) if self.slice_attention is not None else f_t

        history = None
        if self.history is not None:
            history = state.history if state.history is not None else self._initial_history(B)
        in_prompts = self.cfg.context == "prompts"
        prompts, history_out = None, None
        proposals = self.dense_head(f_prev, f_t, f_next) if self.dense_head is not None else None
        anchor_boxes, anchor_present = state.boxes, state.present
        if proposals is not None:  # a class the previous slice lacks: the dense proposal's box, if any
            d_boxes, d_present = dense_boxes(proposals, C)
            d_boxes = d_boxes.to(state.boxes.dtype)
            anchor_boxes = torch.where(state.present.unsqueeze(-1), state.boxes, d_boxes)
            anchor_present = state.present | d_present
        if self.box_prompt is not None:
            # boxes (B, C, 4), presence (B, C), queries (B, C, D)
            boxes, presence, queries, history_out = self.box_prompt.forward_with_history(
                z, pe, anchor_boxes, anchor_present, history if in_prompts else None
            )
            # prompts context: the box enters SAM as a given box does (no gradient through its Fourier
            # embedding, whose high frequencies swamp the box loss); the box and presence losses train it
            prompt_boxes = boxes.detach() if in_prompts else boxes
            if forced_boxes is not None:
                given, use = forced_boxes
                prompt_boxes = torch.where(use.unsqueeze(-1), given.to(boxes.dtype), prompt_boxes)
            prompts = self.box_prompt.prompt_tokens(
                self.prompt_encoder, prompt_boxes, None if in_prompts else queries
            )  # (B, 2C, D)
        else:
            boxes = f_t.new_zeros(B, C, 4)
            presence = f_t.new_zeros(B, C)

        dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)  # SAM's "no mask" prompt
        if in_prompts:  # SAM's decoder as published: the slice's own features, SAM's box prompt
            logits, _ = self.mask_decoder(f_t, pe, dense, None, prompts)
        else:
            logits, history_out = self.mask_decoder(z, pe, dense, history, prompts)  # (B, C+1, S/4, S/4)
        if self.cfg.decoder == "per_class" and self.box_prompt is not None:
            # with dense proposals p(c in the slice) is theirs (it carries over to unseen cases), detached:
            # the chain's loss bent them towards the training cases (001 held out: 0.44 against 0.89)
            gate_logit = presence if proposals is None else dense_presence(proposals.detach())
            mode = "soft" if self.training else self.cfg.presence_gate  # training stays soft
            logits = gate_class_logits(logits, gate_logit, proposals, mode)

        next_history = None
        if self.history is not None:
            next_history = self.history.filter(history_out)
        with torch.no_grad():  # the next anchors come from this slice's prediction
            next_boxes, next_present = self._next_boxes(logits, presence)  # (B, C, 4), (B, C)
        next_state = State(next_history, next_boxes.to(logits.dtype), next_present)
        return StepOutput(logits, boxes, presence, next_state, proposals)

    def _next_boxes(self, logits: Tensor, presence: Tensor) -> tuple[Tensor, Tensor]:
        """The anchors handed to the next slice: boxes of this slice's argmax labels, gated as configured."""
        cfg, C = self.cfg, self.cfg.num_classes
        labels = logits.argmax(dim=1)  # (B, h, w)
        if cfg.state_largest_component:
            labels = largest_component_2d(labels, C)
        boxes, present = boxes_from_labels(labels, C)
        if cfg.state_min_area > 0:
            area = (
                labels.unsqueeze(1) == torch.arange(1, C + 1, device=labels.device).view(1, -1, 1, 1)
            ).sum(dim=(2, 3))  # (B, C)
            present = present & (area >= cfg.state_min_area)
        if cfg.state_presence_gate and self.box_prompt is not None:
            present = present & (presence > 0)
        return boxes * present.unsqueeze(-1), present


def build_network(cfg: NetworkConfig) -> SAutoMedNet:
    """Build the network (loads ``cfg.sam_checkpoint`` when set)."""
    return SAutoMedNet(cfg)
