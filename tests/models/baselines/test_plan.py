"""nnU-Net's topology plan: pooling follows the spacing, kernels stay 1 across thick slices."""

from __future__ import annotations

import pytest

from sautomed.models.baselines.plan import plan_network


def test_isotropic_patch_pools_every_axis_down_to_the_minimum_feature_size():
    plan = plan_network((64, 64, 64), (1.0, 1.0, 1.0))
    assert plan.strides == ((1, 1, 1),) + ((2, 2, 2),) * 4  # 64 -> 4 in four poolings
    assert plan.kernels == ((3, 3, 3),) * 5
    assert plan.filters == (32, 64, 128, 256, 320)
    assert plan.divisor == (16, 16, 16)


def test_thick_slices_pool_in_plane_first_and_keep_kernel_1_along_z():
    # CHAOS MR at S = 128: 7.7 mm slices, 2.5 mm in plane
    plan = plan_network((16, 128, 128), (7.7, 2.5, 2.5))
    assert plan.strides[1] == (1, 2, 2)  # z waits: 7.7 / 2.5 >= 2
    assert plan.kernels[0] == (1, 3, 3)  # no mixing across 7.7 mm slices at full resolution
    assert plan.strides[2] == (2, 2, 2)  # in plane now 5 mm, within a factor 2 of 7.7 mm
    assert plan.kernels[1] == (3, 3, 3)
    assert plan.strides[-1] == (1, 2, 2)  # z reached 4 (16 / 4): only the in-plane axes go on
    assert plan.kernels[-1] == (3, 3, 3)  # the bottleneck
    assert plan.divisor == (4, 32, 32)
    assert len(plan.kernels) == len(plan.strides) == len(plan.filters)


def test_a_very_coarse_axis_is_never_pooled_and_gets_no_3_kernel():
    plan = plan_network((8, 64, 64), (40.0, 1.0, 1.0))  # in plane ends at 16 mm: 40 / 16 > 2
    assert all(s[0] == 1 for s in plan.strides)
    assert all(k[0] == 1 for k in plan.kernels[:-1])


def test_2d_plan_and_filter_cap():
    plan = plan_network((512, 512), (0.8, 0.8), base_filters=32, max_filters=320)
    assert len(plan.strides) == 8 and plan.divisor == (128, 128)  # 512 -> 4 in seven poolings
    assert max(plan.filters) == 320 and plan.filters[:4] == (32, 64, 128, 256)


def test_a_single_axis_pools_only_while_three_times_the_minimum():
    # after the in-plane axes stop at 4, z (finest spacing left) pools alone only while >= 12
    plan = plan_network((40, 8, 8), (1.0, 1.0, 1.0))
    zs = [s[0] for s in plan.strides]
    assert zs.count(2) == 2  # 40 -> 20 -> 10: 10 < 12, so a third pooling of z alone is refused


@pytest.mark.parametrize(
    "patch,spacing,message",
    [
        ((20, 100, 100), (3.0, 1.0, 1.0), "use (20, 112, 112)"),
        ((16, 64), (1.0, 1.0, 1.0), "2 or 3 axes"),
        ((16, 64, 64), (0.0, 1.0, 1.0), "positive"),
    ],
)
def test_bad_patches_are_refused_with_the_fix(patch, spacing, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan_network(patch, spacing)
