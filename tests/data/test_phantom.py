from __future__ import annotations

import json

import numpy as np
import SimpleITK as sitk

from sautomed.data.check import check_dataset
from sautomed.data.layouts import get_layout
from sautomed.data.phantom import CLASSES, make_phantoms


def test_deterministic_bytes(tmp_path):
    a = make_phantoms(tmp_path / "a", cases=2, seed=11, size=(12, 32, 32))
    b = make_phantoms(tmp_path / "b", cases=2, seed=11, size=(12, 32, 32))
    c = make_phantoms(tmp_path / "c", cases=2, seed=12, size=(12, 32, 32))
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert [str(f) for f in files] == [
        "dataset.json",
        "imagesTr/phantom_000_0000.nii.gz",
        "imagesTr/phantom_001_0000.nii.gz",
        "labelsTr/phantom_000.nii.gz",
        "labelsTr/phantom_001.nii.gz",
    ]
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert (a / files[1]).read_bytes() != (c / files[1]).read_bytes()


def test_phantom_content(phantoms):
    spec = json.loads((phantoms / "dataset.json").read_text())
    assert spec["labels"] == {"background": 0, **{n: i + 1 for i, n in enumerate(CLASSES)}}
    assert len(CLASSES) >= 4 and spec["numTraining"] == 4
    layout = get_layout("nnunet", phantoms)
    directions, spacings, means = set(), set(), {}
    for case in layout.cases():
        loaded = layout.load(case)
        label, image, geom = loaded.label, loaded.image, loaded.geom
        assert set(np.unique(label)) == set(range(len(CLASSES) + 1))
        present = np.array(
            [[(label[z] == c).any() for c in range(1, len(CLASSES) + 1)] for z in range(len(label))]
        )
        assert not present[:, :4].all(axis=0).any()  # the organs are absent from some slices
        assert present[:, :4].any(axis=0).all()
        sz, sy, sx = geom.spacing_zyx
        assert sz > 2 * sy and sy == sx  # anisotropic
        directions.add(geom.direction)
        spacings.add(geom.spacing_zyx)
        assert -1100 < image.min() and image.max() < 1100  # HU-like
        for c in range(1, len(CLASSES) + 1):
            means.setdefault(c, []).append(float(image[label == c].mean()))
        # sides: right kidney (2) at smaller canonical x than the left kidney (3)
        xs = [np.argwhere(label == c)[:, 2].mean() for c in (2, 3)]
        assert xs[0] < xs[1]
        assert (phantoms / "imagesTr" / f"{case.case_id}_0000.nii.gz").stat().st_size < 1_000_000
    assert len(directions) >= 3 and len(spacings) == 4  # varying grids, non-identity directions
    assert (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0) in directions
    # look-alikes: the two kidneys, and liver vs spleen, share intensities
    assert abs(np.mean(means[2]) - np.mean(means[3])) < 20 and abs(np.mean(means[1]) - np.mean(means[4])) < 20
    assert check_dataset(layout).ok


def test_stored_orders_differ(phantoms):
    sizes = {sitk.ReadImage(str(p)).GetSize() for p in (phantoms / "imagesTr").iterdir()}
    assert any(s[1] < s[2] for s in sizes)  # the coronal-order case stores z as index axis 1
