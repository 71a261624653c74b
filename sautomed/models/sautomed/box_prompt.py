"""Box prompt generator (paper sec. 2.3), DAB-DETR style.

One query per foreground class. Its anchor is that class's box in the previous slice's prediction, or a
learnable default anchor of the class when the class was absent there (and at the first slice). Its content is
a learnable semantic embedding of the class. Each decoder layer (self-attention among the queries,
cross-attention to the slice features z with SAM's dense positional encoding, FFN) uses a query positional
embedding made from the sine embedding of the current anchor (cx, cy, w, h) through an MLP, and refines the
box by a delta in inverse-sigmoid space. Outputs per class: box (cxcywh in [0, 1]), presence logit, query
feature.

Simplifications against DAB-DETR (no auxiliary per-layer losses here): positional and content parts are added,
not concatenated; no width/height modulation of the cross-attention; refined anchors are not detached between
layers, so the box loss on the final box reaches every layer and the default anchors.

The prompt for SAM's decoder (``prompt_tokens``): SAM's prompt-encoder box embedding of the box (2 corner
tokens, from ``PromptEncoder._embed_boxes`` on xyxy pixel coordinates of S) plus a projection of the query
feature, 2 tokens per class.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from sautomed.models.sam.upstream import MLP, PromptEncoder
from sautomed.models.sautomed.boxes import box_cxcywh_to_xyxy


def inverse_sigmoid(x: Tensor, eps: float = 1e-4) -> Tensor:
    x = x.clamp(eps, 1 - eps)
    return torch.log(x / (1 - x))


def sine_embed(boxes: Tensor, num_feats: int, temperature: float = 10000.0) -> Tensor:
    """DAB-DETR's sine embedding: (..., 4) in [0, 1] -> (..., 4 * num_feats)."""
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=boxes.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)  # (F,)
    pos = boxes.unsqueeze(-1).float() * (2 * math.pi) / dim_t  # (..., 4, F)
    pos = torch.stack([pos[..., 0::2].sin(), pos[..., 1::2].cos()], dim=-1).flatten(-2)  # (..., 4, F)
    return pos.flatten(-2).to(boxes.dtype)  # (..., 4F)


class BoxDecoderLayer(nn.Module):
    """Post-norm DETR decoder layer: self-attention, cross-attention to the slice features, FFN."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(), nn.Linear(ffn_dim, dim))
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, tgt: Tensor, query_pos: Tensor, memory: Tensor, memory_pos: Tensor) -> Tensor:
        """tgt, query_pos: (B, C, D); memory: (B, N, D); memory_pos: (1, N, D). Returns (B, C, D)."""
        q = tgt + query_pos
        tgt = self.norm1(tgt + self.self_attn(q, q, tgt, need_weights=False)[0])
        q = tgt + query_pos
        tgt = self.norm2(tgt + self.cross_attn(q, memory + memory_pos, memory, need_weights=False)[0])
        return self.norm3(tgt + self.ffn(tgt))


class BoxPromptGenerator(nn.Module):
    """Per-class box queries refined over ``num_layers`` decoder layers."""

    def __init__(
        self,
        num_classes: int,
        dim: int = 256,
        num_layers: int = 3,
        num_heads: int = 8,
        ffn_dim: int = 1024,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dim = dim
        self.semantic = nn.Embedding(num_classes, dim)  # content query per class
        # default anchors as logits: sigmoid(0) = a centred box of half the image
        self.default_anchor_logits = nn.Parameter(torch.zeros(num_classes, 4))
        self.query_pos_head = MLP(2 * dim, dim, dim, 2)  # sine(4 coords x dim/2) -> dim
        self.layers = nn.ModuleList(BoxDecoderLayer(dim, num_heads, ffn_dim) for _ in range(num_layers))
        self.norm = nn.LayerNorm(dim)
        self.bbox_head = MLP(dim, dim, 4, 3)  # shared by the layers, as in DAB-DETR
        nn.init.zeros_(self.bbox_head.layers[-1].weight)
        nn.init.zeros_(self.bbox_head.layers[-1].bias)
        self.presence_head = nn.Linear(dim, 1)
        self.feature_proj = nn.Linear(dim, 2 * dim)  # query feature -> one addend per box corner token

    def default_anchors(self) -> Tensor:
        """(C, 4) learnable default anchors, cxcywh in (0, 1)."""
        return self.default_anchor_logits.sigmoid()

    def anchors(self, prev_boxes: Tensor, prev_present: Tensor) -> Tensor:
        """Previous slice's boxes where the class was present, else the default anchor: (B, C, 4)."""
        default = self.default_anchors().unsqueeze(0).expand_as(prev_boxes)
        return torch.where(prev_present.unsqueeze(-1), prev_boxes.to(default.dtype), default)

    def forward(
        self, z: Tensor, pe: Tensor, prev_boxes: Tensor, prev_present: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """z: (B, D, h, w) slice features; pe: (1, D, h, w); prev_boxes (B, C, 4); prev_present (B, C) bool.

        Returns boxes (B, C, 4) cxcywh in [0, 1], presence logits (B, C), query features (B, C, D).
        """
        boxes, presence, out, _ = self.forward_with_history(z, pe, prev_boxes, prev_present, None)
        return boxes, presence, out

    def forward_with_history(
        self, z: Tensor, pe: Tensor, prev_boxes: Tensor, prev_present: Tensor, history: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """``forward`` with K history tokens (B, K, D) as extra queries (no anchor, no box): they attend to
        the class queries and to the slice in every layer. Returns ``forward``'s outputs and the updated
        history tokens (B, K, D) (None without history)."""
        B, C = z.shape[0], self.num_classes
        memory = z.flatten(2).transpose(1, 2)  # (B, hw, D)
        memory_pos = pe.flatten(2).transpose(1, 2)  # (1, hw, D)
        anchor = self.anchors(prev_boxes, prev_present)  # (B, C, 4)
        tgt = self.semantic.weight.unsqueeze(0).expand(B, -1, -1)  # (B, C, D)
        K = 0 if history is None else history.shape[1]
        if history is not None:
            tgt = torch.cat([tgt, history.to(tgt.dtype)], dim=1)  # (B, C+K, D)
        out = tgt
        for layer in self.layers:
            query_pos = self.query_pos_head(sine_embed(anchor, self.dim // 2))  # (B, C, D)
            if K:
                query_pos = torch.cat([query_pos, query_pos.new_zeros(B, K, self.dim)], dim=1)
            tgt = layer(tgt, query_pos, memory, memory_pos)
            out = self.norm(tgt)
            anchor = (self.bbox_head(out[:, :C]) + inverse_sigmoid(anchor)).sigmoid()  # refined box
        presence = self.presence_head(out[:, :C]).squeeze(-1)  # (B, C)
        return anchor, presence, out[:, :C], (out[:, C:] if K else None)

    def prompt_tokens(self, prompt_encoder: PromptEncoder, boxes: Tensor, features: Tensor | None) -> Tensor:
        """SAM box embedding of each class's box + projected query feature -> (B, 2C, D) sparse prompts.

        ``features`` None: SAM's box embedding alone (the published model's prompt for that box)."""
        B, C, _ = boxes.shape
        H, W = prompt_encoder.input_image_size
        scale = boxes.new_tensor([W, H, W, H])
        # cxcywh [0, 1] (pixel edges) -> SAM's pixel-index box: max index = edge * size - 1
        xyxy = box_cxcywh_to_xyxy(boxes) * scale - boxes.new_tensor([0.0, 0.0, 1.0, 1.0])
        corners = prompt_encoder._embed_boxes(xyxy.reshape(B * C, 4)).view(B, C, 2, -1)  # (B, C, 2, D)
        tokens = corners if features is None else corners + self.feature_proj(features).view(B, C, 2, -1)
        return tokens.flatten(1, 2)  # (B, 2C, D): class c -> tokens 2c, 2c+1
