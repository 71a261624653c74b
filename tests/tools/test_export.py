"""`sautomed export`: CHAOS PNGs in DICOM order (checked against the real ground truth), SegTHOR NIfTI."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from sautomed.cli import main
from sautomed.data.io import dicom_series_files, dicom_tags, read_volume, to_canonical, write_label_volume
from sautomed.data.layouts import get_layout, read_png_stack
from sautomed.tools.export import CHAOS_GREY, to_target_values


def _number(path) -> int:
    return int(re.findall(r"\d+", path.stem)[-1])


def test_chaos_ct_export_matches_the_ground_truth_slice_for_slice(shared, tmp_path, capsys):
    layout = get_layout("chaos", shared / "chaos-ct")
    case = layout.cases()[0]
    loaded = layout.load(case)  # PNGs matched to DICOM slices by the layout's rule
    pred = tmp_path / "pred" / f"{case.case_id}.nii.gz"
    write_label_volume(loaded.label, loaded.geom, pred)
    out = tmp_path / "out"
    argv = [
        "export",
        "--format",
        "chaos-png",
        "--pred",
        str(pred),
        "--dicom",
        str(case.image),
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    results = out / case.case_id / "Results"
    exported = sorted(results.iterdir(), key=_number)
    ground = sorted(case.label.iterdir(), key=_number)
    assert [_number(p) for p in exported] == list(range(len(ground)))
    for ours, theirs in zip(exported, ground):  # the k-th PNG of ours is the k-th ground-truth PNG
        a = np.asarray(Image.open(ours))
        b = np.asarray(Image.open(theirs).convert("L")) > 0
        assert a.dtype == np.uint8 and set(np.unique(a)) <= {0, 255}
        np.testing.assert_array_equal(a == 255, b, err_msg=f"{ours.name} vs {theirs.name}")
    assert sum(np.asarray(Image.open(p)).any() for p in exported) > 10  # the liver is in many slices
    back = layout.remap(read_png_stack(results, case.image, loaded.geom))  # and reads back onto the volume
    np.testing.assert_array_equal(back, loaded.label)
    before = {p.name: p.stat().st_mtime_ns for p in results.iterdir()}
    assert main(argv) == 1  # an existing export is kept
    assert "exists" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in results.iterdir()} == before
    assert main([*argv, "--overwrite"]) == 0
    assert not [p for p in (out / case.case_id).iterdir() if p.name.startswith(".")]  # no temporaries left


def test_chaos_export_refuses_a_prediction_on_another_grid(shared, tmp_path, capsys):
    series = shared / "chaos-ct" / "Train_Sets" / "CT" / "1" / "DICOM_anon"
    pred = tmp_path / "1.nii.gz"
    sitk.WriteImage(sitk.Image([64, 64, 8], sitk.sitkUInt8), str(pred))
    argv = [
        "export",
        "--format",
        "chaos-png",
        "--pred",
        str(pred),
        "--dicom",
        str(series),
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "1.nii.gz" in err and "grid" in err and not (tmp_path / "1").exists()


def test_mr_grey_values_by_class_name():
    labels = np.array([[0, 1, 2, 3, 4, 5]])
    names = {1: "spleen", 2: "liver", 3: "left_kidney", 4: "right_kidney", 5: "aorta"}
    with pytest.warns(UserWarning, match="aorta"):
        grey = to_target_values(labels, names, CHAOS_GREY["MR"], (), "x")
    assert grey.tolist() == [[0, 252, 63, 189, 126, 0]]


def test_segthor_export_maps_classes_by_name_and_keeps_the_grid(shared, tmp_path):
    gt_path = shared / "segthor" / "train" / "Patient_01" / "GT.nii.gz"
    gt = sitk.ReadImage(str(gt_path))
    truth = sitk.GetArrayFromImage(gt)
    order = ("aorta", "trachea", "heart", "esophagus")  # another model's class order
    segthor = ("esophagus", "heart", "trachea", "aorta")
    pred = np.zeros_like(truth)
    for value, name in enumerate(segthor, start=1):
        pred[truth == value] = order.index(name) + 1
    folder = tmp_path / "pred"
    folder.mkdir()
    img = sitk.GetImageFromArray(pred.astype(np.uint8))
    img.CopyInformation(gt)
    sitk.WriteImage(img, str(folder / "Patient_01_0000.nii.gz"))
    (folder / "labels.json").write_text(json.dumps({"labels": {str(v): n for v, n in enumerate(order, 1)}}))
    out = tmp_path / "out"
    assert main(["export", "--format", "segthor", "--pred", str(folder), "--out", str(out)]) == 0
    written = sitk.ReadImage(str(out / "Patient_01.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), truth)
    assert written.GetSpacing() == gt.GetSpacing() and written.GetOrigin() == gt.GetOrigin()
    assert written.GetDirection() == gt.GetDirection() and written.GetPixelID() == sitk.sitkUInt8


def _write_mr_series(folder, volume, spacing=(1.5, 1.5, 6.0)):
    """A synthetic MR DICOM series (CHAOS style: InstanceNumber grows as the slice position falls)."""
    folder.mkdir(parents=True)
    nz = volume.shape[0]
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(nz):
        sl = sitk.GetImageFromArray(volume[z].astype(np.int16))
        position = (0.0, 0.0, spacing[2] * (nz - 1 - z))
        for tag, value in (
            ("0008|0060", "MR"),
            ("0020|000d", "1.2.826.0.1.3680043.2.1125.1"),
            ("0020|000e", "1.2.826.0.1.3680043.2.1125.2"),
            ("0020|0013", str(z + 1)),
            ("0020|0032", "\\".join(f"{v:.3f}" for v in position)),
            ("0020|0037", "1\\0\\0\\0\\1\\0"),
            ("0028|0030", f"{spacing[1]}\\{spacing[0]}"),
            ("0018|0050", str(spacing[2])),
            ("0008|0018", f"1.2.826.0.1.3680043.2.1125.3.{z + 1}"),
        ):
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"IMG-0001-{z + 1:05d}.dcm"))
        writer.Execute(sl)


def test_chaos_mr_batch_export_reads_back_through_the_chaos_layout(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.zeros((6, 24, 20), np.uint8)
    for value in range(1, 5):  # four organs, each at its own slices and rows
        labels[value, 4 * value : 4 * value + 3, 2 : 6 + value] = value
    root = tmp_path / "chaos" / "Train_Sets" / "MR"
    series = root / "7" / "T2SPIR" / "DICOM_anon"
    _write_mr_series(series, rng.integers(0, 500, labels.shape))
    _, geom = read_volume(series)
    instances = [int(dicom_tags(f, ("0020|0013",))["0020|0013"]) for f in dicom_series_files(series)]
    assert instances == [6, 5, 4, 3, 2, 1]  # the series runs by position: InstanceNumber order reversed
    canonical = to_canonical(labels[[i - 1 for i in instances]], geom)  # labels[k]: InstanceNumber k + 1
    preds = tmp_path / "pred"
    write_label_volume(canonical, geom, preds / "7_0000.nii.gz")
    out = tmp_path / "out"
    argv = ["export", "--format", "chaos-png", "--pred", str(preds), "--dicom", str(root), "--out", str(out)]
    assert main(argv) == 0
    results = out / "7" / "T2SPIR" / "Results"
    pngs = sorted(results.iterdir(), key=_number)
    assert len(pngs) == 6
    for k, png in enumerate(pngs):  # imgK is the slice with the K-th smallest InstanceNumber
        grey = np.asarray(Image.open(png))
        expected = np.choose(labels[k], [0, 63, 126, 189, 252])
        np.testing.assert_array_equal(grey, expected, err_msg=png.name)
    ground = series.parent / "Ground"
    ground.mkdir()
    for png in pngs:
        (ground / png.name).write_bytes(png.read_bytes())
    layout = get_layout("chaos", root)
    loaded = layout.load(layout.cases()[0])
    np.testing.assert_array_equal(loaded.label, canonical)
