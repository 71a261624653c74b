"""The slice chain's training and its state: cached features of a frozen encoder over fixed augmented copies,
targets just past an organ's end, the next state gated on presence / area / the largest component, and a
schedule that follows the clock inside a max_time guard."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Timer

from sautomed.data.augment import Augmentation
from sautomed.data.datamodule import WindowDataset
from sautomed.data.preprocess import Prepared
from sautomed.guards import weights_from_elsewhere
from sautomed.models.sautomed.loss import LossWeights
from sautomed.models.sautomed.module import SAutoMedModule
from sautomed.models.sautomed.network import NetworkConfig, SAutoMedNet
from sautomed.schedule import Schedule

S, C = 32, 2


def _volume(z: int = 14) -> Prepared:
    rng = np.random.default_rng(0)
    image = rng.random((z, S, S)).astype(np.float32)
    label = np.zeros((z, S, S), np.uint8)
    label[4:10, 8:20, 8:20] = 1
    label[6:8, 22:28, 4:10] = 2
    return Prepared("v", image, label, None)


def test_augmented_copies_give_every_slice_one_fixed_identity():
    aug = Augmentation(probability=1.0)
    ds = WindowDataset([_volume(), _volume()], 200, 0, aug, 0.8, augmented_copies=3)
    seen: dict[int, torch.Tensor] = {}
    copies = set()
    for i in range(200):
        item = ds[(i % 3, i, 1 + i % 3)]
        keys = item["slice_key"]
        assert keys.shape == (item["image"].shape[0],)
        for k, img in zip(keys.tolist(), item["image"]):
            if k in seen:
                assert torch.equal(seen[k], img)  # the same key is the same pixels, in any window
            seen[k] = img
        copies.add(int(keys[0]) // 14)
    assert len(copies) == 6  # 2 volumes x 3 copies all drawn
    original = ds.volumes[0].image
    np.testing.assert_array_equal(ds.copies[0][0][0], original)  # copy 0 is the volume itself
    assert not np.allclose(ds.copies[0][1][0], original)  # copies 1.. are augmented


def test_end_targets_lie_just_past_an_organ_and_run_out_of_it():
    ds = WindowDataset([_volume()], 300, 0, Augmentation(enabled=False), 1.0, end_fraction=1.0)
    extents = {1: (4, 9), 2: (6, 7)}
    for i in range(300):
        item = ds[(0, i, 2)]
        idx, d = item["index"].numpy(), item["direction"]
        t = idx[3]
        ends = [(hi + p, 1) for lo, hi in extents.values() for p in (1, 2)]
        ends += [(lo - p, -1) for lo, hi in extents.values() for p in (1, 2)]
        assert (t, d) in ends
        assert item["warmup_label"][-1].any() or item["warmup_label"][0].any()  # warm-ups hold the organ


def _frozen_module() -> SAutoMedModule:
    torch.manual_seed(0)
    cfg = NetworkConfig(backbone="tiny", image_size=S, num_classes=C, encoder_finetune="frozen", lora_rank=0)
    with weights_from_elsewhere():  # the cache's behaviour, not the weights, is under test
        m = SAutoMedModule(network=cfg, loss=LossWeights(warmup=1.0))
    m.log = lambda *a, **k: None
    return m


def test_frozen_encoder_features_are_computed_once_per_slice_key(monkeypatch):
    m = _frozen_module()
    ds = WindowDataset([_volume()], 16, 0, Augmentation(), 0.8, augmented_copies=2)
    encoded = []
    original = SAutoMedNet.encode
    monkeypatch.setattr(SAutoMedNet, "encode", lambda self, x: encoded.append(len(x)) or original(self, x))

    def batch(i: int) -> dict:
        items = [ds[(0, 4 * i + j, 2)] for j in range(4)]
        out = {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in items[0]}
        return out

    b0 = batch(0)
    loss0 = m.training_step(b0, 0)
    first = sum(encoded)
    assert first == len(set(b0["slice_key"].flatten().tolist()))  # each distinct slice once
    loss0.backward()  # gradients flow through the decoder on cached features
    assert m.net.mask_decoder.class_tokens.weight.grad is not None
    m.training_step(b0, 1)
    assert sum(encoded) == first  # the same windows again: nothing re-encoded
    # the cached features are the encoder's (to float16 precision)
    key = int(b0["slice_key"][0, 0])
    with torch.no_grad():
        direct = original(m.net, b0["image"][0, :1])[0]
    torch.testing.assert_close(m._feature_cache[key].float(), direct, atol=2e-3, rtol=2e-3)


def test_a_trainable_encoder_is_never_served_from_the_cache():
    m = _frozen_module()
    m.net.image_encoder.requires_grad_(True)
    ds = WindowDataset([_volume()], 4, 0, Augmentation(), 0.8, augmented_copies=2)
    items = [ds[(0, j, 1)] for j in range(2)]
    b = {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in items[0]}
    m.training_step(b, 0).backward()
    assert not m._feature_cache
    assert any(p.grad is not None for p in m.net.image_encoder.parameters())


def _net(**kw) -> SAutoMedNet:
    torch.manual_seed(0)
    return SAutoMedNet(
        NetworkConfig(backbone="tiny", image_size=S, num_classes=C, encoder_finetune="full", **kw)
    )


def _logits_with(labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels, C + 1).permute(0, 3, 1, 2).float() * 10  # (B, C+1, h, w)


def test_next_state_gates():
    labels = torch.zeros(1, 32, 32, dtype=torch.long)
    labels[0, 2:12, 2:12] = 1  # the organ
    labels[0, 30, 30] = 1  # one stray pixel far away
    labels[0, 20, 20] = 2  # a one-pixel class
    logits, presence = _logits_with(labels), torch.tensor([[3.0, -3.0]])
    boxes, present = _net()._next_boxes(logits, presence)  # today's: any argmax pixel
    assert present.tolist() == [[True, True]] and boxes[0, 0, 2] > 0.8  # the stray pixel stretches it
    boxes, present = _net(state_largest_component=True)._next_boxes(logits, presence)
    assert boxes[0, 0].tolist() == pytest.approx([7 / 32, 7 / 32, 10 / 32, 10 / 32])
    _, present = _net(state_min_area=4)._next_boxes(logits, presence)
    assert present.tolist() == [[True, False]]
    boxes, present = _net(state_presence_gate=True)._next_boxes(logits, presence)
    assert present.tolist() == [[True, False]] and boxes[0, 1].abs().sum() == 0


class _FakeTimer(Timer):
    def __init__(self, elapsed: float, budget: float) -> None:
        super().__init__(duration=None)
        self.elapsed, self.budget = elapsed, budget

    def time_elapsed(self, stage="train") -> float:
        return self.elapsed

    def time_remaining(self, stage="train") -> float:
        return self.budget - self.elapsed


class _Trainer:
    def __init__(self, timer: Timer) -> None:
        self.callbacks = [timer]
        self.should_stop, self.global_step, self.current_epoch = False, 21, 3


def test_clock_schedule_ends_inside_the_guard_whatever_the_step_count():
    timer = _FakeTimer(elapsed=0.0, budget=1000.0)
    sched = Schedule(_Trainer(timer), total_steps=10_000, warmup_steps=10, by="clock", margin_s=100.0)
    assert sched.factor(0) == pytest.approx(0.1)  # linear warm-up by steps
    assert sched.factor(20) == pytest.approx(1.0, abs=1e-4)
    assert sched.seconds_left() == pytest.approx(900.0)  # what the dense pretraining takes its share of
    timer.elapsed = 450.0  # half of the 900 s budget, a slow machine: only 20 steps done
    assert sched.seconds_left() == pytest.approx(450.0)
    assert sched.progress(20) == pytest.approx(0.5)
    assert sched.factor(20) == pytest.approx(0.5)
    assert not sched.ended()
    sched.stop_if_ended()
    assert not sched.trainer.should_stop
    timer.elapsed = 900.0
    assert sched.factor(21) == pytest.approx(0.0, abs=1e-9) and sched.ended()
    assert sched.factor(5) == 0.0  # a budget too short to finish the warm-up still ends at zero
    sched.stop_if_ended()
    assert sched.trainer.should_stop  # the run stops inside the guard
    assert sched.report() == (
        "training ended at epoch 3, step 21 of the 10000 that max_epochs / max_steps plan (0%); "
        "schedule 100% through (by clock)"
    )
    steps = Schedule(_Trainer(timer), total_steps=110, warmup_steps=10, by="steps", margin_s=100.0)
    assert steps.progress(60) == pytest.approx(0.5) and not steps.ended()  # the clock is ignored
    assert steps.seconds_left() is None
    assert steps.factor(60) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def test_clock_schedule_needs_a_max_time():
    with pytest.raises(ValueError, match="max_time"):
        Schedule(_Trainer(Timer(duration=None)), 100, 5, "clock", 10.0)


def test_a_clock_ended_run_short_of_the_configs_steps_says_so():
    timer = _FakeTimer(elapsed=400.0, budget=1000.0)
    sched = Schedule(_Trainer(timer), 10_000, 10, "clock", 100.0, min_steps=150)  # 21 steps done
    assert sched.shortfall() is None  # the clock has not ended it yet
    timer.elapsed = 950.0
    line = sched.shortfall()
    assert line is not None and "after 21 optimiser steps, fewer than the 150" in line
    assert "trainer.max_time" in line
    sched.trainer.global_step = 150
    assert sched.shortfall() is None  # as many steps as the figures: nothing to say
    assert Schedule(_Trainer(timer), 10_000, 10, "clock", 100.0).shortfall() is None  # no figure to compare
    with pytest.raises(ValueError, match="schedule_min_steps"):
        Schedule(_Trainer(timer), 100, 5, "clock", 10.0, min_steps=-1)
