"""The 3D prompt encoder: random-Fourier positions, point prompts, and the previous coarse mask.

Subclasses of segment-anything's ``PositionEmbeddingRandom`` and ``PromptEncoder`` with SAM-Med3D's 3D
choices; parameter names are SAM-Med3D's (``pe_layer.positional_encoding_gaussian_matrix``,
``point_embeddings.{0,1}``, ``not_a_point_embed``, ``mask_downscaling.{0,1,3,4,6}``, ``no_mask_embed``).

Positions: a Gaussian matrix G (3, F), F = dim // 3; a point p in [0, 1]^3 becomes
``[sin(2 pi (2p-1) G), cos(...), sin(...)]`` (3F = dim channels, SAM-Med3D's sin/cos/sin).

Points: ``coords`` (B, N, 3) are voxel indices along the crop's (D, H, W) axes; each is shifted by 0.5 (voxel
centre) and divided by the input size. One padding point (label -1, SAM's "not a point") is always appended,
so N = 0 (a prompt-free iteration) gives exactly that one token. Labels: 1 positive, 0 negative, -1 padding.

Dense grid positions follow SAM-Med3D exactly, including its axis order: the grid encoding's first coordinate
runs along axis 1 and its second along axis 0 (the 2D SAM's (x, y) order carried over to (D, H, W) grids),
while points use (D, H, W) order, so a click's encoding matches the grid cell with d and h swapped. Pretrained
SAM-Med3D weights were learned with this, so it is the default; ``consistent`` orders both alike (for
training from scratch).

Coarse mask: the previous low-res logits (B, 1, 4g, 4g, 4g) -> Conv3d(1->c/4, k2 s2), LN, GELU,
Conv3d(c/4->c, k2 s2), LN, GELU, Conv3d 1x1 (c->dim) -> E_M (B, dim, g, g, g); c = ``mask_in_chans`` (16).
With ``mask_channels = 3`` (``MSAMConfig.click_maps``, our addition) the branch also reads the clicks so far
as a positive and a negative map on the same grid (:func:`click_maps`).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from sautomed.errors import UserError
from sautomed.models.msam.common import LayerNorm3d
from sautomed.models.sam.upstream import PromptEncoder, modeling

PositionEmbeddingRandom = modeling.prompt_encoder.PositionEmbeddingRandom
PEAxisOrder = Literal["sam_med3d", "consistent"]


class PositionEmbeddingRandom3D(PositionEmbeddingRandom):
    """Random-Fourier positional encoding of 3D coordinates: 3 x ``num_pos_feats`` output channels.

    Args:
        num_pos_feats: F, columns of the Gaussian matrix (dim // 3).
        scale: standard deviation of the Gaussian matrix.
        axis_order: ``sam_med3d`` (the grid's first two coordinates swapped, as its pretrained weights have
            it) or ``consistent`` (grid coordinates in (D, H, W) order, the points' order).
    """

    def __init__(
        self, num_pos_feats: int = 128, scale: float | None = None, axis_order: PEAxisOrder = "sam_med3d"
    ) -> None:
        super().__init__(num_pos_feats, scale)
        self.axis_order = axis_order
        scale = 1.0 if scale is None or scale <= 0.0 else scale
        self.positional_encoding_gaussian_matrix = scale * torch.randn((3, num_pos_feats))  # (3, F) buffer

    def _pe_encoding(self, coords: Tensor) -> Tensor:
        """(..., 3) in [0, 1] -> (..., 3F)."""
        coords = 2 * math.pi * ((2 * coords - 1) @ self.positional_encoding_gaussian_matrix)
        return torch.cat([torch.sin(coords), torch.cos(coords), torch.sin(coords)], dim=-1)

    def forward(self, size: tuple[int, int, int]) -> Tensor:
        """Encoding of the voxel centres of a (X, Y, Z) grid -> (3F, X, Y, Z), SAM-Med3D's axis order."""
        gx, gy, gz = size
        grid = torch.ones(size, device=self.positional_encoding_gaussian_matrix.device, dtype=torch.float32)
        if self.axis_order == "consistent":
            first, second = (grid.cumsum(dim=0) - 0.5) / gx, (grid.cumsum(dim=1) - 0.5) / gy
        else:
            first = (grid.cumsum(dim=1) - 0.5) / gx  # SAM-Med3D's "x_embed": runs along axis 1
            second = (grid.cumsum(dim=0) - 0.5) / gy  # its "y_embed": runs along axis 0
        third = (grid.cumsum(dim=2) - 0.5) / gz
        pe = self._pe_encoding(torch.stack([first, second, third], dim=-1))  # (X, Y, Z, 3F)
        return pe.permute(3, 0, 1, 2)

    def forward_with_coords(self, coords_input: Tensor, image_size: tuple[int, int, int]) -> Tensor:
        """(B, N, 3) voxel coordinates (already centre-shifted) -> (B, N, 3F)."""
        size = torch.tensor(image_size, dtype=torch.float32, device=coords_input.device)
        return self._pe_encoding(coords_input.float() / size)


class PromptEncoder3D(PromptEncoder):
    """SAM's prompt encoder for 3D crops: point tokens and the dense coarse-mask embedding.

    Args:
        embed_dim: prompt / decoder dim (384); a multiple of 3.
        image_embedding_size: token grid (g, g, g) of the image embedding.
        input_image_size: crop size (S, S, S) the point coordinates refer to.
        mask_in_chans: hidden channels of the mask branch (16).
        activation: activation of the mask branch.
        pe_axis_order: axis order of the dense grid encoding (see :class:`PositionEmbeddingRandom3D`).
        mask_channels: input channels of the coarse-mask branch: 1 (the previous logits; SAM-Med3D) or 3
            (with the positive and negative click maps).
    """

    def __init__(
        self,
        embed_dim: int,
        image_embedding_size: tuple[int, int, int],
        input_image_size: tuple[int, int, int],
        mask_in_chans: int = 16,
        activation: type[nn.Module] = nn.GELU,
        pe_axis_order: PEAxisOrder = "sam_med3d",
        mask_channels: int = 1,
    ) -> None:
        if embed_dim % 3:
            raise UserError(f"embed_dim {embed_dim} must be a multiple of 3 (3D random-Fourier positions)")
        super().__init__(embed_dim, image_embedding_size[:2], input_image_size[:2], mask_in_chans, activation)
        self.input_image_size = tuple(input_image_size)
        self.image_embedding_size = tuple(image_embedding_size)
        self.pe_layer = PositionEmbeddingRandom3D(embed_dim // 3, axis_order=pe_axis_order)
        self.num_point_embeddings = 2  # positive / negative point (SAM-Med3D has no box corners)
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(2))
        self.mask_input_size = tuple(4 * s for s in image_embedding_size)
        self.mask_downscaling = nn.Sequential(
            nn.Conv3d(mask_channels, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm3d(mask_in_chans // 4),
            activation(),
            nn.Conv3d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm3d(mask_in_chans),
            activation(),
            nn.Conv3d(mask_in_chans, embed_dim, kernel_size=1),
        )

    def _embed_points(self, points: Tensor, labels: Tensor, pad: bool = True) -> Tensor:
        """(B, N, 3) voxel indices, (B, N) labels -> (B, N + 1, dim) tokens (the padding point appended)."""
        points = points.float() + 0.5  # voxel centre
        labels = labels.long()
        if pad:
            points = torch.cat([points, points.new_zeros(points.shape[0], 1, 3)], dim=1)
            labels = torch.cat([labels, labels.new_full((labels.shape[0], 1), -1)], dim=1)
        emb = self.pe_layer.forward_with_coords(points, self.input_image_size)  # (B, N+1, dim)
        pad_mask = (labels == -1).unsqueeze(-1)
        emb = torch.where(pad_mask, self.not_a_point_embed.weight.expand_as(emb), emb)
        emb = emb + (labels == 0).unsqueeze(-1) * self.point_embeddings[0].weight
        return emb + (labels == 1).unsqueeze(-1) * self.point_embeddings[1].weight

    def forward(  # type: ignore[override]
        self, points: tuple[Tensor, Tensor] | None, masks: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """Point prompts and the previous low-res logits -> (sparse (B, N+1, dim), dense E_M (B, dim, g^3)).

        ``points`` None is a prompt-free iteration (only the padding point); ``masks`` None uses SAM's learned
        "no mask" embedding (M-SAM always passes logits: zeros at the first iteration).
        """
        bs = self._get_batch_size(points, None, masks)
        if points is None:
            dev = self._get_device()
            points = (torch.zeros(bs, 0, 3, device=dev), torch.zeros(bs, 0, dtype=torch.long, device=dev))
        sparse = self._embed_points(points[0], points[1], pad=True)
        if masks is not None:
            dense = self._embed_masks(masks)  # (B, dim, g, g, g)
        else:
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1, 1).expand(
                bs, -1, *self.image_embedding_size
            )
        return sparse, dense


def click_maps(
    points: Tensor, labels: Tensor, grid: tuple[int, int, int], input_size: tuple[int, int, int], sigma: float
) -> Tensor:
    """Clicks as dense maps on the coarse-mask grid.

    (B, K, 3) voxel indices of the ``input_size`` crop, (B, K) labels (1 positive, 0 negative, others
    ignored) -> (B, 2, *grid): channel 0 the positive, 1 the negative clicks, each the maximum over its
    clicks of a Gaussian of ``sigma`` grid cells around the click's position (about 1 in its cell).
    """
    B = points.shape[0]
    axes = [(torch.arange(n, device=points.device, dtype=torch.float32) + 0.5) for n in grid]
    scale = torch.tensor([g / s for g, s in zip(grid, input_size)], device=points.device)
    centres = (points.float() + 0.5) * scale  # (B, K, 3) in grid cells
    out = points.new_zeros((B, 2, *grid), dtype=torch.float32)
    if points.shape[1] == 0:
        return out
    shapes = [[1, 1, *[-1 if i == a else 1 for i in range(3)]] for a in range(3)]
    d2 = sum((axes[a].view(shapes[a]) - centres[..., a, None, None, None]) ** 2 for a in range(3))
    heat = torch.exp(-d2 / (2 * sigma**2))  # (B, K, *grid)
    for channel, value in ((0, 1), (1, 0)):
        chosen = (labels == value).view(B, -1, 1, 1, 1)
        out[:, channel] = torch.where(chosen, heat, torch.zeros_like(heat)).amax(dim=1)
    return out
