"""The 3D ViT image encoder in SAM-Med3D's ``vit_b_ori`` layout, built on segment-anything's ViT blocks.

Layout at the default 128^3 input (SAM-Med3D's ``_build_sam3D_ori``)::

    image (B, 1, 128, 128, 128)
      patch_embed.proj: Conv3d(1 -> 768, kernel 16, stride 16)  -> (B, 8, 8, 8, 768)   channels last
      + pos_embed (1, 8, 8, 8, 768)                               learned, absolute
      12 x Block3D (12 heads, MLP 3072, decomposed 3D relative positions):
          blocks 2, 5, 8, 11: global attention over the 8^3 tokens (rel-pos tables 2*8-1 = 15 long)
          the others: windows of 14^3; the 8^3 grid is zero-padded to one 14^3 window (tables 27 long)
      neck: Conv3d 1x1 (768 -> 384, no bias), LayerNorm3d, Conv3d 3x3x3 (no bias), LayerNorm3d
    -> image embedding E_I (B, 384, 8, 8, 8)

segment-anything's ``Block`` and ``Attention`` are subclassed: their parameters keep SAM's names
(``norm1``, ``attn.qkv``, ``attn.proj``, ``attn.rel_pos_h``/``_w``, ``norm2``, ``mlp.lin1``/``lin2``) and
one table, ``attn.rel_pos_d``, is added for depth; these are exactly SAM-Med3D's state-dict names. Only
``forward`` changes (tokens on a 3D grid). ``get_rel_pos`` (1D table lookup) is segment-anything's own.
"""

from __future__ import annotations

from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sautomed.errors import UserError
from sautomed.models.msam.common import LayerNorm3d
from sautomed.models.sam.upstream import modeling

_vit = modeling.image_encoder  # segment_anything.modeling.image_encoder (already imported by upstream)
get_rel_pos = _vit.get_rel_pos


RelPosIndexing = Literal["sam_med3d", "decomposed"]


def add_decomposed_rel_pos_3d(
    attn: Tensor,
    q: Tensor,
    rel_pos: tuple[Tensor, Tensor, Tensor],
    q_size: tuple[int, int, int],
    k_size: tuple[int, int, int],
    indexing: RelPosIndexing = "sam_med3d",
) -> Tensor:
    """Decomposed relative positions (MViTv2) in 3D: attn + q.R_d + q.R_h + q.R_w.

    attn: (B*heads, Nq, Nk) with Nq = qd*qh*qw; q: (B*heads, Nq, head_dim); rel_pos: tables for d, h, w.

    ``decomposed``: each term broadcast over the key axes it does not depend on (MViTv2's intent).
    ``sam_med3d``: SAM-Med3D's (and M-SAM's) own broadcasting, which kept SAM's 2D index pattern: its
    ``rel_h[:, :, :, None, :, None]`` on a 5D tensor lands the key-h table on the key-w axis (and likewise
    for d and w), which only runs because the grids are cubes. Pretrained SAM-Med3D weights were learned
    with it, so it is the default; it needs q_size == k_size with all sides equal.
    """
    (qd, qh, qw), (kd, kh, kw) = q_size, k_size
    rd = get_rel_pos(qd, kd, rel_pos[0])  # (qd, kd, head_dim)
    rh = get_rel_pos(qh, kh, rel_pos[1])
    rw = get_rel_pos(qw, kw, rel_pos[2])
    b, _, dim = q.shape
    r_q = q.reshape(b, qd, qh, qw, dim)
    rel_d = torch.einsum("bdhwc,dkc->bdhwk", r_q, rd)  # (B*heads, qd, qh, qw, kd)
    rel_h = torch.einsum("bdhwc,hkc->bdhwk", r_q, rh)
    rel_w = torch.einsum("bdhwc,wkc->bdhwk", r_q, rw)
    a = attn.view(b, qd, qh, qw, kd, kh, kw)
    if indexing == "sam_med3d":  # SAM-Med3D's exact expression (see above)
        a = a + rel_d[:, :, :, :, None, None] + rel_h[:, :, :, None, :, None] + rel_w[:, :, :, None, None, :]
    else:
        a = a + rel_d[..., :, None, None] + rel_h[..., None, :, None] + rel_w[..., None, None, :]
    return a.view(b, qd * qh * qw, kd * kh * kw)


class Attention3D(_vit.Attention):
    """segment-anything's ViT attention on a (B, D, H, W, C) grid, with a third relative-position table.

    Args:
        dim: channels C.
        num_heads: attention heads.
        qkv_bias: bias on the fused qkv projection.
        use_rel_pos: add decomposed 3D relative positions.
        rel_pos_zero_init: (kept for SAM's signature) the tables start at zero.
        input_size: (D, H, W) token grid the tables are sized for.
        rel_pos_indexing: ``sam_med3d`` (its pretrained weights' broadcasting) or ``decomposed``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        use_rel_pos: bool = False,
        rel_pos_zero_init: bool = True,
        input_size: tuple[int, int, int] | None = None,
        rel_pos_indexing: RelPosIndexing = "sam_med3d",
    ) -> None:
        super().__init__(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            use_rel_pos=use_rel_pos,
            rel_pos_zero_init=rel_pos_zero_init,
            input_size=None if input_size is None else (input_size[1], input_size[2]),
        )
        if use_rel_pos:
            assert input_size is not None, "input_size is needed for relative positions"
            self.rel_pos_d = nn.Parameter(torch.zeros(2 * input_size[0] - 1, dim // num_heads))
        self.rel_pos_indexing = rel_pos_indexing

    def forward(self, x: Tensor) -> Tensor:
        b, d, h, w, _ = x.shape
        n = d * h * w
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # (3, B, heads, N, hd)
        q, k, v = qkv.reshape(3, b * self.num_heads, n, -1).unbind(0)  # (B*heads, N, hd) each
        attn = (q * self.scale) @ k.transpose(-2, -1)  # (B*heads, N, N)
        if self.use_rel_pos:
            tables = (self.rel_pos_d, self.rel_pos_h, self.rel_pos_w)
            attn = add_decomposed_rel_pos_3d(attn, q, tables, (d, h, w), (d, h, w), self.rel_pos_indexing)
        attn = attn.softmax(dim=-1)
        x = (attn @ v).view(b, self.num_heads, d, h, w, -1).permute(0, 2, 3, 4, 1, 5).reshape(b, d, h, w, -1)
        return self.proj(x)


def window_partition_3d(x: Tensor, window: int) -> tuple[Tensor, tuple[int, int, int]]:
    """(B, D, H, W, C) -> (B * nW, window, window, window, C), zero-padding each axis up to a multiple."""
    b, d, h, w, c = x.shape
    pd, ph, pw = ((window - s % window) % window for s in (d, h, w))
    if pd or ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph, 0, pd))
    dp, hp, wp = d + pd, h + ph, w + pw
    x = x.view(b, dp // window, window, hp // window, window, wp // window, window, c)
    x = x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, window, window, window, c)
    return x, (dp, hp, wp)


def window_unpartition_3d(
    windows: Tensor, window: int, padded: tuple[int, int, int], size: tuple[int, int, int]
) -> Tensor:
    """Inverse of :func:`window_partition_3d`: (B * nW, w, w, w, C) -> (B, D, H, W, C), padding removed."""
    dp, hp, wp = padded
    d, h, w = size
    b = windows.shape[0] // ((dp // window) * (hp // window) * (wp // window))
    x = windows.view(b, dp // window, hp // window, wp // window, window, window, window, -1)
    x = x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, dp, hp, wp, -1)
    return x[:, :d, :h, :w].contiguous()


class Block3D(_vit.Block):
    """segment-anything's ViT block (pre-norm attention + MLP, residuals) on a 3D token grid.

    Args:
        dim: channels C.
        num_heads: attention heads.
        mlp_ratio: MLP hidden size / C.
        qkv_bias: bias on qkv.
        norm_layer: token norm (LayerNorm, eps 1e-6 in SAM).
        act_layer: MLP activation.
        use_rel_pos: decomposed 3D relative positions.
        rel_pos_zero_init: tables start at zero.
        window_size: 0 = global attention; else cubic windows of this many tokens (grid zero-padded).
        input_size: (D, H, W) token grid (sizes the global blocks' tables).
        rel_pos_indexing: see :func:`add_decomposed_rel_pos_3d`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        act_layer: type[nn.Module] = nn.GELU,
        use_rel_pos: bool = False,
        rel_pos_zero_init: bool = True,
        window_size: int = 0,
        input_size: tuple[int, int, int] | None = None,
        rel_pos_indexing: RelPosIndexing = "sam_med3d",
    ) -> None:
        super().__init__(
            dim,
            num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            norm_layer=norm_layer,
            act_layer=act_layer,
            use_rel_pos=False,  # the 2D attention built here is replaced at once
            window_size=window_size,
        )
        self.attn = Attention3D(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            use_rel_pos=use_rel_pos,
            rel_pos_zero_init=rel_pos_zero_init,
            input_size=input_size if window_size == 0 else (window_size,) * 3,
            rel_pos_indexing=rel_pos_indexing,
        )

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x  # (B, D, H, W, C)
        x = self.norm1(x)
        if self.window_size > 0:
            size = (x.shape[1], x.shape[2], x.shape[3])
            x, padded = window_partition_3d(x, self.window_size)  # (B*nW, w, w, w, C)
        x = self.attn(x)
        if self.window_size > 0:
            x = window_unpartition_3d(x, self.window_size, padded, size)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class PatchEmbed3D(nn.Module):
    """Conv3d patchify: (B, in_chans, S, S, S) -> (B, S/p, S/p, S/p, embed_dim), channels last."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).permute(0, 2, 3, 4, 1)


class ImageEncoder3D(nn.Module):
    """SAM-Med3D's 3D ViT: patch embedding, absolute + relative positions, ViT blocks, neck.

    Args:
        img_size: cubic input size S (a multiple of ``patch_size``).
        patch_size: patch edge p; the token grid is (S/p)^3.
        in_chans: input channels (1 for a single MR/CT channel).
        embed_dim: token channels (768 in vit_b_ori).
        depth: number of blocks (12).
        num_heads: heads per block (12).
        mlp_ratio: MLP hidden / embed_dim (4 -> 3072).
        out_chans: neck output channels = prompt / decoder dim (384).
        window_size: window of the non-global blocks in tokens (14: one zero-padded window over 8^3).
        global_attn_indexes: blocks with global attention ((2, 5, 8, 11)).
        use_rel_pos: decomposed 3D relative positions in every block.
        rel_pos_indexing: ``sam_med3d`` (default: what its pretrained weights expect) or ``decomposed``.
    """

    def __init__(
        self,
        img_size: int = 128,
        patch_size: int = 16,
        in_chans: int = 1,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 384,
        window_size: int = 14,
        global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11),
        use_rel_pos: bool = True,
        rel_pos_indexing: RelPosIndexing = "sam_med3d",
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise UserError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.img_size = img_size
        g = img_size // patch_size
        self.grid = (g, g, g)
        self.patch_embed = PatchEmbed3D(patch_size, in_chans, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, g, g, g, embed_dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)  # overwritten by a checkpoint
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.ModuleList(
            Block3D(
                embed_dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=True,
                norm_layer=norm,
                use_rel_pos=use_rel_pos,
                window_size=0 if i in global_attn_indexes else window_size,
                input_size=self.grid,
                rel_pos_indexing=rel_pos_indexing,
            )
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv3d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm3d(out_chans),
            nn.Conv3d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm3d(out_chans),
        )
        self.global_attn_indexes = tuple(global_attn_indexes)

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_chans, S, S, S) -> (B, out_chans, S/p, S/p, S/p)."""
        x = self.patch_embed(x) + self.pos_embed  # (B, g, g, g, embed_dim)
        for blk in self.blocks:
            x = blk(x)
        return self.neck(x.permute(0, 4, 1, 2, 3))  # (B, out_chans, g, g, g)
