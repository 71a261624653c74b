"""Multi-class mask decoder on SAM's own two-way transformer and output upscaling.

Tokens = [mask tokens (C+1: background + C classes) | history tokens (K) | prompt tokens (2C)]. One pass of
SAM's ``TwoWayTransformer`` per slice (not one per prompt set, as ``MaskDecoder.predict_masks`` would do with
``repeat_interleave``), whatever C is. Each mask token has its own hypernetwork MLP; logits for class i are
the dot product of its MLP output with SAM's upscaled image embedding: (B, C+1, 4h, 4w) = (B, C+1, S/4, S/4).
SAM's IoU head, IoU token and its 4 mask tokens are not used; with a checkpoint, every class token starts as
SAM's first mask token and every class MLP as SAM's first hypernetwork MLP (see ``init_from_sam``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from sautomed.models.sam.upstream import MLP, MaskDecoder

# checkpoint prefixes of SAM's mask decoder that this decoder does not use
SAM_DECODER_UNUSED = (
    "mask_decoder.iou_token.",
    "mask_decoder.iou_prediction_head.",
    "mask_decoder.mask_tokens.",
    "mask_decoder.output_hypernetworks_mlps.",
)


class MultiClassMaskDecoder(nn.Module):
    """Wraps the ``transformer`` and ``output_upscaling`` of a SAM ``MaskDecoder`` (same state-dict names)."""

    def __init__(self, sam_decoder: MaskDecoder, num_classes: int) -> None:
        super().__init__()
        self.transformer = sam_decoder.transformer
        self.output_upscaling = sam_decoder.output_upscaling
        dim = sam_decoder.transformer_dim
        self.transformer_dim = dim
        self.num_mask_tokens = num_classes + 1
        self.class_tokens = nn.Embedding(self.num_mask_tokens, dim)
        self.class_hypernetworks_mlps = nn.ModuleList(
            MLP(dim, dim, dim // 8, 3) for _ in range(self.num_mask_tokens)
        )

    def forward(
        self,
        image_embeddings: Tensor,
        image_pe: Tensor,
        dense_embeddings: Tensor,
        history: Tensor | None,
        prompts: Tensor | None,
    ) -> tuple[Tensor, Tensor | None]:
        """
        Args:
            image_embeddings: (B, D, h, w) slice features z.
            image_pe: (1, D, h, w) SAM's dense positional encoding.
            dense_embeddings: (1 or B, D, 1 or h, 1 or w) SAM's dense prompt (its "no mask" embedding).
            history: (B, K, D) history tokens, or None.
            prompts: (B, P, D) sparse prompt tokens, or None.

        Returns:
            logits (B, C+1, 4h, 4w) and the updated history tokens (B, K, D) (None without history).
        """
        B, D, h, w = image_embeddings.shape
        tokens = [self.class_tokens.weight.unsqueeze(0).expand(B, -1, -1)]  # (B, C+1, D)
        if history is not None:
            tokens.append(history)
        if prompts is not None:
            tokens.append(prompts)
        tokens = torch.cat(tokens, dim=1)  # (B, C+1 + K + P, D)

        src = image_embeddings + dense_embeddings
        pos = image_pe.expand(B, -1, -1, -1)
        hs, src = self.transformer(src, pos, tokens)  # hs (B, T, D), src (B, hw, D)
        mask_out = hs[:, : self.num_mask_tokens]  # (B, C+1, D)
        history_out = None
        if history is not None:
            history_out = hs[:, self.num_mask_tokens : self.num_mask_tokens + history.shape[1]]  # (B, K, D)

        up = self.output_upscaling(src.transpose(1, 2).reshape(B, D, h, w))  # (B, D/8, 4h, 4w)
        hyper = torch.stack(
            [mlp(mask_out[:, i]) for i, mlp in enumerate(self.class_hypernetworks_mlps)], dim=1
        )  # (B, C+1, D/8)
        b, c, H, W = up.shape
        logits = (hyper @ up.view(b, c, H * W)).view(b, -1, H, W)  # (B, C+1, 4h, 4w)
        return logits, history_out

    def init_from_sam(
        self, sd: Mapping[str, Tensor], prefix: str = "mask_decoder."
    ) -> dict[str, tuple[Tensor, str]]:
        """Tensors for the class tokens / MLPs from a SAM state dict: {own key: (tensor, source key)}.

        Keys are relative to this module, prefixed by ``prefix`` on both sides.
        """
        out: dict[str, tuple[Tensor, str]] = {}
        src = f"{prefix}mask_tokens.weight"
        if src in sd:
            first = sd[src][0:1]  # (1, D)
            out[f"{prefix}class_tokens.weight"] = (first.expand(self.num_mask_tokens, -1).clone(), src)
        mlp0 = f"{prefix}output_hypernetworks_mlps.0."
        for key in self.class_hypernetworks_mlps[0].state_dict():
            if mlp0 + key in sd:
                for i in range(self.num_mask_tokens):
                    out[f"{prefix}class_hypernetworks_mlps.{i}.{key}"] = (sd[mlp0 + key].clone(), mlp0 + key)
        return out


class PerClassMaskDecoder(nn.Module):
    """SAM's own single-mask box path, run once per class (batched over classes): pretraining carries over.

    For each class c the tokens are SAM's ``[iou token | 4 mask tokens]``, then class c's 2 box prompt
    tokens, then class c's K history tokens; SAM's first mask token (plus a class embedding that starts at
    zero) and its first hypernetwork MLP give class c's mask logits, as with ``multimask_output=False``. All
    of SAM's decoder weights load under their own names, so with a pretrained checkpoint, an empty history and
    the box as its only prompt, class c's mask is the published model's for that box (measured on real MR at
    S = 128: dropping SAM's iou and other mask tokens, as the joint decoder does, costs 0.93 -> 0.70 DSC
    from ground-truth boxes). The cost is C decoder passes per slice instead of one.

    Background has the constant logit 0, so class c wins a pixel where its mask logit is positive (SAM's
    threshold) and is the largest.
    """

    def __init__(self, sam_decoder: MaskDecoder, num_classes: int) -> None:
        super().__init__()
        self.transformer = sam_decoder.transformer
        self.output_upscaling = sam_decoder.output_upscaling
        self.iou_token = sam_decoder.iou_token
        self.mask_tokens = sam_decoder.mask_tokens
        self.output_hypernetworks_mlps = sam_decoder.output_hypernetworks_mlps
        self.iou_prediction_head = sam_decoder.iou_prediction_head
        # loaded with the checkpoint but off the single-mask path: frozen (no gradient ever reaches them)
        for module in (self.iou_prediction_head, *self.output_hypernetworks_mlps[1:]):
            module.requires_grad_(False)
        self.transformer_dim = sam_decoder.transformer_dim
        self.num_classes = num_classes
        self.class_embed = nn.Embedding(num_classes, self.transformer_dim)
        nn.init.zeros_(self.class_embed.weight)

    def forward(
        self,
        image_embeddings: Tensor,
        image_pe: Tensor,
        dense_embeddings: Tensor,
        history: Tensor | None,
        prompts: Tensor | None,
    ) -> tuple[Tensor, Tensor | None]:
        """``MultiClassMaskDecoder.forward``'s interface, with per-class history: ``history`` (B, C, K, D) or
        None, ``prompts`` (B, 2C, D) (class c: tokens 2c, 2c+1) or None. Returns logits (B, C+1, 4h, 4w)
        (background 0) and the updated history (B, C, K, D) (or None)."""
        B, D, h, w = image_embeddings.shape
        C = self.num_classes
        sam_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)  # (5, D)
        tokens = sam_tokens.unsqueeze(0).unsqueeze(0).repeat(B, C, 1, 1)  # (B, C, 5, D)
        tokens[:, :, 1] = tokens[:, :, 1] + self.class_embed.weight  # class c's mask token
        parts = [tokens]
        if prompts is not None:
            parts.append(prompts.view(B, C, -1, D))
        if history is not None:
            parts.append(history)
        tokens = torch.cat(parts, dim=2).flatten(0, 1)  # (B*C, T, D)

        src = (image_embeddings + dense_embeddings).repeat_interleave(C, dim=0)  # (B*C, D, h, w)
        pos = image_pe.expand(B * C, -1, -1, -1)
        hs, src = self.transformer(src, pos, tokens)  # hs (B*C, T, D), src (B*C, hw, D)
        history_out = None
        if history is not None:
            K = history.shape[2]
            history_out = hs[:, -K:].reshape(B, C, K, D)
        up = self.output_upscaling(src.transpose(1, 2).reshape(B * C, D, h, w))  # (B*C, D/8, 4h, 4w)
        hyper = self.output_hypernetworks_mlps[0](hs[:, 1])  # (B*C, D/8)
        H, W = up.shape[-2:]
        fg = (hyper.unsqueeze(1) @ up.flatten(2)).view(B, C, H, W)  # (B, C, 4h, 4w)
        return torch.cat([fg.new_zeros(B, 1, H, W), fg], dim=1), history_out
