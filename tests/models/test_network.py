"""The whole 3D-SAutoMed network on the tiny config (S = 64, C = 8)."""

from __future__ import annotations

import torch
from model_helpers import C, S, make_net, phantom_images, phantom_labels

from sautomed.models.sautomed.loss import LossWeights, SAutoMedLoss
from sautomed.models.sautomed.network import SAutoMedNet, State


def _volume(batch: int = 2, depth: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, depth, S, S) images and labels, the phantom shifting from slice to slice."""
    labels = torch.stack([phantom_labels(batch, S, shift=z) for z in range(depth)], dim=1)
    return phantom_images(labels), labels


def _features(net: SAutoMedNet, images: torch.Tensor) -> torch.Tensor:
    B, Z = images.shape[:2]
    f = net.encode(images.flatten(0, 1))  # (B*Z, D, h, w)
    return f.view(B, Z, *f.shape[1:])


def _chain(net: SAutoMedNet, f: torch.Tensor, state: State | None = None):
    """Run slices 1..Z-2 in order; returns the outputs."""
    B, Z = f.shape[:2]
    state = net.initial_state(B) if state is None else state
    outs = []
    for t in range(1, Z - 1):
        out = net.step(f[:, t - 1], f[:, t], f[:, t + 1], state)
        outs.append(out)
        state = out.state
    return outs


def test_shapes_and_finite_values():
    net = make_net()
    images, _ = _volume(batch=2, depth=3)
    f = _features(net, images)
    assert f.shape == (2, 3, 256, S // 16, S // 16) and net.feature_dim == 256
    state = net.initial_state(2)
    assert state.history.shape == (2, 4, 256) and state.boxes.shape == (2, C, 4)
    assert state.present.dtype == torch.bool and not state.present.any()
    out = net.step(f[:, 0], f[:, 1], f[:, 2], state)
    assert out.logits.shape == (2, C + 1, S // 4, S // 4) and net.logit_size == S // 4
    assert out.boxes.shape == (2, C, 4) and out.presence.shape == (2, C)
    assert out.state.history.shape == (2, 4, 256)
    assert out.state.boxes.shape == (2, C, 4) and out.state.present.shape == (2, C)
    for t in (f, out.logits, out.boxes, out.presence, out.state.history, out.state.boxes):
        assert torch.isfinite(t).all()
    assert ((out.boxes >= 0) & (out.boxes <= 1)).all()


def test_gradients_reach_exactly_the_trainable_parameters():
    net = make_net()
    images, labels = _volume(batch=2, depth=4)
    loss_fn = SAutoMedLoss(LossWeights(), C)
    outs = _chain(net, _features(net, images))  # two steps with gradients: the filter is used by step 2
    loss = sum(loss_fn(o, labels[:, t + 1])["loss"] for t, o in enumerate(outs))
    loss.backward()
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in net.named_parameters() if p.grad is not None}
    assert trainable == with_grad
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    frozen = {n for n, p in net.named_parameters() if not p.requires_grad}
    assert (
        "image_encoder.blocks.0.attn.qkv.weight" in frozen
        and "image_encoder.patch_embed.proj.weight" in frozen
    )
    for prefix in ("mask_decoder.", "slice_attention.", "history.", "box_prompt.", "prompt_encoder.no_mask"):
        assert any(n.startswith(prefix) for n in trainable), prefix
    assert {n for n in trainable if n.startswith("image_encoder.")} == {
        n for n, _ in net.named_parameters() if "lora_" in n
    }


def test_history_makes_a_slice_depend_on_the_slices_before():
    images, _ = _volume(batch=1, depth=3)
    with torch.no_grad():
        net = make_net()
        f = _features(net, images)
        s0 = net.initial_state(1)
        s1 = s0._replace(history=s0.history + torch.randn_like(s0.history))
        a = net.step(f[:, 0], f[:, 1], f[:, 2], s0)
        b = net.step(f[:, 0], f[:, 1], f[:, 2], s1)
        assert not torch.allclose(a.logits, b.logits, atol=1e-5)
        assert not torch.allclose(a.state.history, b.state.history)

        hist_only = make_net(box_prompts=False)  # the past reaches slice t through the history alone
        f = _features(hist_only, images)
        past_a = hist_only.step(f[:, 0], f[:, 0], f[:, 1], hist_only.initial_state(1)).state
        past_b = hist_only.step(f[:, 2], f[:, 2], f[:, 2], hist_only.initial_state(1)).state
        a = hist_only.step(f[:, 0], f[:, 1], f[:, 2], past_a)
        b = hist_only.step(f[:, 0], f[:, 1], f[:, 2], past_b)
        assert not torch.allclose(a.logits, b.logits, atol=1e-6)

        off = make_net(history=False, box_prompts=False)  # nothing left that carries state
        assert off.history is None and off.initial_state(1).history is None
        f = _features(off, images)
        a = off.step(f[:, 0], f[:, 1], f[:, 2], off.initial_state(1))
        warm = off.step(f[:, 1], f[:, 2], f[:, 2], off.initial_state(1)).state  # a different past
        warm = warm._replace(boxes=torch.rand(1, C, 4), present=torch.ones(1, C, dtype=torch.bool))
        b = off.step(f[:, 0], f[:, 1], f[:, 2], warm)
        assert torch.equal(a.logits, b.logits) and a.state.history is None


def test_box_prompt_switch():
    images, _ = _volume(batch=1, depth=3)
    with torch.no_grad():
        on = make_net()
        f = _features(on, images)
        s = on.initial_state(1)
        moved = s._replace(boxes=torch.full((1, C, 4), 0.3), present=torch.ones(1, C, dtype=torch.bool))
        a, b = on.step(f[:, 0], f[:, 1], f[:, 2], s), on.step(f[:, 0], f[:, 1], f[:, 2], moved)
        assert not torch.allclose(a.logits, b.logits, atol=1e-5)  # the prompts depend on the previous boxes

        off = make_net(box_prompts=False)
        assert off.box_prompt is None
        assert not any(n.startswith("box_prompt.") for n in off.state_dict())
        assert not off.prompt_encoder.point_embeddings[2].weight.requires_grad
        f = _features(off, images)
        s = off.initial_state(1)
        moved = s._replace(boxes=torch.full((1, C, 4), 0.3), present=torch.ones(1, C, dtype=torch.bool))
        a, b = off.step(f[:, 0], f[:, 1], f[:, 2], s), off.step(f[:, 0], f[:, 1], f[:, 2], moved)
        assert torch.equal(a.logits, b.logits)
        assert not a.boxes.any() and not a.presence.any()
        assert a.state.boxes.shape == (1, C, 4)  # still computed from the prediction


def test_slice_attention_switch():
    images, _ = _volume(batch=1, depth=3)
    with torch.no_grad():
        on = make_net()
        for blk in on.slice_attention.blocks:  # trained-like: non-zero output projections
            blk.inter_attn.out_proj.weight.normal_(std=0.05)
        f = _features(on, images)
        s = on.initial_state(1)
        a = on.step(f[:, 0], f[:, 1], f[:, 2], s)
        b = on.step(f[:, 2], f[:, 1], f[:, 0] + 1, s)
        assert not torch.allclose(a.logits, b.logits, atol=1e-5)

        off = make_net(slice_attention=False)
        assert off.slice_attention is None
        f = _features(off, images)
        s = off.initial_state(1)
        a = off.step(f[:, 0], f[:, 1], f[:, 2], s)
        b = off.step(f[:, 2], f[:, 1], f[:, 0] + 1, s)
        assert torch.equal(a.logits, b.logits)


def test_batched_chains_equal_single_chains():
    net = make_net()
    images, _ = _volume(batch=2, depth=5)
    with torch.no_grad():
        f = _features(net, images)
        batched = _chain(net, f)
        singles = [_chain(net, f[i : i + 1]) for i in range(2)]
    for t, out in enumerate(batched):
        for i in range(2):
            one = singles[i][t]
            for name in ("logits", "boxes", "presence"):
                assert torch.allclose(getattr(out, name)[i], getattr(one, name)[0], atol=1e-5), (t, name)
            assert torch.allclose(out.state.history[i], one.state.history[0], atol=1e-5)
            assert torch.equal(out.state.present[i], one.state.present[0])


def test_construction_is_deterministic_and_state_dict_round_trips():
    a, b = make_net(seed=5), make_net(seed=5)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    c = make_net(seed=6)
    c.load_state_dict(sa)  # strict
    x = torch.rand(1, S, S)
    with torch.no_grad():
        assert torch.equal(a.encode(x), c.encode(x))


def test_grad_checkpointing_gives_the_same_gradients():
    images, labels = _volume(batch=1, depth=3)
    grads = []
    for ckpt in (False, True):
        net = make_net(grad_checkpointing=ckpt, encoder_finetune="full")
        out = _chain(net, _features(net, images))[0]
        SAutoMedLoss(LossWeights(), C)(out, labels[:, 1])["loss"].backward()
        grads.append(net.image_encoder.blocks[0].mlp.lin1.weight.grad.clone())
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_one_training_step_lowers_the_loss():
    net = make_net()
    images, labels = _volume(batch=2, depth=4)
    loss_fn = SAutoMedLoss(LossWeights(), C)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3, weight_decay=1e-4)

    def loss_value() -> torch.Tensor:
        f = _features(net, images)
        with torch.no_grad():  # warm-up slice, as in training
            state = net.step(f[:, 0], f[:, 1], f[:, 2], net.initial_state(2)).state
        out = net.step(f[:, 1], f[:, 2], f[:, 3], state)
        return loss_fn(out, labels[:, 2])["loss"]

    before = loss_value()
    before.backward()
    opt.step()
    opt.zero_grad()
    after = loss_value()
    assert after < before
