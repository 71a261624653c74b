"""Lesion phantoms: nnU-Net layout, BraTS labels, deterministic."""

from __future__ import annotations

import json

import numpy as np

from sautomed.data.layouts import get_layout
from sautomed.data.lesion_phantom import make_lesion_phantoms


def test_lesion_phantoms(tmp_path):
    make_lesion_phantoms(tmp_path / "a", 2, seed=4, size=(32, 32, 32))
    make_lesion_phantoms(tmp_path / "b", 2, seed=4, size=(32, 32, 32))
    spec = json.loads((tmp_path / "a" / "dataset.json").read_text())
    assert spec["labels"]["edema"] == 2 and spec["numTraining"] == 2
    la, lb = get_layout("nnunet", str(tmp_path / "a"), None), get_layout("nnunet", str(tmp_path / "b"), None)
    for ca, cb in zip(la.cases(), lb.cases()):
        a, b = la.load(ca), lb.load(cb)
        assert a.image.shape == (32, 32, 32)
        assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
        fraction = (a.label > 0).mean()
        assert 0.001 < fraction < 0.3  # a lesion: small but present
        assert {2, 4} <= set(np.unique(a.label))


def test_mimics_change_the_image_not_the_labels(tmp_path):
    make_lesion_phantoms(tmp_path / "plain", 3, seed=2, size=(32, 32, 32))
    make_lesion_phantoms(tmp_path / "mimic", 3, seed=2, size=(32, 32, 32), mimics=3)
    plain, mimic = (get_layout("nnunet", str(tmp_path / n), None) for n in ("plain", "mimic"))
    changed = 0
    for cp, cm in zip(plain.cases(), mimic.cases()):
        a, b = plain.load(cp), mimic.load(cm)
        assert np.array_equal(a.label, b.label)
        changed += int(not np.array_equal(a.image, b.image))
    assert changed >= 1
