"""The 3D mask decoder: segment-anything's ``MaskDecoder`` with 3D upscaling and a fusion hook.

Built by segment-anything's own ``MaskDecoder.__init__`` (iou token, 4 mask tokens, hypernetwork MLPs, IoU
head) around segment-anything's ``TwoWayTransformer`` (depth 2, dim 384, 8 heads, MLP 2048), used as is: the
g^3 grid is flattened and passed as a (B, C, g^3, 1) "image", which the transformer flattens to g^3 tokens.
Only the upscaling is replaced by its 3D form (SAM-Med3D's)::

    ConvTranspose3d(C -> C/4, k2 s2), LayerNorm3d, GELU, ConvTranspose3d(C/4 -> C/8, k2 s2), GELU

so that, at 128^3 input (g = 8, C = 384): src (B, 384, 8^3) -> (B, 48, 32^3); mask k's logits are
``hyper_k(token_k) . upscaled`` -> low-res logits (B, 4, 32, 32, 32), of which mask 0 is used
(``multimask_output=False``). State-dict names are SAM-Med3D's ``mask_decoder.*``.

``src`` is what SAM computes as ``E_I + E_M``; here a ``fusion`` module (the MEA, or the plain sum) may be
passed in, and its output is the transformer's image input.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from sautomed.models.msam.common import LayerNorm3d
from sautomed.models.sam.upstream import MaskDecoder, TwoWayTransformer

FusionFn = Callable[[Tensor, Tensor], Tensor]


class MaskDecoder3D(MaskDecoder):
    """SAM's mask decoder on a 3D token grid.

    Args:
        transformer_dim: C (384).
        transformer_depth: two-way transformer depth (2).
        transformer_heads: its heads (8).
        transformer_mlp_dim: its MLP size (2048).
        num_multimask_outputs: extra mask tokens (3, as SAM; only mask 0 is used).
        iou_head_depth: IoU head layers (3).
        iou_head_hidden_dim: IoU head width (256).
    """

    def __init__(
        self,
        transformer_dim: int = 384,
        transformer_depth: int = 2,
        transformer_heads: int = 8,
        transformer_mlp_dim: int = 2048,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__(
            transformer_dim=transformer_dim,
            transformer=TwoWayTransformer(
                depth=transformer_depth,
                embedding_dim=transformer_dim,
                num_heads=transformer_heads,
                mlp_dim=transformer_mlp_dim,
            ),
            num_multimask_outputs=num_multimask_outputs,
            activation=nn.GELU,
            iou_head_depth=iou_head_depth,
            iou_head_hidden_dim=iou_head_hidden_dim,
        )
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose3d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm3d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose3d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )

    def forward(  # type: ignore[override]
        self,
        image_embeddings: Tensor,
        image_pe: Tensor,
        sparse_prompt_embeddings: Tensor,
        dense_prompt_embeddings: Tensor,
        multimask_output: bool = False,
        fusion: FusionFn | None = None,
    ) -> tuple[Tensor, Tensor]:
        """E_I (B, C, g, g, g), PE (1, C, g, g, g), points (B, N, C), E_M (B, C, g, g, g)
        -> logits (B, 1 or 3, 4g, 4g, 4g), IoU predictions (B, 1 or 3)."""
        masks, iou_pred = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, fusion
        )
        sel = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, sel], iou_pred[:, sel]

    def predict_masks(  # type: ignore[override]
        self,
        image_embeddings: Tensor,
        image_pe: Tensor,
        sparse_prompt_embeddings: Tensor,
        dense_prompt_embeddings: Tensor,
        fusion: FusionFn | None = None,
    ) -> tuple[Tensor, Tensor]:
        b = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)  # (1 + M, C)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(b, -1, -1), sparse_prompt_embeddings], dim=1)
        if image_embeddings.shape[0] != b:  # one image, several prompts
            image_embeddings = image_embeddings.expand(b, -1, -1, -1, -1)
        if fusion is None:
            src = image_embeddings + dense_prompt_embeddings  # SAM
        else:
            src = fusion(image_embeddings, dense_prompt_embeddings)
        _, c, d, h, w = src.shape
        # SAM's transformer flattens a (B, C, h, w) image to h*w tokens: pass the g^3 tokens as (g^3, 1)
        hs, keys = self.transformer(
            src.flatten(2).unsqueeze(-1), image_pe.flatten(2).unsqueeze(-1), tokens
        )  # hs (B, T, C), keys (B, g^3, C)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]  # (B, M, C)
        upscaled = self.output_upscaling(keys.transpose(1, 2).reshape(b, c, d, h, w))  # (B, C/8, 4g, 4g, 4g)
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )  # (B, M, C/8)
        _, c8, d4, h4, w4 = upscaled.shape
        masks = (hyper_in @ upscaled.view(b, c8, -1)).view(b, -1, d4, h4, w4)  # (B, M, 4g, 4g, 4g)
        return masks, self.iou_prediction_head(iou_token_out)
