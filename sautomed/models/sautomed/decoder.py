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
