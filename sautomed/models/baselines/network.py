"""The baselines' network: MONAI's `DynUNet` (the nnU-Net architecture) on a plan from `plan.py`.

`unet2d` runs on single slices (S, S), optionally 2.5D with neighbouring slices as extra input channels;
`unet3d` runs on (z, y, x) patches. Both are the same DynUNet, planned for their own axes:

    unet2d: (B, 1 + 2 * context_slices, S, S)  -> (B, C + 1, S, S) logits
    unet3d: (B, 1, pz, py, px)                 -> (B, C + 1, pz, py, px) logits

In training mode with deep supervision DynUNet returns (B, 1 + heads, C + 1, ...): the full-resolution
output first, then the `heads` coarser decoder outputs upsampled to full resolution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from monai.networks.nets import DynUNet

from sautomed.errors import UserError
from sautomed.models.baselines.plan import NetworkPlan, plan_network

NetworkKind = Literal["unet2d", "unet3d"]


@dataclass(frozen=True)
class UNetSettings:
    """A baseline U-Net's settings.

    Args:
        num_classes: foreground classes C (the network predicts C + 1 channels, background first).
        patch_size: unet2d: the slice size (S, S), equal to `data.preprocessing.image_size`; unet3d: the
            training patch (z, y, x), equal to `data.patches.size`.
        spacing: the preprocessed voxel spacing in mm on the same axes, as the plan sees it. Preprocessing
            resizes slices to S x S and keeps the volume's own slices, so in-plane it is the original
            spacing x H / S; along z it is the slice thickness.
        context_slices: unet2d only: neighbouring slices on each side given as extra channels (0: plain 2D,
            1: 2.5D with the slices above and below).
        base_filters: channels of the first stage; doubled per stage up to `max_filters` (nnU-Net: 32, 320).
        max_filters: the most channels of any stage.
        min_feature_size: the plan pools an axis while its feature map stays at least this long (nnU-Net: 4).
        deep_supervision_heads: coarser decoder outputs supervised besides the full-resolution one (nnU-Net
            supervises all but the two lowest; 0 turns deep supervision off). At most stages - 2.
        residual: residual convolution blocks instead of plain ones.
        in_channels: unet3d: input channels per voxel, nnU-Net's ``case_0000``, ``case_0001`` ... files
            (= ``data.channels``; BraTS: FLAIR and T1c); unet2d reads one.
    """

    num_classes: int = 4
    patch_size: tuple[int, ...] = (32, 128, 128)
    spacing: tuple[float, ...] = (3.0, 1.5, 1.5)
    context_slices: int = 0
    base_filters: int = 32
    max_filters: int = 320
    min_feature_size: int = 4
    deep_supervision_heads: int = 2
    residual: bool = False
    in_channels: int = 1


def network_plan(kind: NetworkKind, s: UNetSettings) -> NetworkPlan:
    """The plan for a network kind; ValueError when the settings do not fit the kind."""
    dims = 2 if kind == "unet2d" else 3
    if len(s.patch_size) != dims or len(s.spacing) != dims:
        axes = "(S, S) and an in-plane spacing (y, x)" if dims == 2 else "(z, y, x) and a spacing (z, y, x)"
        raise UserError(
            f"{kind} needs a patch_size {axes}; "
            f"got patch_size {tuple(s.patch_size)}, spacing {tuple(s.spacing)}"
        )
    if kind == "unet3d" and s.context_slices:
        raise UserError("context_slices applies to unet2d only (unet3d sees the neighbouring slices itself)")
    if s.context_slices not in (0, 1):
        raise UserError(f"context_slices must be 0 or 1, got {s.context_slices}")
    if s.num_classes < 1:
        raise UserError(f"num_classes must be at least 1, got {s.num_classes}")
    if s.in_channels < 1 or (kind == "unet2d" and s.in_channels != 1):
        raise UserError(f"{kind}: in_channels {s.in_channels} (unet3d reads 1 or more channels, unet2d one)")
    return plan_network(s.patch_size, s.spacing, s.base_filters, s.max_filters, s.min_feature_size)


def supervision_heads(plan: NetworkPlan, s: UNetSettings) -> int:
    """Deep-supervision heads DynUNet can give for this plan: at most stages - 2."""
    return max(0, min(s.deep_supervision_heads, len(plan.strides) - 2))


def build_unet(kind: NetworkKind, s: UNetSettings) -> DynUNet:
    """MONAI's DynUNet with the plan's kernels, strides and filters; transposed-conv upsampling as nnU-Net."""
    plan = network_plan(kind, s)
    heads = supervision_heads(plan, s)
    return DynUNet(
        spatial_dims=len(plan.patch_size),
        in_channels=s.in_channels + 2 * s.context_slices,
        out_channels=s.num_classes + 1,
        kernel_size=[list(k) for k in plan.kernels],
        strides=[list(k) for k in plan.strides],
        upsample_kernel_size=[list(k) for k in plan.strides[1:]],
        filters=list(plan.filters),
        norm_name=("INSTANCE", {"affine": True}),
        act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
        deep_supervision=heads > 0,
        deep_supr_num=max(1, heads),
        res_block=s.residual,
    )
