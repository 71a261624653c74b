"""The LightningModule's training step: each distinct window slice encoded once; the optional warm-up loss."""

from __future__ import annotations

import pytest
import torch

from sautomed.models.sautomed.loss import LossWeights, SAutoMedLoss
from sautomed.models.sautomed.module import SAutoMedModule
from sautomed.models.sautomed.network import NetworkConfig, SAutoMedNet

S, C = 32, 3


def _module(warmup: float = 0.0) -> SAutoMedModule:
    torch.manual_seed(0)
    cfg = NetworkConfig(backbone="tiny", image_size=S, num_classes=C, encoder_finetune="full")
    m = SAutoMedModule(network=cfg, loss=LossWeights(warmup=warmup))
    m.log = lambda *a, **k: None  # no trainer
    return m


def _batch(n: int = 2, b: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    index = torch.stack([torch.arange(n + 3) + 5, torch.tensor([0] * 2 + list(range(n + 1)))])[:b]
    label = torch.zeros(b, n + 1, S, S, dtype=torch.long)
    label[:, :, 8:20, 6:18] = 1
    label[:, :, 22:28, 20:30] = 2
    return {
        "image": torch.rand(n + 8, S, S, generator=g)[index],  # (B, n+3, S, S): slices of one volume
        "index": index,  # the second window is clamped at the volume's start: slice 0 repeats
        "label": label[:, n],
        "warmup_label": label[:, :n],
        "direction": torch.tensor([1, -1])[:b],
    }


def test_training_step_encodes_each_distinct_slice_once(monkeypatch):
    m, batch = _module(), _batch(n=2)
    encoded = []
    original = SAutoMedNet.encode
    monkeypatch.setattr(SAutoMedNet, "encode", lambda self, x: encoded.append(x) or original(self, x))
    m.training_step(batch, 0)
    distinct = sum(len(set(row.tolist())) for row in batch["index"])
    assert sum(x.shape[0] for x in encoded) == distinct  # 5 + 4: the clamped repeat reuses its encoding
    slices = torch.cat(encoded)
    assert len({tuple(s.flatten()[:8].tolist()) for s in slices}) == distinct  # no slice twice


def test_warmup_loss_adds_the_mean_of_the_warmup_steps_losses():
    batch = _batch(n=2)
    base = _module(0.0).training_step(batch, 0)
    m = _module(0.5)
    total = m.training_step(batch, 0)
    # the warm-up chain by hand: warm-up k runs from the state of warm-up k-1 on the same features
    net, crit = m.net, SAutoMedLoss(m.loss_weights, C)
    with torch.no_grad():
        f = net.encode(batch["image"].flatten(0, 1)).unflatten(0, batch["image"].shape[:2])
        d = batch["direction"].view(-1, 1, 1, 1)
        state, losses = net.initial_state(2), []
        for k in (1, 2):
            prev = torch.where(d > 0, f[:, k - 1], f[:, k + 1])
            nxt = torch.where(d > 0, f[:, k + 1], f[:, k - 1])
            out = net.step(prev, f[:, k], nxt, state)
            losses.append(crit(out, batch["warmup_label"][:, k - 1])["loss"])
            state = out.state
    expected = base + 0.5 * torch.stack(losses).mean()
    torch.testing.assert_close(total.detach(), expected, rtol=1e-4, atol=1e-5)
    assert total > base


def test_warmup_loss_needs_the_warmup_labels():
    batch = _batch(n=1)
    del batch["warmup_label"]
    _module(0.0).training_step(batch, 0)  # the paper's loss does not need them
    with pytest.raises(ValueError, match="warmup_label"):
        _module(1.0).training_step(batch, 0)


def test_cosine_warmup_follows_the_init_arguments():
    from types import SimpleNamespace

    cfg = NetworkConfig(backbone="tiny", image_size=S, num_classes=C, encoder_finetune="full")
    m = SAutoMedModule(network=cfg, lr=1.0, scheduler="cosine", warmup_fraction=0.1, warmup_max_steps=15)
    m._trainer = SimpleNamespace(estimated_stepping_batches=200)
    sched = m.configure_optimizers()["lr_scheduler"]["scheduler"]
    factors = [f(k) for f in sched.lr_lambdas for k in (0, 14, 16)]
    assert factors[:2] == [1 / 15, 1.0] and factors[2] < 1.0  # min(15, 0.1 * 200) = 15 warm-up steps
    with pytest.raises(ValueError, match="warmup_fraction"):
        SAutoMedModule(network=cfg, warmup_fraction=1.5)
