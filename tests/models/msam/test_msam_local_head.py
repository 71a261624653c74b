"""The local click head (``MSAMConfig.local_head``, our addition)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from msam_helpers import blob_batch, tiny_config

from sautomed.models.msam.checkpoint import export_sam_med3d
from sautomed.models.msam.network import MSAMNet
from sautomed.models.msam.optim import build_optimizer


def _nets() -> tuple[MSAMNet, MSAMNet]:
    torch.manual_seed(0)
    plain = MSAMNet(dataclasses.replace(tiny_config(), click_maps=True))
    torch.manual_seed(0)
    headed = MSAMNet(dataclasses.replace(tiny_config(), click_maps=True, local_head=True))
    return plain, headed


def test_the_head_starts_as_the_plain_network_and_then_changes_the_logits_near_a_click():
    plain, headed = _nets()
    headed.load_state_dict(plain.state_dict(), strict=False)  # everything but the new head
    image, _ = blob_batch(1)
    click = (torch.tensor([[[8, 8, 8]]]), torch.tensor([[1]]))
    with torch.no_grad():
        a = plain.decode(plain.encode(image), click, None)
        b = headed.decode(headed.encode(image), click, None)
    assert torch.equal(a, b)  # zero-initialised last layer
    with torch.no_grad():
        headed.local_head.layers[-1].bias.fill_(1.0)
        headed.local_head.layers[-1].weight.normal_(0, 0.5)
        c = headed.decode(headed.encode(image), click, None)
    assert not torch.allclose(c, b)


def test_the_head_trains_with_the_rest_and_blocks_export():
    _, headed = _nets()
    opt = build_optimizer(headed, 1e-3, 1.0, 0.0)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    trainable = [n for n, p in headed.named_parameters() if p.requires_grad]
    assert all(id(p) in in_opt for p in headed.parameters() if p.requires_grad), trainable
    assert any(n.startswith("local_head.") for n in trainable)
    image, target = blob_batch(2)
    low = headed(image, (torch.tensor([[[8, 8, 8]]] * 2), torch.tensor([[1]] * 2)))
    torch.nn.functional.binary_cross_entropy_with_logits(headed.upscale(low), target).backward()
    assert headed.local_head.layers[-1].weight.grad.abs().sum() > 0
    head_only = MSAMNet(dataclasses.replace(tiny_config(), local_head=True))  # click maps for the head alone
    with torch.no_grad():
        assert head_only(image, (torch.tensor([[[8, 8, 8]]] * 2), torch.tensor([[1]] * 2))).shape == low.shape
    with pytest.raises(ValueError, match="local_head"):
        export_sam_med3d(head_only)
