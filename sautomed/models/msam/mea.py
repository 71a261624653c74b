"""The Mask-Enhanced Adapter (MEA): fuses the image embedding E_I with the coarse-mask embedding E_M.

SAM (and SAM-Med3D) feed the mask decoder ``src = E_I + E_M``. M-SAM replaces that sum by the MEA (paper
Sec. 2.2, public code ``mea.py``). With ``Attn(x) = MLP(LN(MHSA(LN(x)) + x))`` (MHSA with decomposed 3D
relative positions over the g^3 grid) and LN the channel LayerNorm::

    I = LN(E_I),  M = LN(E_M)                                   (B, C, g, g, g) each
    per MEA block (``blocks`` of them, inputs I_k, M_k; I_0 = I, M_0 = M):
        I1 = LN(Conv1x1(GELU(LN(Conv3x3(I_k)))) + I_k)          local refinement, residual
        M1 = LN(Conv1x1(GELU(LN(Conv3x3(M_k)))) + M_k)
        Oi = LN(Attn(I1 + I_k + M_k) + I1);  Oi = LN(MLP(Oi) + Oi)    "mutual residual": M_k enters I's path
        Om = LN(Attn(M1 + M_k + I_k) + M1);  Om = LN(MLP(Om) + Om)    and I_k enters M's
        I_{k+1}, M_{k+1} = Oi, Om
    X = I_n + I + M_n + M
    Y = LN(Attn(X) + X);  out = Y + MLP(Y)                      -> src (B, C, g, g, g)

``fusion`` is an ablation switch: ``mea`` (the above), ``sum`` (SAM's ``E_I + E_M``) or ``cross_attention``
(the plain cross-attention baseline a reviewer asked for: I attends to M and M to I, each with a residual and
LayerNorm, the two summed, then an MLP with residual). Attention blocks reuse segment-anything's pieces
(``Attention3D`` from the encoder, SAM's ``MLPBlock`` and the two-way transformer's ``Attention``).
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from sautomed.errors import UserError
from sautomed.models.msam.common import LayerNorm3d, channels_first, channels_last
from sautomed.models.msam.encoder3d import Attention3D, RelPosIndexing
from sautomed.models.sam.upstream import MLPBlock, modeling

Fusion = Literal["mea", "sum", "cross_attention"]
TokenAttention = modeling.transformer.Attention  # SAM's q/k/v attention over token sequences


class ChannelMLP(nn.Module):
    """SAM's ``MLPBlock`` (Linear-GELU-Linear) applied to the channels of a (B, C, D, H, W) grid."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.mlp = MLPBlock(dim, hidden, nn.GELU)

    def forward(self, x: Tensor) -> Tensor:
        return channels_first(self.mlp(channels_last(x)))


class MaskedAttn(nn.Module):
    """``Attn(x) = MLP(LN(MHSA(LN(x)) + x))`` on a (B, C, g, g, g) grid (M-SAM's attention unit).

    Args:
        dim: channels C.
        num_heads: heads of the self-attention.
        grid: (g, g, g), sizes the relative-position tables.
        mlp_ratio: MLP hidden / C.
        rel_pos_indexing: relative-position broadcasting (see ``encoder3d.add_decomposed_rel_pos_3d``).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        grid: tuple[int, int, int],
        mlp_ratio: float = 4.0,
        rel_pos_indexing: RelPosIndexing = "sam_med3d",
    ) -> None:
        super().__init__()
        self.norm1 = LayerNorm3d(dim)
        self.attn = Attention3D(
            dim, num_heads=num_heads, use_rel_pos=True, input_size=grid, rel_pos_indexing=rel_pos_indexing
        )
        self.norm2 = LayerNorm3d(dim)
        self.mlp = ChannelMLP(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        y = channels_first(self.attn(channels_last(self.norm1(x)))) + x  # MHSA(LN x) + x
        return self.mlp(self.norm2(y))


class _ConvRefine(nn.Module):
    """``LN(Conv1x1(GELU(LN(Conv3x3(x)))) + x)``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(dim, dim, kernel_size=3, padding=1)
        self.norm = LayerNorm3d(dim)
        self.act = nn.GELU()
        self.conv2 = nn.Conv3d(dim, dim, kernel_size=1)
        self.addnorm = LayerNorm3d(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.addnorm(self.conv2(self.act(self.norm(self.conv1(x)))) + x)


class _Branch(nn.Module):
    """One stream of an MEA block: ``O = LN(Attn(x1 + x + other) + x1); O = LN(MLP(O) + O)``."""

    def __init__(
        self, dim: int, num_heads: int, grid: tuple[int, int, int], mlp_ratio: float, indexing: RelPosIndexing
    ) -> None:
        super().__init__()
        self.refine = _ConvRefine(dim)
        self.attn = MaskedAttn(dim, num_heads, grid, mlp_ratio, indexing)
        self.norm_attn = LayerNorm3d(dim)
        self.mlp = ChannelMLP(dim, int(dim * mlp_ratio))
        self.norm_mlp = LayerNorm3d(dim)

    def forward(self, x: Tensor, other: Tensor) -> Tensor:
        x1 = self.refine(x)
        o = self.norm_attn(self.attn(x1 + x + other) + x1)
        return self.norm_mlp(self.mlp(o) + o)


class MEABlock(nn.Module):
    """One mutual-residual block: (I_k, M_k) -> (Oi, Om), each (B, C, g, g, g)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        grid: tuple[int, int, int],
        mlp_ratio: float = 4.0,
        indexing: RelPosIndexing = "sam_med3d",
    ) -> None:
        super().__init__()
        self.image = _Branch(dim, num_heads, grid, mlp_ratio, indexing)
        self.mask = _Branch(dim, num_heads, grid, mlp_ratio, indexing)

    def forward(self, image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        return self.image(image, mask), self.mask(mask, image)


class MaskEnhancedAdapter(nn.Module):
    """The MEA: (E_I, E_M) -> src for the mask decoder, all (B, C, g, g, g).

    Args:
        dim: channels C (384).
        grid: token grid (g, g, g) (8^3 at 128^3 input).
        blocks: number of mutual-residual blocks (1 in the public code).
        num_heads: attention heads (6 in the public code).
        mlp_ratio: MLP hidden / C (4).
        rel_pos_indexing: relative-position broadcasting of its attentions (the public code: ``sam_med3d``).
    """

    def __init__(
        self,
        dim: int,
        grid: tuple[int, int, int],
        blocks: int = 1,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        rel_pos_indexing: RelPosIndexing = "sam_med3d",
    ) -> None:
        super().__init__()
        self.norm_image = LayerNorm3d(dim)
        self.norm_mask = LayerNorm3d(dim)
        self.blocks = nn.ModuleList(
            MEABlock(dim, num_heads, grid, mlp_ratio, rel_pos_indexing) for _ in range(blocks)
        )
        self.attn = MaskedAttn(dim, num_heads, grid, mlp_ratio, rel_pos_indexing)
        self.norm_out = LayerNorm3d(dim)
        self.mlp = ChannelMLP(dim, int(dim * mlp_ratio))

    def forward(self, image_embedding: Tensor, mask_embedding: Tensor) -> Tensor:
        i0, m0 = self.norm_image(image_embedding), self.norm_mask(mask_embedding)
        i, m = i0, m0
        for block in self.blocks:
            i, m = block(i, m)
        x = i + i0 + m + m0
        y = self.norm_out(self.attn(x) + x)
        return y + self.mlp(y)


class SumFusion(nn.Module):
    """SAM's own fusion: ``src = E_I + E_M``."""

    def forward(self, image_embedding: Tensor, mask_embedding: Tensor) -> Tensor:
        return image_embedding + mask_embedding


class CrossAttentionFusion(nn.Module):
    """Plain bidirectional cross-attention baseline over the g^3 tokens.

    ``Xi = LN(I + CA(q=I, kv=M))``, ``Xm = LN(M + CA(q=M, kv=I))``, ``X = Xi + Xm``, ``out = LN(X + MLP(X))``.

    Args:
        dim: channels C.
        num_heads: attention heads.
        mlp_ratio: MLP hidden / C.
    """

    def __init__(self, dim: int, num_heads: int = 6, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.image_to_mask = TokenAttention(dim, num_heads)
        self.mask_to_image = TokenAttention(dim, num_heads)
        self.norm_image = nn.LayerNorm(dim)
        self.norm_mask = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), nn.GELU)
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, image_embedding: Tensor, mask_embedding: Tensor) -> Tensor:
        b, c, d, h, w = image_embedding.shape
        i = image_embedding.flatten(2).transpose(1, 2)  # (B, g^3, C)
        m = mask_embedding.flatten(2).transpose(1, 2)
        xi = self.norm_image(i + self.image_to_mask(q=i, k=m, v=m))
        xm = self.norm_mask(m + self.mask_to_image(q=m, k=i, v=i))
        x = xi + xm
        x = self.norm_out(x + self.mlp(x))
        return x.transpose(1, 2).reshape(b, c, d, h, w)


def build_fusion(
    kind: Fusion,
    dim: int,
    grid: tuple[int, int, int],
    blocks: int = 1,
    num_heads: int = 6,
    rel_pos_indexing: RelPosIndexing = "sam_med3d",
) -> nn.Module:
    """The fusion module for the ``fusion`` switch."""
    if kind == "mea":
        return MaskEnhancedAdapter(dim, grid, blocks, num_heads, rel_pos_indexing=rel_pos_indexing)
    if kind == "sum":
        return SumFusion()
    if kind == "cross_attention":
        return CrossAttentionFusion(dim, num_heads=num_heads)
    raise UserError(f"unknown fusion {kind!r}: use 'mea', 'sum' or 'cross_attention'")
