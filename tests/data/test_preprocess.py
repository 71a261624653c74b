from __future__ import annotations

import numpy as np
import pytest

from sautomed.data import layouts
from sautomed.data.layouts import get_layout
from sautomed.data.layouts import layout as layout_module
from sautomed.data.preprocess import Preprocessing, VolumeCache, normalize, preprocess, resize_slices


def test_normalize_ct_and_percentile():
    image = np.array([[[-1000.0, -125.0, 75.0, 275.0, 3000.0]]], np.float32)
    out = normalize(image, Preprocessing())
    assert out.dtype == np.float32 and out.ravel().tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]
    mr = np.random.default_rng(0).gamma(2.0, 100.0, (4, 16, 16)).astype(np.float32)
    out = normalize(mr, Preprocessing(normalization="percentile"))
    assert out.min() == 0.0 and out.max() == 1.0 and 0.1 < out.mean() < 0.5
    assert not normalize(np.full((2, 3, 3), 7.0), Preprocessing(normalization="percentile")).any()
    with pytest.raises(ValueError, match="normalization"):
        normalize(mr, Preprocessing(normalization="zscore"))


def test_foreground_percentiles_ignore_the_background_share():
    """A skull-stripped scan: the same brain in more or less constant background. Over the whole volume the
    99.5th percentile moves with the background's share (a small volume of brain: it falls inside the
    bright lesion); over the foreground it does not."""
    rng = np.random.default_rng(0)
    brain = rng.normal(0.0, 1.0, (6, 20, 20)).astype(np.float32)
    brain[2:4, 5:9, 5:9] += 3.0  # a bright lesion, 4 % of the brain
    ref = (np.asarray(brain) > 2.0) & (np.arange(6)[:, None, None] >= 2)

    def scan(pad: int) -> np.ndarray:
        return np.pad(brain, ((0, 0), (pad, pad), (pad, pad)), constant_values=-4.0)

    fg = Preprocessing(normalization="percentile", percentile_region="foreground")
    vol = Preprocessing(normalization="percentile")
    small, large = normalize(scan(2), fg), normalize(scan(40), fg)
    np.testing.assert_allclose(small[:, 2:-2, 2:-2], large[:, 40:-40, 40:-40], atol=1e-6)
    assert (large[:, :40] == 0).all()  # the background at the bottom of the range
    a, b = normalize(scan(2), vol)[:, 2:-2, 2:-2], normalize(scan(40), vol)[:, 40:-40, 40:-40]
    assert np.abs(a - b).max() > 0.05  # the volume's percentiles move with the background
    assert (b[ref] >= 1.0).mean() > (large[:, 40:-40, 40:-40][ref] >= 1.0).mean()  # the lesion saturates
    assert not normalize(np.full((2, 3, 3), 7.0), fg).any()  # no foreground: a constant image, zeros
    with pytest.raises(ValueError, match="percentile_region"):
        normalize(brain, Preprocessing(normalization="percentile", percentile_region="body"))


def test_foreground_region_has_its_own_cache_key_and_old_keys_stay(tmp_path, phantoms):
    layout = get_layout("nnunet", phantoms)
    case = layout.cases()[0]
    cache = VolumeCache(tmp_path)
    plain = Preprocessing(image_size=16, normalization="percentile")
    fg = Preprocessing(image_size=16, normalization="percentile", percentile_region="foreground")
    assert cache.path(layout, case, plain) != cache.path(layout, case, fg)
    # the key of the default region is the key the settings gave before the region existed
    from dataclasses import asdict

    from sautomed.data import preprocess as pre

    old = asdict(plain)
    del old["percentile_region"]
    assert pre._key_settings(plain) == old


def test_resize_slices():
    labels = np.random.default_rng(1).integers(0, 4, (3, 37, 53)).astype(np.uint8)
    for size in (16, 64):
        out = resize_slices(labels, size, nearest=True)
        assert out.shape == (3, size, size) and out.dtype == np.uint8
        assert set(np.unique(out)) <= set(np.unique(labels))
    image = np.random.default_rng(2).random((3, 37, 53)).astype(np.float32)
    small = resize_slices(image, 16, nearest=False)
    assert small.shape == (3, 16, 16) and small.dtype == np.float32
    assert 0.0 <= small.min() and small.max() <= 1.0 and abs(small.mean() - image.mean()) < 0.02
    assert resize_slices(image, (37, 53), nearest=False).shape == (3, 37, 53)
    back = resize_slices(resize_slices(labels, 128, nearest=True), (37, 53), nearest=True)
    assert (back == labels).mean() > 0.95


def test_preprocess_types():
    image = np.random.default_rng(3).normal(0, 200, (2, 20, 30)).astype(np.float32)
    label = (image > 0).astype(np.uint8)
    out, lab = preprocess(image, label, Preprocessing(image_size=32))
    assert out.shape == lab.shape == (2, 32, 32) and out.dtype == np.float16 and lab.dtype == np.uint8
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert preprocess(image, None, Preprocessing(image_size=32))[1] is None


@pytest.fixture
def read_counter(monkeypatch):
    calls = []
    original = layout_module.read_volume

    def counting(path):
        calls.append(path)
        return original(path)

    monkeypatch.setattr(layout_module, "read_volume", counting)
    return calls


def test_cache_reads_once_and_recovers(tmp_path, phantoms, read_counter):
    layout = get_layout("nnunet", phantoms)
    case = layout.cases()[1]
    p = Preprocessing(image_size=32)
    cache = VolumeCache(tmp_path / "cache")
    first = cache.get(layout, case, p)
    assert len(read_counter) == 1
    assert (
        first.image.shape[1:] == (32, 32)
        and first.image.dtype == np.float16
        and first.label.dtype == np.uint8
    )
    assert 0.0 <= float(first.image.min()) and float(first.image.max()) <= 1.0
    second = cache.get(layout, case, p)
    assert len(read_counter) == 1  # no image read the second time
    assert np.array_equal(first.image, second.image) and np.array_equal(first.label, second.label)
    assert second.geom == first.geom and np.array_equal(first.label_full, second.label_full)
    assert first.label_full.shape == first.geom.shape_zyx and first.label_full.dtype == np.uint8
    (path,) = list((tmp_path / "cache").iterdir())
    assert path.suffix == ".npz" and not path.name.startswith(".")

    # changed settings: another key, another file
    other = cache.get(layout, case, Preprocessing(image_size=16))
    assert other.image.shape[1:] == (16, 16) and len(read_counter) == 2
    assert cache.path(layout, case, p) != cache.path(layout, case, Preprocessing(image_size=16))
    assert cache.path(layout, case, p) != cache.path(
        layout, case, Preprocessing(image_size=32, window=(-100, 200))
    )

    # a half-written cache file is detected and recomputed
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="unusable cache file"):
        again = cache.get(layout, case, p)
    assert len(read_counter) == 3 and np.array_equal(again.image, first.image)
    # a file whose arrays were altered (checksum mismatch) is recomputed too
    import zipfile

    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    image = bytearray(members["image.npy"])
    image[-1] ^= 0xFF
    members["image.npy"] = bytes(image)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, blob in members.items():
            z.writestr(name, blob)
    with pytest.warns(UserWarning, match="checksum"):
        cache.get(layout, case, p)
    assert len(read_counter) == 4
    assert not [q for q in (tmp_path / "cache").iterdir() if ".tmp-" in q.name]


def test_cache_off_and_content_key(tmp_path, phantoms, read_counter):
    layout = get_layout("nnunet", phantoms)
    case = layout.cases()[0]
    p = Preprocessing(image_size=16)
    off = VolumeCache(None)
    off.get(layout, case, p)
    off.get(layout, case, p)
    assert len(read_counter) == 2
    # the key follows the file content (a copy elsewhere has the same key) and the label map
    cache = VolumeCache(tmp_path)
    copy = layouts.Case(case.case_id, case.image, case.label)
    assert cache.path(layout, case, p) == cache.path(layout, copy, p)
    remapped = layouts.Layout(
        layout.name, layout.root, layout.class_names[:1], layout.label_map[:1], unmapped="background"
    )
    assert cache.path(layout, case, p) != cache.path(remapped, case, p)


def test_a_checkpoint_before_the_region_setting_matches_volume_percentiles_only():
    from sautomed.evaluation.base import input_mismatch

    old = {"image_size": 16, "normalization": "percentile", "window": [-125, 275], "percentiles": [0.5, 99.5]}
    names = ("background", "lesion")
    assert input_mismatch(names, old, names, {**old, "percentile_region": "volume"}) is None
    problem = input_mismatch(names, old, names, {**old, "percentile_region": "foreground"})
    assert problem is not None and "percentile_region foreground (the checkpoint: volume)" in problem
    ct = {**old, "normalization": "ct"}  # no percentiles for CT: the region means nothing there
    assert input_mismatch(names, ct, names, {**ct, "percentile_region": "foreground"}) is None
