"""`sautomed evaluate`: per-case DSC as an independent numpy scorer, missing predictions, grid checks."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from sautomed.cli import main


def numpy_dsc(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def rows_of(out: Path) -> dict[tuple[str, str], dict[str, str]]:
    with open(out / "metrics.csv") as f:
        return {(r["case"], r["class"]): r for r in csv.DictReader(f)}


CLASSES = ("liver", "right_kidney", "left_kidney", "spleen", "aorta")


@pytest.fixture()
def predictions(small_phantoms, tmp_path) -> Path:
    """Imperfect predictions named as `predict` names them (`<case>_0000.nii.gz`), on the stored grids."""
    pred = tmp_path / "pred"
    pred.mkdir()
    for k, label in enumerate(sorted((small_phantoms / "labelsTr").iterdir())):
        ref = sitk.ReadImage(str(label))
        arr = sitk.GetArrayFromImage(ref)
        arr = np.roll(arr, k + 1, axis=2)  # shifted by 1, 2, 3 voxels along the stored x axis
        arr[arr == 2] = 0 if k == 0 else 2  # case 0 misses class 2
        img = sitk.GetImageFromArray(arr.astype(np.uint8))
        img.CopyInformation(ref)
        sitk.WriteImage(img, str(pred / label.name.replace(".nii.gz", "_0000.nii.gz")))
    return pred


def test_per_case_dsc_matches_an_independent_scorer(small_phantoms, predictions, tmp_path):
    out = tmp_path / "eval"
    assert (
        main(["evaluate", "--pred", str(predictions), "--ref", str(small_phantoms), "--out", str(out)]) == 0
    )
    rows = rows_of(out)
    for label in sorted((small_phantoms / "labelsTr").iterdir()):
        case = label.name.replace(".nii.gz", "")
        ref = sitk.GetArrayFromImage(sitk.ReadImage(str(label)))
        pred = sitk.GetArrayFromImage(sitk.ReadImage(str(predictions / f"{case}_0000.nii.gz")))
        for value, name in enumerate(CLASSES, start=1):
            row = rows[(case, name)]
            r, p = ref == value, pred == value
            if r.any() and p.any():
                assert row["status"] == "ok"
                assert float(row["dsc"]) == pytest.approx(numpy_dsc(p, r), abs=1e-6)
            elif r.any():
                assert row["status"] == "missed" and float(row["dsc"]) == 0.0
    assert rows[("phantom_000", "right_kidney")]["status"] == "missed"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_cases"] == 3 and summary["missing_predictions"] == [] and summary["failed"] == {}
    assert "phantom_002" in (out / "report.html").read_text()
    assert sorted(p.name for p in (out / "thumbnails").iterdir()) == [f"phantom_00{i}.png" for i in range(3)]
    # nothing the user had is overwritten
    assert (
        main(["evaluate", "--pred", str(predictions), "--ref", str(small_phantoms), "--out", str(out)]) == 1
    )


def test_missing_prediction_is_a_missed_case_for_every_class_present(
    small_phantoms, predictions, tmp_path, capsys
):
    (predictions / "phantom_001_0000.nii.gz").unlink()
    (predictions / "unrelated.nii.gz").write_bytes((predictions / "phantom_000_0000.nii.gz").read_bytes())
    assert main(["evaluate", "--pred", str(predictions), "--ref", str(small_phantoms)]) == 0
    err = capsys.readouterr().err
    assert "phantom_001" in err and "unrelated.nii.gz" in err
    ref = sitk.ReadImage(str(small_phantoms / "labelsTr" / "phantom_001.nii.gz"))
    arr = sitk.GetArrayFromImage(ref)
    diagonal = float(np.sqrt(sum((n * s) ** 2 for n, s in zip(ref.GetSize(), ref.GetSpacing()))))
    rows = rows_of(predictions)  # --out defaults to --pred
    for value, name in enumerate(CLASSES, start=1):
        row = rows[("phantom_001", name)]
        if (arr == value).any():
            assert row["status"] == "missed" and float(row["dsc"]) == 0.0
            assert float(row["hd95_mm"]) == pytest.approx(diagonal, rel=1e-4)
        else:
            assert row["status"] == "not_applicable"
    summary = json.loads((predictions / "summary.json").read_text())
    assert summary["missing_predictions"] == ["phantom_001"] and summary["num_cases"] == 3
    assert summary["unmatched_predictions"][0].endswith("unrelated.nii.gz")


def _write_on_other_grid(src: Path, dst: Path) -> None:
    """The label upsampled x2 along the stored x axis, voxel centres placed so that nearest-neighbour
    resampling back onto the source grid is exact."""
    ref = sitk.ReadImage(str(src))
    arr = np.repeat(sitk.GetArrayFromImage(ref), 2, axis=2)
    img = sitk.GetImageFromArray(arr)
    sx, sy, sz = ref.GetSpacing()
    img.SetSpacing((sx / 2, sy, sz))
    img.SetDirection(ref.GetDirection())
    d = np.asarray(ref.GetDirection()).reshape(3, 3)
    img.SetOrigin(tuple(np.asarray(ref.GetOrigin()) - d[:, 0] * sx / 4))
    sitk.WriteImage(img, str(dst))


def test_prediction_on_another_grid_is_an_error_naming_the_case_or_resampled(
    small_phantoms, tmp_path, capsys
):
    pred = tmp_path / "pred"
    pred.mkdir()
    for label in (small_phantoms / "labelsTr").iterdir():
        shutil.copy(label, pred / label.name)  # perfect predictions ...
    _write_on_other_grid(small_phantoms / "labelsTr" / "phantom_002.nii.gz", pred / "phantom_002.nii.gz")
    argv = ["evaluate", "--pred", str(pred), "--ref", str(small_phantoms), "--layout", "nnunet"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 1
    err = capsys.readouterr().err
    assert "failed phantom_002" in err and "grid" in err and "--resample" in err
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert list(summary["failed"]) == ["phantom_002"] and summary["num_cases"] == 2

    assert main([*argv, "--out", str(tmp_path / "b"), "--resample"]) == 0
    assert "resampled" in capsys.readouterr().err
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["resampled"] == ["phantom_002"] and summary["num_cases"] == 3
    assert summary["mean_dsc"] == pytest.approx(1.0)  # exact on the reference grid


def test_prediction_values_follow_the_label_table_by_name(small_phantoms, tmp_path, capsys):
    pred = tmp_path / "pred"
    pred.mkdir()
    order = ("spleen", "aorta", "liver", "right_kidney", "left_kidney")  # another model's class order
    for label in (small_phantoms / "labelsTr").iterdir():
        ref = sitk.ReadImage(str(label))
        arr = sitk.GetArrayFromImage(ref)
        out = np.zeros_like(arr)
        for value, name in enumerate(CLASSES, start=1):
            out[arr == value] = order.index(name) + 1
        out[0, 0, :3] = 6  # a class the reference does not annotate (background there)
        img = sitk.GetImageFromArray(out)
        img.CopyInformation(ref)
        sitk.WriteImage(img, str(pred / label.name))
    table = {"labels": {str(v): {"name": n} for v, n in enumerate((*order, "bladder"), start=1)}}
    (pred / "labels.json").write_text(json.dumps(table))
    assert main(["evaluate", "--pred", str(pred), "--ref", str(small_phantoms)]) == 0
    assert "['bladder'] are not in the reference" in capsys.readouterr().err
    summary = json.loads((pred / "summary.json").read_text())
    assert summary["mean_dsc"] == pytest.approx(1.0)
    (pred / "labels.json").unlink()  # values then read as class indices: value 6 is unknown ...
    assert main(["evaluate", "--pred", str(pred), "--ref", str(small_phantoms), "--overwrite"]) == 1
    assert "values [6]" in capsys.readouterr().err
    for f in pred.glob("*.nii.gz"):  # ... and without it the classes are the wrong ones: low DSC
        img = sitk.ReadImage(str(f))
        arr = sitk.GetArrayFromImage(img)
        arr[arr == 6] = 0
        fixed = sitk.GetImageFromArray(arr)
        fixed.CopyInformation(img)
        sitk.WriteImage(fixed, str(f))
    assert main(["evaluate", "--pred", str(pred), "--ref", str(small_phantoms), "--overwrite"]) == 0
    assert json.loads((pred / "summary.json").read_text())["mean_dsc"] < 0.5


def test_a_corrupt_prediction_is_reported_by_name_and_the_rest_are_scored(small_phantoms, tmp_path, capsys):
    pred = tmp_path / "pred"
    pred.mkdir()
    for label in (small_phantoms / "labelsTr").iterdir():
        shutil.copy(label, pred / label.name)
    (pred / "phantom_000.nii.gz").write_bytes(b"\x1f\x8b\x08 not a volume")  # gzip header, broken body
    assert main(["evaluate", "--pred", str(pred), "--ref", str(small_phantoms)]) == 1
    err = capsys.readouterr().err
    assert f"failed phantom_000: {pred / 'phantom_000.nii.gz'}" in err and "Traceback" not in err
    summary = json.loads((pred / "summary.json").read_text())
    assert list(summary["failed"]) == ["phantom_000"] and summary["num_cases"] == 2
    assert summary["mean_dsc"] == pytest.approx(1.0)


def test_another_tools_maps_without_a_label_table_are_scored_by_the_values_found(
    small_phantoms, tmp_path, capsys
):
    refs, pred = tmp_path / "refs", tmp_path / "pred"
    shutil.copytree(small_phantoms / "labelsTr", refs)
    shutil.copytree(small_phantoms / "labelsTr", pred)  # a perfect prediction, named by case id
    out = tmp_path / "out"
    assert main(["evaluate", "--pred", str(pred), "--ref", str(refs), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "no label table" in err and "scored by value as label_1, label_2" in err
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["per_class"]) == [f"label_{v}" for v in range(1, 6)]
    assert summary["mean_dsc"] == pytest.approx(1.0)
