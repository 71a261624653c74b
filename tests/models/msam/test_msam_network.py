"""Shapes and switches of the M-SAM network pieces (tiny config, 32^3 crops)."""

from __future__ import annotations

import torch
from msam_helpers import S, blob_batch, make_net

from sautomed.guards import weights_from_elsewhere
from sautomed.models.msam.mea import CrossAttentionFusion, MaskEnhancedAdapter, SumFusion


def test_shapes_through_every_module():
    net = make_net(fusion="mea")
    image, _ = blob_batch(2)
    emb = net.encode(image)
    assert emb.shape == (2, 48, 4, 4, 4)  # (B, C, g, g, g), g = 32 / 8
    assert net.prompt_encoder.get_dense_pe().shape == (1, 48, 4, 4, 4)
    points = (torch.tensor([[[1, 2, 3], [4, 5, 6]], [[7, 8, 9], [1, 1, 1]]]), torch.tensor([[1, 0], [1, 1]]))
    prev = torch.randn(2, 1, 16, 16, 16)  # low-res logits (B, 1, 4g^3)
    sparse, dense = net.prompt_encoder(points, prev)
    assert sparse.shape == (2, 3, 48)  # 2 points + the padding point
    assert dense.shape == (2, 48, 4, 4, 4)
    assert net.fusion(emb, dense).shape == (2, 48, 4, 4, 4)
    sparse_free, _ = net.prompt_encoder(None, prev)  # prompt-free: only the padding point
    assert sparse_free.shape == (2, 1, 48)
    low = net.decode(emb, points, prev)
    assert low.shape == (2, 1, 16, 16, 16)
    assert net.upscale(low).shape == (2, 1, S, S, S)
    assert torch.isfinite(low).all()


def test_gradients_reach_exactly_the_trainable_parameters():
    net = make_net(fusion="mea", encoder_finetune="full")
    image, _ = blob_batch(1)
    net(image, (torch.tensor([[[5, 5, 5]]]), torch.tensor([[1]]))).square().mean().backward()
    for name, p in net.named_parameters():
        got = p.grad is not None  # (lora_A gets an all-zero gradient while lora_B is still zero)
        assert got == p.requires_grad, name
    frozen = {n for n, p in net.named_parameters() if not p.requires_grad}
    assert all("iou_prediction_head" in n or "no_mask_embed" in n for n in frozen)


def test_lora_at_init_leaves_the_encoder_unchanged_and_only_lora_trains():
    plain = make_net(lora_rank=0)
    with weights_from_elsewhere():  # the plain net's weights are loaded below: the LoRA start is tested
        lora = make_net(lora_rank=4, encoder_finetune="lora")
    missing, unexpected = lora.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(".lora_" in k for k in missing)
    image, _ = blob_batch(2)
    with torch.no_grad():
        assert torch.allclose(plain.encode(image), lora.encode(image), atol=1e-6)
    trainable = [n for n, p in lora.image_encoder.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".")[-1] for n in trainable} == {"lora_A", "lora_B"}


def _same_weights_nets(*fusions):
    nets = [make_net(seed=0, fusion=f) for f in fusions]
    shared = {k: v for k, v in nets[0].state_dict().items() if not k.startswith("fusion.")}
    for net in nets[1:]:
        net.load_state_dict(shared, strict=False)
    return nets


def test_fusion_switch_changes_the_output():
    sum_net, mea_net, ca_net = _same_weights_nets("sum", "mea", "cross_attention")
    assert isinstance(sum_net.fusion, SumFusion)
    assert isinstance(mea_net.fusion, MaskEnhancedAdapter)
    assert isinstance(ca_net.fusion, CrossAttentionFusion)
    image, _ = blob_batch(1)
    points = (torch.tensor([[[10, 12, 14]]]), torch.tensor([[1]]))
    prev = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        outs = [n(image, points, prev) for n in (sum_net, mea_net, ca_net)]
    assert not torch.allclose(outs[0], outs[1], atol=1e-4)
    assert not torch.allclose(outs[0], outs[2], atol=1e-4)
    assert not torch.allclose(outs[1], outs[2], atol=1e-4)


def test_sum_switch_is_sams_plain_sum():
    net = make_net(fusion="sum")
    image, _ = blob_batch(1)
    prev = torch.randn(1, 1, 16, 16, 16)
    seen = {}
    hook = net.mask_decoder.transformer.register_forward_pre_hook(lambda m, args: seen.update(src=args[0]))
    with torch.no_grad():
        emb = net.encode(image)
        net.decode(emb, None, prev)
        _, dense = net.prompt_encoder(None, prev)
    hook.remove()
    src = seen["src"]  # (B, C, g^3, 1): SAM's transformer input, flattened grid
    assert torch.allclose(src, (emb + dense).flatten(2).unsqueeze(-1))


def test_mea_blocks_setting():
    assert len(make_net(fusion="mea", mea_blocks=2).fusion.blocks) == 2
