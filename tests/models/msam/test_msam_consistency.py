"""Click-consistent decoding (backpropagating refinement at inference): the answer takes every click's label
at its voxel, a network that already agrees is left alone, and the oracle evaluation can use it."""

from __future__ import annotations

import torch
from msam_helpers import S, blob_batch, make_net

from sautomed.models.msam.consistency import Consistency, consistent_decode

SIZE = (S, S, S)


def _net(seed: int, local_head: bool = True):
    """The tiny network with a live local head (its last layer starts at zero: no gradient would pass)."""
    net = make_net(seed, local_head=local_head, click_maps=True).eval()
    if local_head:
        torch.nn.init.normal_(net.local_head.layers[-1].weight, std=0.5)
    return net


def _clicks(net, image):
    """Three clicks the random network's answer disagrees with, in the same window."""
    with torch.no_grad():
        emb = net.encode(image)
        plain = net.upscale(net.decode(emb, None, None), SIZE)[0, 0]
    where = [(8, 8, 8), (20, 16, 12), (24, 24, 24)]
    labels = [int(plain[p] <= 0) for p in where]  # the opposite of what it says
    return emb, (torch.tensor([where]), torch.tensor([labels]))


def _at(logits, clicks):
    return torch.stack([logits[tuple(p)] for p in clicks[0][0].tolist()])


def test_every_click_agrees_after_the_correction_through_the_local_head():
    net = _net(0)
    image, _ = blob_batch(1)
    emb, clicks = _clicks(net, image)
    newest = (clicks[0][:, -1:], clicks[1][:, -1:])
    sign = clicks[1][0].float() * 2 - 1
    with torch.no_grad():
        before = net.upscale(net.decode(emb, newest, None, clicks), SIZE)[0, 0]
        low, prev = consistent_decode(net, emb, newest, None, clicks, SIZE, Consistency(steps=100, lr=1.0))
    assert (sign * _at(before, clicks) < 1.0).any()  # some click disagreed before
    assert (sign * _at(net.upscale(low, SIZE)[0, 0], clicks) >= 1.0 - 1e-4).all()  # all agree with margin
    assert prev.abs().sum() > 0 and not low.requires_grad


def test_without_a_local_head_the_whole_decoder_is_corrected():
    net = _net(0, local_head=False)
    image, _ = blob_batch(1)
    emb, clicks = _clicks(net, image)
    sign = clicks[1][0].float() * 2 - 1
    with torch.no_grad():
        before = net.upscale(net.decode(emb, clicks, None, clicks), SIZE)[0, 0]
        low, _ = consistent_decode(net, emb, clicks, None, clicks, SIZE, Consistency(steps=5, lr=1.0))
    worse = torch.nn.functional.softplus(1.0 - sign * _at(before, clicks)).sum()
    assert torch.nn.functional.softplus(1.0 - sign * _at(net.upscale(low, SIZE)[0, 0], clicks)).sum() < worse


def test_no_steps_or_clicks_already_agreeing_leave_the_answer_alone():
    net = _net(1)
    image, _ = blob_batch(1)
    emb, clicks = _clicks(net, image)
    with torch.no_grad():
        plain = net.decode(emb, clicks, None, clicks)
        off, _ = consistent_decode(net, emb, clicks, None, clicks, SIZE, Consistency(steps=0))
        assert torch.equal(off, plain)
        answer = net.upscale(plain, SIZE)[0, 0]
        agree = torch.tensor([[int(answer[tuple(p)] > 0) for p in clicks[0][0].tolist()]])
        kept, prev = consistent_decode(
            net, emb, clicks, None, (clicks[0], agree), SIZE, Consistency(steps=50, margin=0.0)
        )
    assert torch.equal(kept, net.decode(emb, clicks, None, (clicks[0], agree))) and not prev.any()


def test_the_oracle_refinement_with_consistent_clicks_runs_under_inference_mode():
    from sautomed.models.msam.refinement import refine_with_clicks

    net = _net(2)
    image, target = blob_batch(1)
    with torch.inference_mode():  # as validate and test run it
        res = refine_with_clicks(
            net,
            image,
            target,
            4,
            torch.Generator().manual_seed(0),
            consistency=Consistency(steps=100, lr=1.0),
        )
    assert len(res.logits) == 4
    last = res.logits[-1][0, 0]
    for p, lab in zip(res.points[0].tolist(), res.labels[0].tolist(), strict=True):
        assert (last[tuple(p)] > 0) == bool(lab)  # every click so far holds in the last answer


def test_the_click_logits_are_the_upscaled_logits_at_the_clicks():
    from sautomed.models.msam.consistency import click_logits

    low = torch.randn(2, 1, 8, 8, 8)
    size = (32, 24, 40)
    points = torch.tensor([[[0, 0, 0], [31, 23, 39], [5, 17, 22]], [[12, 3, 7], [30, 1, 0], [16, 12, 20]]])
    full = torch.nn.functional.interpolate(low, size=size, mode="trilinear", align_corners=False)
    expected = torch.stack(
        [torch.stack([full[b, 0, d, h, w] for d, h, w in points[b].tolist()]) for b in range(2)]
    )
    assert torch.allclose(click_logits(low, points, size), expected, atol=1e-5)
