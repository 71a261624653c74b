"""Training windows, the epoch-seeded batch sampler, DDP sharding without duplicates, volume loaders."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from sautomed.data.augment import Augmentation, augment_window
from sautomed.data.datamodule import SegmentationDataModule, ShardSampler, WindowBatchSampler, WindowDataset
from sautomed.data.preprocess import Prepared, Preprocessing


def _volume(z=12, s=16, case="a"):
    image = np.tile(np.arange(z, dtype=np.float32)[:, None, None] / z, (1, s, s))
    label = np.zeros((z, s, s), np.uint8)
    label[3:9, 4:10, 4:10] = 1
    return Prepared(case, image.astype(np.float16), label, None)


def test_window_holds_warmups_target_and_neighbours_in_processing_order():
    ds = WindowDataset(
        [_volume()], 50, seed=0, augmentation=Augmentation(enabled=False), foreground_fraction=1.0
    )
    for i in range(50):
        n = 1 + i % 3
        item = ds[(0, i, n)]
        idx, d = item["index"].numpy(), item["direction"]
        assert item["image"].shape == (n + 3, 16, 16)
        t = idx[n + 1]
        assert 3 <= t <= 8  # foreground slices only (foreground_fraction = 1)
        expected = np.clip(t + (np.arange(n + 3) - (n + 1)) * d, 0, 11)
        np.testing.assert_array_equal(idx, expected)
        # the image slices are the indexed ones (the volume stores z / Z as intensity)
        np.testing.assert_allclose(item["image"][:, 0, 0].numpy(), idx / 12, atol=1e-3)
        assert item["label"].shape == (16, 16) and item["label"].dtype == torch.int64
        vol = ds.volumes[0]
        np.testing.assert_array_equal(item["label"].numpy(), vol.label[t])
        np.testing.assert_array_equal(item["warmup_label"].numpy(), vol.label[idx[1 : n + 1]])


def test_warmups_fit_inside_the_volume_when_possible():
    ds = WindowDataset([_volume(z=12)], 64, 0, Augmentation(enabled=False), foreground_fraction=0.0)
    for i in range(64):
        idx = ds[(0, i, 3)]["index"].numpy()
        # warm-ups and target never clamp in a 12-slice volume; only the far neighbour may repeat an edge
        assert len(set(idx[:5].tolist())) == 5


def test_class_balanced_targets_reach_a_rare_class_as_often_as_a_common_one():
    vol = _volume(z=40)
    vol.label[:] = 0
    vol.label[2:38, 2:6, 2:6] = 1  # common: 36 slices
    vol.label[20, 10:12, 10:12] = 2  # rare: one slice
    counts = {}
    for balanced in (False, True):
        ds = WindowDataset([vol], 400, 0, Augmentation(enabled=False), 1.0, class_balanced=balanced)
        targets = [int(ds[(0, i, 1)]["index"][2]) for i in range(400)]
        assert all(2 <= t < 38 for t in targets)  # foreground slices only
        counts[balanced] = sum(t == 20 for t in targets)
    assert counts[False] < 30  # about 400 / 36 = 11 when slices are drawn uniformly
    assert 160 <= counts[True] <= 240  # about half the targets: class 2 is drawn as often as class 1


def test_batch_sampler_is_seeded_per_epoch_and_constant_warmups_per_batch():
    s = WindowBatchSampler(20, 4, (1, 3), seed=5)
    first = list(s)
    assert list(s) == first  # repeatable
    assert all(len({k[2] for k in b}) == 1 for b in first)  # one warm-up count per batch
    assert {k[2] for b in first for k in b} <= {1, 2, 3}
    s.sampler.set_epoch(1)
    second = list(s)
    assert second != first and all(k[0] == 1 for b in second for k in b)
    assert sorted(k[1] for b in second for k in b) == list(range(20))


def test_shard_sampler_covers_every_item_exactly_once(monkeypatch):
    import sautomed.data.samplers as samplers

    seen = []
    for rank in range(3):
        monkeypatch.setattr(samplers, "rank_world", lambda r=rank: (r, 3))
        seen += list(ShardSampler(7))
    assert sorted(seen) == list(range(7))


def test_augmentation_is_identical_across_the_window_and_keeps_label_values():
    img = torch.rand(1, 32, 32).repeat(4, 1, 1)
    lab = torch.zeros(32, 32, dtype=torch.long)
    lab[8:20, 10:22] = 3
    out, out_lab = augment_window(
        img, lab, np.random.default_rng(1), Augmentation(probability=1.0, noise_std=0)
    )
    for k in range(1, 4):
        torch.testing.assert_close(out[k], out[0])
    assert set(out_lab.unique().tolist()) <= {0, 3}
    # several labels (warm-ups and target) take the same transform as one
    _, labs = augment_window(
        img, lab.repeat(3, 1, 1), np.random.default_rng(1), Augmentation(probability=1.0, noise_std=0)
    )
    assert labs.shape == (3, 32, 32) and all(torch.equal(x, out_lab) for x in labs)


def test_shift_moves_image_and_label_together_and_off_repeats_the_plain_draws():
    img = torch.zeros(1, 64, 64)
    img[0, 20:30, 20:30] = 1.0
    lab = (img[0] > 0).long() * 2
    plain = Augmentation(
        probability=1.0, noise_std=0, rotate_deg=0, scale=(1, 1), gamma=(1, 1), contrast=(1, 1)
    )
    still, still_lab = augment_window(img, lab, np.random.default_rng(3), plain)
    assert torch.equal(still_lab, lab)  # identity transform: shift 0 draws nothing and moves nothing
    moved, moved_lab = augment_window(img, lab, np.random.default_rng(3), replace(plain, shift=0.2))
    ys, xs = (moved_lab == 2).nonzero(as_tuple=True)
    assert abs(float(ys.float().mean()) - 24.5) + abs(float(xs.float().mean()) - 24.5) > 1.0
    assert ((moved[0] > 0.5) == (moved_lab == 2)).float().mean() > 0.99  # the same move for both
    # off, the rng is left exactly where the plain augmentation leaves it
    r1, r2 = np.random.default_rng(5), np.random.default_rng(5)
    augment_window(img, lab, r1, Augmentation(probability=1.0))
    augment_window(img, lab, r2, Augmentation(probability=1.0, shift=0.0, bias_field=0.0))
    assert r1.random() == r2.random()


def test_bias_field_is_smooth_multiplicative_and_leaves_the_label():
    img = torch.full((2, 32, 32), 0.5)
    lab = torch.zeros(32, 32, dtype=torch.long)
    lab[4:9, 4:9] = 1
    cfg = Augmentation(
        probability=1.0,
        noise_std=0,
        rotate_deg=0,
        scale=(1, 1),
        gamma=(1, 1),
        contrast=(1, 1),
        bias_field=0.3,
    )
    out, out_lab = augment_window(img, lab, np.random.default_rng(0), cfg)
    assert torch.equal(out_lab, lab) and torch.equal(out[0], out[1])
    ratio = out[0] / 0.5
    assert ratio.std() > 0.01 and ratio.min() > np.exp(-1.5) and ratio.max() < np.exp(1.5)
    assert (ratio[:, 1:] - ratio[:, :-1]).abs().max() < 0.1  # smooth: neighbours differ little


def test_datamodule_init_does_no_io(tmp_path):
    dm = SegmentationDataModule(
        root=str(tmp_path / "does-not-exist"), preprocessing=Preprocessing(image_size=32)
    )
    assert dm.root.endswith("does-not-exist")  # nothing was read or checked yet
    with pytest.raises(ValueError):
        _ = dm.layout  # discovery happens on first use, with a clear error


def test_prepare_data_makes_missing_phantoms_and_keeps_an_existing_folder(tmp_path, caplog):
    from sautomed.data.datamodule import PhantomSettings
    from sautomed.data.phantom import make_phantoms

    root = tmp_path / "train"
    make_phantoms(root, 2, seed=0, size=(6, 16, 16))
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    dm = SegmentationDataModule(
        root=str(root), preprocessing=Preprocessing(image_size=16), phantoms=PhantomSettings(cases=3)
    )
    with caplog.at_level("WARNING"):
        dm.prepare_data()
    assert "already exists with 2 cases, the config asks for 3" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == before  # untouched

    fresh = tmp_path / "fresh"
    dm = SegmentationDataModule(
        root=str(fresh), preprocessing=Preprocessing(image_size=16), phantoms=PhantomSettings(cases=2)
    )
    dm.prepare_data()
    assert len(list((fresh / "imagesTr").glob("*.nii.gz"))) == 2
