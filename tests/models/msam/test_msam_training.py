"""One optimisation step lowers the refinement loss on a fixed batch."""

from __future__ import annotations

import torch
from msam_helpers import blob_batch, make_net

from sautomed.models.msam.loss import LossSettings, refinement_loss, soft_dice_loss_3d
from sautomed.models.msam.refinement import refine_with_clicks


def _loss(net, image, target, settings):
    res = refine_with_clicks(net, image, target, 3, torch.Generator().manual_seed(0))
    return refinement_loss(res.logits, target, settings)


def test_one_step_lowers_the_loss():
    net = make_net(encoder_finetune="full")
    image, target = blob_batch(2)
    settings = LossSettings()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    before = _loss(net, image, target, settings)
    opt.zero_grad()
    before.backward()
    opt.step()
    with torch.no_grad():
        after = _loss(net, image, target, settings)
    assert float(after) < float(before.detach())


def test_loss_on_all_or_last_iteration():
    target = torch.zeros(1, 1, 4, 4, 4)
    target[..., :2, :, :] = 1
    good, bad = (target * 20 - 10), torch.zeros_like(target)
    last = refinement_loss([bad, good], target, LossSettings(iterations="last"))
    both = refinement_loss([bad, good], target, LossSettings(iterations="all"))
    assert float(both) > float(last)
    assert float(soft_dice_loss_3d(good, target)) < 1e-3
