"""Dense class proposals (network.dense_head): anchors for classes absent before, the presence gate,
their loss, the pretraining on every cached slice, and the refusals."""

from __future__ import annotations

import re

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from sautomed.data.augment import Augmentation
from sautomed.data.datamodule import WindowDataset
from sautomed.data.preprocess import Prepared
from sautomed.models.sautomed.box_prompt import BoxPromptGenerator
from sautomed.models.sautomed.dense import (
    dense_boxes,
    dense_presence,
    dense_volume_logits,
    largest_component_2d,
    largest_component_2d_torch,
    pretrain_dense_head,
)
from sautomed.models.sautomed.feature_cache import FeatureCache
from sautomed.models.sautomed.inference import InferenceSettings
from sautomed.models.sautomed.loss import LossWeights, SAutoMedLoss, dense_loss
from sautomed.models.sautomed.module import SAutoMedModule
from sautomed.models.sautomed.network import NetworkConfig, build_network
from sautomed.models.sautomed.window import encode_window_cached

S, C = 32, 2


def _scipy_largest_component_2d(labels: np.ndarray, num_classes: int) -> np.ndarray:
    from scipy import ndimage

    out = np.zeros_like(labels)
    for b in range(labels.shape[0]):
        for c in range(1, num_classes + 1):
            comp, n = ndimage.label(labels[b] == c)
            if n:
                out[b][comp == 1 + int(np.bincount(comp.ravel())[1:].argmax())] = c
    return out


@pytest.mark.parametrize("fill", [0.3, 0.55, 0.75])
def test_the_largest_component_on_the_device_matches_scipy(fill):
    """Random blobs of 3 classes (many components, ties, a snake through a slice), 16 slices of 48 x 40:
    the same pixels kept as scipy.ndimage.label's largest 4-connected component, class by class."""
    rng = np.random.default_rng(int(fill * 100))
    labels = (rng.random((16, 48, 40)) < fill) * rng.integers(1, 4, (16, 48, 40))
    labels[0] = 0  # an empty slice
    labels[1] = 0  # a serpentine: one component winding through the whole slice, beside a bigger-looking one
    labels[1, ::2, :] = 2
    labels[1, 1::4, -1], labels[1, 3::4, 0] = 2, 2
    labels[2, 5:9, 5:9], labels[2, 20:24, 20:24] = 1, 1  # a tie: the first in raster order wins
    expected = _scipy_largest_component_2d(labels, 3)
    assert (expected != labels).any() and (expected > 0).any()
    for implementation in (largest_component_2d, largest_component_2d_torch):  # the host's and a GPU's
        np.testing.assert_array_equal(implementation(torch.from_numpy(labels), 3).numpy(), expected)


def _net(**kw):
    torch.manual_seed(0)
    cfg = dict(
        backbone="tiny", image_size=S, num_classes=C, encoder_finetune="frozen", lora_rank=0, patch_size=8
    )
    return build_network(NetworkConfig(**{**cfg, "decoder": "per_class", "dense_head": True, **kw}))


def _proposal(b: int, h: int, cls: int, rows: slice, cols: slice) -> torch.Tensor:
    """(b, C+1, h, h) logits: background everywhere, class `cls` in the rectangle."""
    logits = torch.zeros(b, C + 1, h, h)
    logits[:, 0] = 10.0
    logits[:, cls, rows, cols] = 20.0
    return logits


def test_dense_boxes_and_presence_follow_the_proposal():
    logits = _proposal(1, 8, 2, slice(2, 4), slice(4, 8))
    logits[0, 2, 7, 0] = 20.0  # a stray pixel: not part of the largest component
    boxes, present = dense_boxes(logits, C)
    assert present.tolist() == [[False, True]]
    torch.testing.assert_close(boxes[0, 1], torch.tensor([0.75, 0.375, 0.5, 0.25]))  # cx, cy, w, h
    p = dense_presence(logits)
    assert p[0, 1] > 5 and p[0, 0] < -5


def test_a_class_absent_from_the_previous_slice_gets_the_proposal_box_as_anchor(monkeypatch):
    net = _net().eval()
    h = net.feature_size
    seen = {}
    original = BoxPromptGenerator.forward_with_history

    def spy(self, z, pe, prev_boxes, prev_present, history):
        seen["boxes"], seen["present"] = prev_boxes.clone(), prev_present.clone()
        return original(self, z, pe, prev_boxes, prev_present, history)

    monkeypatch.setattr(BoxPromptGenerator, "forward_with_history", spy)
    proposal = _proposal(1, h, 2, slice(0, h // 2), slice(0, h // 2))
    monkeypatch.setattr(net.dense_head, "forward", lambda a, b, c: proposal)
    f = torch.randn(1, net.feature_dim, h, h)
    state = net.initial_state(1)
    prev = torch.tensor([[[0.8, 0.8, 0.2, 0.2], [0.9, 0.9, 0.1, 0.1]]])
    with torch.no_grad():
        net.step(f, f, f, state._replace(boxes=prev, present=torch.tensor([[True, False]])))
    torch.testing.assert_close(seen["boxes"][0, 0], prev[0, 0])  # present before: the paper's anchor
    torch.testing.assert_close(seen["boxes"][0, 1], torch.tensor([0.25, 0.25, 0.5, 0.5]))  # the proposal
    assert seen["present"].tolist() == [[True, True]]
    # the gate is the proposals' presence: with both anchors from the state, only the gate differs
    both = state._replace(boxes=prev, present=torch.tensor([[True, True]]))
    with torch.no_grad():
        absent = net.step(f, f, f, both).logits  # class 1 nowhere in the proposal
        both_classes = proposal.clone()
        both_classes[:, 1, -2:, -2:] = 20.0  # class 1 in a corner, class 2 as before
        monkeypatch.setattr(net.dense_head, "forward", lambda a, b, c: both_classes)
        there = net.step(f, f, f, both).logits
    shift = torch.nn.functional.logsigmoid(torch.tensor(-10.0)).item()  # p(class 1) ~ e^-10 at best
    torch.testing.assert_close(
        absent[:, 1] - there[:, 1], torch.full_like(absent[:, 1], shift), atol=1e-3, rtol=0
    )
    torch.testing.assert_close(absent[:, [0, 2]], there[:, [0, 2]])


def test_the_hard_and_region_gates_remove_an_absent_or_far_class_at_inference_only(monkeypatch):
    nets = {gate: _net(presence_gate=gate) for gate in ("soft", "hard", "region")}  # same seed: same weights
    h = nets["soft"].feature_size
    proposal = _proposal(1, h, 2, slice(0, h // 2), slice(0, h // 2))
    proposal[:, 1, 0, 0] = 9.8  # class 1 just below even odds: presence logit about -0.2
    f = torch.randn(1, nets["soft"].feature_dim, h, h)
    prev = torch.tensor([[[0.5, 0.5, 0.4, 0.4], [0.25, 0.25, 0.5, 0.5]]])
    out = {}
    for mode in ("eval", "train"):
        for gate, net in nets.items():
            getattr(net, mode)()
            monkeypatch.setattr(net.dense_head, "forward", lambda a, b, c: proposal)
            state = net.initial_state(1)._replace(boxes=prev, present=torch.tensor([[True, True]]))
            with torch.no_grad():
                out[mode, gate] = net.step(f, f, f, state)
    soft, hard = out["eval", "soft"], out["eval", "hard"]
    assert torch.all(hard.logits[:, 1] < soft.logits[:, 1] - 1000)  # class 1 cannot win a pixel
    assert not (hard.logits.argmax(1) == 1).any()
    assert not hard.state.present[0, 0]  # and the next slice gets no anchor from it
    torch.testing.assert_close(hard.logits[:, [0, 2]], soft.logits[:, [0, 2]])
    torch.testing.assert_close(out["train", "hard"].logits, out["train", "soft"].logits)  # training: soft
    torch.testing.assert_close(out["train", "region"].logits, out["train", "soft"].logits)
    # region: class 2 only within one feature cell of its proposal (the top-left quarter), class 1 as hard
    region, k = out["eval", "region"].logits, soft.logits.shape[-1] // h  # logits per feature cell
    near = (h // 2 + 1) * k
    torch.testing.assert_close(region[:, :2], hard.logits[:, :2])
    torch.testing.assert_close(region[:, 2, :near, :near], soft.logits[:, 2, :near, :near])
    assert torch.all(region[:, 2, near:, :] < soft.logits[:, 2, near:, :] - 1000)
    assert torch.all(region[:, 2, :, near:] < soft.logits[:, 2, :, near:] - 1000)
    with pytest.raises(ValueError, match="presence_gate: hard"):
        _net(presence_gate="hard", decoder="joint", dense_head=False)
    with pytest.raises(ValueError, match="presence_gate: region"):
        _net(presence_gate="region", dense_head=False)


def test_the_dense_loss_is_in_the_total_and_trains_the_head():
    net = _net(encoder_finetune="full").train()
    label = torch.zeros(2, S, S, dtype=torch.long)
    label[:, 4:16, 4:16] = 1
    f = net.encode(torch.rand(2, S, S))
    out = net.step(f, f, f, net.initial_state(2))
    assert out.dense is not None and out.dense.shape == (2, C + 1, net.feature_size, net.feature_size)
    terms = SAutoMedLoss(LossWeights(dense=2.0), C)(out, label)
    without = SAutoMedLoss(LossWeights(dense=0.0), C)(out, label)
    torch.testing.assert_close(terms["loss"], without["loss"] + 2.0 * terms["dense"])
    torch.testing.assert_close(terms["dense"], dense_loss(out.dense, label))
    terms["loss"].backward()
    assert all(p.grad is not None for p in net.dense_head.parameters())


def _volume(z: int = 10) -> Prepared:
    rng = np.random.default_rng(0)
    label = np.zeros((z, S, S), np.uint8)
    label[2:8, 8:20, 8:20] = 1
    label[4:6, 22:28, 4:10] = 2
    image = (rng.random((z, S, S)) * 0.2 + 0.6 * (label > 0)).astype(np.float32)
    return Prepared("v", image, label, None)


def test_pretraining_fills_the_chain_cache_and_learns_the_slices(tmp_path):
    net = _net()
    ds = WindowDataset([_volume(), _volume(12)], 8, 0, Augmentation(probability=1.0), 0.8, augmented_copies=2)
    cache: dict[int, torch.Tensor] = {}
    h0 = {k: v.clone() for k, v in net.dense_head.state_dict().items()}
    losses = pretrain_dense_head(net, ds.copies, ds.key_offset, cache, 150, seed=3)
    assert sorted(cache) == list(range(2 * 10 + 2 * 12))  # every slice of every copy, once
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:5])
    item = ds[(0, 1, 2)]  # the chain reads the very same features from the cache
    before = dict(cache)
    feats = encode_window_cached(net, item["image"][None], item["slice_key"][None], cache)
    assert cache.keys() == before.keys()
    torch.testing.assert_close(feats[0, 0], before[int(item["slice_key"][0])].float())
    again = _net()  # a seed repeats the pretraining exactly
    assert all(torch.equal(h0[k], v) for k, v in again.dense_head.state_dict().items())
    assert pretrain_dense_head(again, ds.copies, ds.key_offset, {}, 150, seed=3) == losses
    mapped = FeatureCache(limit_bytes=0, folder=tmp_path)  # over its limit: memory-mapped on disk
    mapped.expect(2 * 10 + 2 * 12)
    assert pretrain_dense_head(_net(), ds.copies, ds.key_offset, mapped, 150, seed=3) == losses
    assert mapped.where != "ram" and len(mapped) == 2 * 10 + 2 * 12  # the same steps, from the file
    vol = _volume()  # and what it learnt segments a volume of the kind
    with torch.no_grad():
        f = net.encode(torch.from_numpy(vol.image))
        pred = dense_volume_logits(net.dense_head, f).argmax(1)
    k = S // net.feature_size  # 4 x 4 features
    small = torch.from_numpy(vol.label[:, k // 2 :: k, k // 2 :: k].astype(np.int64))
    assert ((pred == 1) & (small == 1)).sum() > 0.5 * (small == 1).sum()


def test_dense_settings_are_refused_where_they_cannot_work():
    with pytest.raises(ValueError, match="box_prompts"):
        _net(box_prompts=False)
    plain = NetworkConfig(backbone="tiny", image_size=S, num_classes=C, encoder_finetune="full")
    with pytest.raises(ValueError, match="dense_pretrain_steps"):
        SAutoMedModule(network=plain, dense_pretrain_steps=10)
    with pytest.raises(ValueError, match="source: dense"):
        SAutoMedModule(network=plain, inference=InferenceSettings(source="dense"))


def test_fit_pretrains_the_dense_head_and_validate_reads_either_source(
    tiny_phantoms, tmp_path, make_config, caplog, tiny_sam_checkpoint
):
    from sautomed.cli import main

    run = tmp_path / "run"
    cfg = make_config(
        tmp_path / "c.yaml", tiny_phantoms, run, windows={"samples_per_epoch": 8, "augmented_copies": 2}
    )
    net = ["--model.network.encoder_finetune", "frozen", "--model.network.lora_rank", "0"]
    net += ["--model.network.sam_checkpoint", str(tiny_sam_checkpoint)]  # a frozen encoder needs a start
    net += ["--model.network.decoder", "per_class", "--model.network.dense_head", "true"]
    fit = [
        "fit",
        "--config",
        str(cfg),
        *net,
        "--model.dense_pretrain_steps",
        "30",
        "--trainer.limit_val_batches",
        "0",
    ]
    with caplog.at_level("INFO", logger="sautomed.models.sautomed.dense"):
        assert main(fit) == 0
    found = re.search(
        r"dense head pretrained: 30 of 30 steps .* \(no clock\) on (\d+) cached slices .*, "
        r"loss ([\d.]+) -> ([\d.]+)",
        caplog.text,
    )
    assert found and int(found[1]) >= 2 * 2 * 10  # every slice of both copies of the training cases
    assert float(found[3]) < float(found[2])
    ckpt = torch.load(run / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["sautomed"]["network"]["dense_head"] is True
    assert any(k.startswith("net.dense_head.") for k in ckpt["state_dict"])
    scores = {}
    for source in ("chain", "dense"):
        out = tmp_path / source
        args = ["validate", "--config", str(cfg), *net, "--ckpt_path", str(run / "last.ckpt")]
        args += ["--trainer.default_root_dir", str(out), "--model.inference.source", source]
        assert main(args) == 0
        scores[source] = (out / "summary.json").read_text()
    assert scores["chain"] != scores["dense"]  # two different segmentations of the same cases
    image = sorted((tiny_phantoms / "test" / "imagesTr").iterdir())[0]
    written = {}
    for source in ("chain", "dense"):  # predict reads either source too, on the input's grid
        out = tmp_path / f"pred_{source}"
        argv = ["predict", "--ckpt_path", str(run / "last.ckpt"), "--input", str(image), "--output", str(out)]
        assert main([*argv, "--source", source, "--no-progress"]) == 0
        (written[source],) = out.glob("*.nii.gz")
    a, b = (sitk.ReadImage(str(written[k])) for k in ("chain", "dense"))
    assert a.GetOrigin() == b.GetOrigin() == sitk.ReadImage(str(image)).GetOrigin()
    assert not np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
    bad = ["fit", "--config", str(cfg), "--model.dense_pretrain_steps", "30", "--trainer.default_root_dir"]
    assert main([*bad, str(tmp_path / "bad")]) == 1  # no dense head: refused with one line, exit 1


def test_under_a_clock_the_pretraining_takes_its_share_of_the_time_left_and_anneals(monkeypatch, caplog):
    """A slower machine or more cases must not spend the whole budget here: with 10 s left after the
    encoding and a share of 0.5, steps that each take 1 s stop after 5 of the 150, the learning rate
    annealed by the clock; with no time left the head is not trained and the log says so."""
    from sautomed.models.sautomed import dense as dense_mod

    ds = WindowDataset([_volume()], 8, 0, Augmentation(probability=1.0), 0.8, augmented_copies=1)
    ticks = iter(range(10_000))
    monkeypatch.setattr(dense_mod.time, "monotonic", lambda: float(next(ticks)))  # 1 s per reading
    lrs: list[float] = []
    real_step = torch.optim.AdamW.step
    monkeypatch.setattr(
        torch.optim.AdamW,
        "step",
        lambda o, *a, **k: (lrs.append(o.param_groups[0]["lr"]), real_step(o, *a, **k))[1],
    )
    net = _net()
    losses = pretrain_dense_head(net, ds.copies, ds.key_offset, {}, 150, 3, lambda: 10.0, 0.5)
    assert len(losses) == 4  # readings at 1, 2, 3, 4 s of a 5 s share; the 5th ends it
    assert lrs[0] < dense_mod.PRETRAIN_LR and lrs == sorted(lrs, reverse=True) and lrs[-1] < 0.2 * lrs[0]
    with caplog.at_level("WARNING"):
        assert pretrain_dense_head(_net(), ds.copies, ds.key_offset, {}, 150, 3, lambda: 0.0, 0.5) == []
    assert "no time left" in caplog.text
