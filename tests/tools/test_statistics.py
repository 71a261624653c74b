"""Label statistics against numpy on a phantom's reference label, and the CSV merge rule."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import SimpleITK as sitk

from sautomed.data.io import read_label_volume, read_volume
from sautomed.tools.statistics import case_statistics, update_statistics_csv

NAMES = ("liver", "right_kidney", "left_kidney", "spleen", "aorta")


def test_voxels_volume_and_mean_hu_match_numpy(small_phantoms):
    image_path = sorted((small_phantoms / "imagesTr").iterdir())[1]
    label_path = small_phantoms / "labelsTr" / image_path.name.replace("_0000", "")
    image, geom = read_volume(image_path)
    labels = read_label_volume(label_path, reference=geom)
    stats = case_statistics(labels, geom, NAMES, image)
    stored_labels = sitk.GetArrayFromImage(sitk.ReadImage(str(label_path)))
    stored_image = sitk.ReadImage(str(image_path))
    hu = sitk.GetArrayFromImage(stored_image).astype(np.float64)
    voxel_ml = np.prod(stored_image.GetSpacing()) / 1000.0
    checked = 0
    for value, name in enumerate(NAMES, start=1):
        mask = stored_labels == value
        entry = stats["classes"][name]
        assert entry["voxels"] == int(mask.sum())
        assert entry["volume_ml"] == pytest.approx(mask.sum() * voxel_ml)
        if mask.any():
            assert entry["mean_hu"] == pytest.approx(hu[mask].mean(), rel=1e-6)
            checked += 1
    assert checked >= 3
    assert "mean_hu" not in case_statistics(labels, geom, NAMES)["classes"]["liver"]  # MR: no intensity


def test_csv_keeps_other_cases_and_replaces_repeated_ones(small_phantoms, tmp_path):
    image, geom = read_volume(sorted((small_phantoms / "imagesTr").iterdir())[0])
    empty = np.zeros(geom.shape_zyx, np.uint8)
    full = np.ones(geom.shape_zyx, np.uint8)
    update_statistics_csv(
        tmp_path, {"a": case_statistics(empty, geom, NAMES), "b": case_statistics(empty, geom, NAMES)}
    )
    update_statistics_csv(tmp_path, {"b": case_statistics(full, geom, NAMES)})
    with open(tmp_path / "statistics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["case"] for r in rows] == ["a"] * 5 + ["b"] * 5
    assert next(r for r in rows if r["case"] == "b" and r["class"] == "liver")["voxels"] == str(full.size)
    assert next(r for r in rows if r["case"] == "a" and r["class"] == "liver")["voxels"] == "0"
