"""Simulated clicks and the refinement loop."""

from __future__ import annotations

import torch
from msam_helpers import blob_batch, make_net

from sautomed.models.msam.clicks import sample_error_clicks
from sautomed.models.msam.refinement import refine_with_clicks


def _at(mask: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """mask (B, D, H, W) at points (B, 1, 3) -> (B,)."""
    return torch.stack([mask[b, p[0], p[1], p[2]] for b, p in enumerate(points[:, 0])])


def test_click_lands_in_the_error_region_with_the_right_sign():
    target = torch.zeros(1, 8, 8, 8, dtype=torch.bool)
    target[0, 2:6, 2:6, 2:6] = True
    pred = torch.zeros_like(target)
    pred[0, 2:6, 2:6, 2:4] = True  # misses half of the target (FN)
    pred[0, 6:8, 0:2, 0:2] = True  # and has a false alarm (FP)
    fn, fp = target & ~pred, pred & ~target
    g = torch.Generator().manual_seed(0)
    signs = set()
    for _ in range(50):
        points, labels = sample_error_clicks(pred, target, g)
        assert points.shape == (1, 1, 3) and labels.shape == (1, 1)
        in_fn, in_fp = bool(_at(fn, points)[0]), bool(_at(fp, points)[0])
        assert in_fn or in_fp
        assert int(labels[0, 0]) == (1 if in_fn else 0)
        signs.add(int(labels[0, 0]))
    assert signs == {0, 1}


def test_first_click_is_a_positive_foreground_voxel():
    _, target = blob_batch(3)
    target = target > 0
    points, labels = sample_error_clicks(torch.zeros_like(target), target, torch.Generator().manual_seed(1))
    assert bool(_at(target[:, 0], points).all()) and bool((labels == 1).all())


def test_empty_error_region_is_handled():
    g = torch.Generator().manual_seed(0)
    empty = torch.zeros(2, 1, 6, 6, 6, dtype=torch.bool)
    points, labels = sample_error_clicks(empty, empty, g)  # nothing to segment, nothing predicted
    assert points.shape == (2, 1, 3) and bool((labels == 0).all())
    assert bool((points >= 0).all()) and bool((points < 6).all())
    full = torch.zeros(1, 1, 6, 6, 6, dtype=torch.bool)
    full[..., 1:5, 1:5, 1:5] = True
    points, labels = sample_error_clicks(full, full, g)  # perfect prediction: a click the target agrees with
    assert int(labels[0, 0]) == int(full[0, 0][tuple(points[0, 0])])


def test_clicks_repeat_for_a_seed():
    _, target = blob_batch(2)
    pred = torch.zeros_like(target, dtype=torch.bool)
    a = sample_error_clicks(pred, target > 0, torch.Generator().manual_seed(5))
    b = sample_error_clicks(pred, target > 0, torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_refinement_encodes_the_image_once():
    net = make_net()
    calls = []
    net.image_encoder.register_forward_hook(lambda m, i, o: calls.append(1))
    image, target = blob_batch(2)
    with torch.no_grad():
        res = refine_with_clicks(net, image, target, iterations=5, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 1
    assert len(res.logits) == 5 and res.logits[-1].shape == target.shape
    assert res.points.shape == (2, 5, 3) and res.labels.shape == (2, 5)
    assert bool((res.labels[:, 0] == 1).all())  # the first click is positive (foreground)


def test_prompt_free_iterations_and_accumulated_clicks():
    net = make_net()
    image, target = blob_batch(1)
    seen = []
    orig = net.prompt_encoder.forward
    net.prompt_encoder.forward = lambda points, masks: seen.append(points) or orig(points, masks)
    with torch.no_grad():
        res = refine_with_clicks(
            net, image, target, 4, torch.Generator().manual_seed(0), prompt_free=1, accumulate_clicks=True
        )
    assert seen[0] is None  # the automatic mode's iteration: only the padding point
    assert [p[0].shape[1] for p in seen[1:]] == [1, 2, 3]
    assert res.points.shape == (1, 3, 3)


def test_center_clicks_lie_deep_inside_the_largest_error():
    from sautomed.models.msam.clicks import sample_clicks

    target = torch.zeros(1, 1, 12, 12, 12, dtype=torch.bool)
    target[..., 2:9, 2:9, 2:9] = True  # a 7^3 cube, nothing predicted: the centre is (5, 5, 5)
    pred = torch.zeros_like(target)
    pred[..., 10:12, 10:12, 10:12] = True  # a small false alarm elsewhere
    points, labels = sample_clicks(pred, target, torch.Generator().manual_seed(0), mode="center")
    assert points[0, 0].tolist() == [5, 5, 5] and int(labels[0, 0]) == 1
    same = torch.zeros_like(target)
    points, labels = sample_clicks(same, same, torch.Generator().manual_seed(0), mode="center")  # empty
    assert points.shape == (1, 1, 3) and int(labels[0, 0]) == 0
