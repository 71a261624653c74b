"""nnU-Net's network topology plan: convolution kernels and pooling strides from the patch size and spacing.

The rule (Isensee et al., nnU-Net, Nature Methods 2021; `get_pool_and_conv_props` in nnU-Net v2), in words:

- Pool (stride 2) along every axis whose feature map is still at least ``2 * min_feature_size`` long and whose
  current spacing is within a factor 2 of the finest current spacing; an axis pooled on its own needs at least
  ``3 * min_feature_size``. Pooling an axis doubles its spacing, so coarse axes (thick MR slices) wait until
  the in-plane axes have caught up: anisotropic data gets in-plane-only poolings first.
- An axis gets a 3-wide kernel from the first stage at which its spacing is within a factor 2 of the finest
  one (before that, 1: no mixing across thick slices); once 3, it stays 3. The bottleneck is 3 everywhere.
- The patch must be divisible by the product of the strides along each axis.

The same plan serves 2D (axes y, x) and 3D (axes z, y, x) networks; MONAI's `DynUNet` takes it as it is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from sautomed.errors import UserError


@dataclass(frozen=True)
class NetworkPlan:
    """A U-Net's topology, one entry per resolution stage (the first stage has stride 1).

    Attributes:
        kernels: convolution kernel per stage and axis, e.g. ((1, 3, 3), (3, 3, 3), ...).
        strides: downsampling stride per stage and axis; ``strides[0]`` is all ones.
        filters: feature channels per stage: ``min(base * 2**stage, max)``.
        patch_size: the patch the plan was made for (axes as given).
    """

    kernels: tuple[tuple[int, ...], ...]
    strides: tuple[tuple[int, ...], ...]
    filters: tuple[int, ...]
    patch_size: tuple[int, ...]

    @property
    def divisor(self) -> tuple[int, ...]:
        """What each axis of an input must be divisible by (the product of the strides)."""
        return tuple(math.prod(s[d] for s in self.strides) for d in range(len(self.patch_size)))


def plan_network(
    patch_size: Sequence[int],
    spacing: Sequence[float],
    base_filters: int = 32,
    max_filters: int = 320,
    min_feature_size: int = 4,
    max_stages: int = 8,
) -> NetworkPlan:
    """Plan kernels, strides and filters for a patch of ``patch_size`` voxels at ``spacing`` mm (same axes).

    Raises ValueError when the lengths differ, a value is not positive, or the patch is not divisible by the
    planned strides (the message names the nearest larger patch that is).
    """
    size = [int(s) for s in patch_size]
    current = [float(s) for s in spacing]
    dim = len(size)
    if dim not in (2, 3) or len(current) != dim:
        raise UserError(f"patch size {tuple(size)} and spacing {tuple(current)} must both have 2 or 3 axes")
    if min(size) < 1 or min(current) <= 0:
        raise UserError(f"patch size {tuple(size)} and spacing {tuple(current)} must be positive")
    feature = [float(s) for s in size]  # feature-map length per axis at the current stage
    kernel = [1] * dim
    kernels: list[tuple[int, ...]] = []
    strides: list[tuple[int, ...]] = [(1,) * dim]
    while len(strides) < max_stages:
        finest = min(current)
        for d in range(dim):  # kernels: 3 once the axis is within a factor 2 of the finest spacing
            if current[d] / finest < 2:
                kernel[d] = 3
        kernels.append(tuple(kernel))
        poolable = [d for d in range(dim) if feature[d] >= 2 * min_feature_size]
        if poolable:
            finest_poolable = min(current[d] for d in poolable)
            poolable = [d for d in poolable if current[d] / finest_poolable < 2]
        if len(poolable) == 1 and feature[poolable[0]] < 3 * min_feature_size:
            poolable = []
        if not poolable:
            kernels.pop()  # this stage becomes the bottleneck below
            break
        strides.append(tuple(2 if d in poolable else 1 for d in range(dim)))
        for d in poolable:
            current[d] *= 2
            feature[d] = math.ceil(feature[d] / 2)
    kernels.append((3,) * dim)  # the bottleneck: 3 along every axis
    filters = tuple(min(base_filters * 2**k, max_filters) for k in range(len(strides)))
    plan = NetworkPlan(tuple(kernels), tuple(strides), filters, tuple(size))
    bad = [d for d in range(dim) if size[d] % plan.divisor[d]]
    if bad:
        padded = tuple(-(-size[d] // plan.divisor[d]) * plan.divisor[d] for d in range(dim))
        raise UserError(
            f"patch size {tuple(size)} is not divisible by the planned strides {plan.divisor}; use {padded}"
        )
    return plan
