"""The baselines' networks on tiny configs: shapes, finite values, gradients, 2.5D input, whole volumes."""

from __future__ import annotations

import pytest
import torch

from sautomed.models.baselines.loss import BaselineLoss, DeepSupervisionDiceCE
from sautomed.models.baselines.module import BaselineModule
from sautomed.models.baselines.network import UNetSettings, build_unet, network_plan
from sautomed.models.baselines.unet2d import segment_slices, volume_slices, window_slices
from sautomed.models.baselines.unet3d import segment_patches

C = 3
TINY = dict(num_classes=C, base_filters=4, max_filters=16)
S2D = UNetSettings(patch_size=(32, 32), spacing=(2.0, 2.0), context_slices=1, **TINY)
S3D = UNetSettings(patch_size=(8, 32, 32), spacing=(4.0, 2.0, 2.0), **TINY)


@pytest.mark.parametrize(
    "kind,settings,x",
    [("unet2d", S2D, torch.rand(2, 3, 32, 32)), ("unet3d", S3D, torch.rand(2, 1, 8, 32, 32))],
)
def test_shapes_finite_and_gradients_reach_every_parameter(kind, settings, x):
    torch.manual_seed(0)
    net = build_unet(kind, settings).train()
    out = net(x)  # (B, 1 + heads, C + 1, *spatial): deep supervision in training mode
    assert out.shape == (2, 3, C + 1, *x.shape[2:])
    y = torch.randint(0, C + 1, (2, *x.shape[2:]))
    terms = DeepSupervisionDiceCE(BaselineLoss())(out, y)
    assert torch.isfinite(terms["loss"])
    terms["loss"].backward()
    params = dict(net.named_parameters())
    assert all(p.requires_grad for p in params.values())
    missing = [n for n, p in params.items() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert all(p.grad.abs().sum() > 0 for n, p in params.items() if "weight" in n and "norm" not in n)
    net.eval()
    with torch.no_grad():
        assert net(x).shape == (2, C + 1, *x.shape[2:])  # the full-resolution output alone


def test_deep_supervision_weights_halve_per_head():
    loss = DeepSupervisionDiceCE(BaselineLoss())
    y = torch.randint(0, C + 1, (1, 16, 16))
    heads = torch.randn(1, 3, C + 1, 16, 16)
    single = [loss(heads[:, k], y)["loss"] for k in range(3)]
    expected = (single[0] + 0.5 * single[1] + 0.25 * single[2]) / 1.75
    assert torch.allclose(loss(heads, y)["loss"], expected)


def test_without_deep_supervision_there_are_no_heads():
    net = build_unet("unet3d", UNetSettings(**{**S3D.__dict__, "deep_supervision_heads": 0})).train()
    assert net(torch.rand(1, 1, 8, 32, 32)).shape == (1, C + 1, 8, 32, 32)


def test_settings_that_do_not_fit_the_kind_are_refused():
    with pytest.raises(ValueError, match="unet3d needs a patch_size"):
        network_plan("unet3d", S2D)
    with pytest.raises(ValueError, match="context_slices applies to unet2d only"):
        network_plan("unet3d", UNetSettings(**{**S3D.__dict__, "context_slices": 1}))


def test_window_slices_are_in_spatial_order_whatever_the_direction():
    # window of n = 2 warm-ups: positions 2, 3, 4 hold t - d, t, t + d; slice k has value k
    t = 5
    fwd = torch.tensor([t + (k - 3) for k in range(5)], dtype=torch.float)
    bwd = torch.tensor([t - (k - 3) for k in range(5)], dtype=torch.float)
    image = torch.stack([fwd, bwd])[:, :, None, None].expand(2, 5, 4, 4)
    x = window_slices(image, torch.tensor([1, -1]), context=1)
    assert x[:, :, 0, 0].tolist() == [[4, 5, 6], [4, 5, 6]]
    assert window_slices(image, torch.tensor([1, -1]), context=0)[:, :, 0, 0].tolist() == [[5], [5]]


def test_volume_slices_clamp_at_the_ends():
    vol = torch.arange(3, dtype=torch.float)[:, None, None].expand(3, 2, 2)
    x = volume_slices(vol, 0, 3, context=1)
    assert x[:, :, 0, 0].tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 2]]


def _pointwise(x: torch.Tensor) -> torch.Tensor:
    """A 'network' whose logits at a voxel depend on that voxel alone: blending must give it back exactly."""
    return torch.cat([x, 1 - x, 2 * x, x * x], 1)


@pytest.mark.parametrize("shape", [(3, 20, 20), (30, 80, 72), (1, 32, 32)])
def test_sliding_window_covers_any_volume_exactly(shape):
    # smaller than the (8, 32, 32) patch along every axis; much larger; a single slice
    vol = torch.rand(shape)
    logits = segment_patches(_pointwise, vol, (8, 32, 32), overlap=0.5, batch=3)
    assert logits.shape == (shape[0], 4, *shape[1:])  # (Z, C+1, S, S)
    assert torch.allclose(logits, _pointwise(vol[:, None]), atol=1e-5)


def test_sliding_window_with_a_network_and_gaussian_blend_is_finite_and_smooth():
    net = build_unet("unet3d", S3D).eval()
    vol = torch.rand(20, 64, 64)
    logits = segment_patches(net, vol, S3D.patch_size, overlap=0.5)
    assert logits.shape == (20, C + 1, 64, 64) and torch.isfinite(logits).all()


def test_segment_slices_matches_the_network_slice_by_slice():
    net = build_unet("unet2d", S2D).eval()
    vol = torch.rand(5, 32, 32)
    logits = segment_slices(net, vol, context=1, chunk=2)
    with torch.no_grad():
        direct = net(torch.stack([vol[[max(z - 1, 0), z, min(z + 1, 4)]] for z in range(5)]))
    assert torch.allclose(logits, direct, atol=1e-5)


@pytest.mark.parametrize("kind,settings", [("unet2d", S2D), ("unet3d", S3D)])
@pytest.mark.parametrize("depth", [1, 13])
def test_module_segments_whole_volumes_at_the_original_size_and_round_trips(kind, settings, depth):
    torch.manual_seed(0)
    module = BaselineModule(network=kind, unet=settings)
    module.net.train()
    labels = module.segment_volume(torch.rand(depth, 32, 32), (50, 45))
    assert labels.shape == (depth, 50, 45) and labels.dtype.name == "uint8" and labels.max() <= C
    assert module.net.training  # segment_volume puts the network back in the mode it found it in
    ckpt = {"state_dict": module.state_dict()}
    module.preprocessing = {"image_size": 32}
    module.on_save_checkpoint(ckpt)
    again = BaselineModule.from_checkpoint_dict(ckpt)
    vol = torch.rand(depth, 32, 32)
    assert (again.segment_volume(vol, (32, 32)) == module.segment_volume(vol, (32, 32))).all()
    assert again.network_kind == kind and again.unet_cfg == settings
