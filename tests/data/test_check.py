from __future__ import annotations

import shutil

import numpy as np
import SimpleITK as sitk

from sautomed.data.check import check_dataset, format_report
from sautomed.data.layouts import get_layout


def rewrite(path, change):
    """Rewrite a volume keeping its grid, with ``change(array) -> array`` applied to the stored voxels."""
    image = sitk.ReadImage(str(path))
    out = sitk.GetImageFromArray(change(sitk.GetArrayFromImage(image)))
    out.CopyInformation(image)
    sitk.WriteImage(out, str(path))


def test_three_broken_cases(tmp_path, phantoms):
    ds = shutil.copytree(phantoms, tmp_path / "ds")

    def add_nan(a):
        a = a.astype(np.float32)
        a[0, 0, :3] = [np.nan, np.inf, -np.inf]
        return a

    def half_label(a):
        a = a.astype(np.float32)
        a[a == 1] = 1.5
        return a

    rewrite(ds / "imagesTr" / "phantom_000_0000.nii.gz", add_nan)
    rewrite(ds / "labelsTr" / "phantom_001.nii.gz", half_label)
    (ds / "imagesTr" / "phantom_002_0000.nii.gz").unlink()
    report = check_dataset(get_layout("nnunet", ds))
    assert not report.ok
    status = {c.case_id: c for c in report.cases}
    assert status["phantom_000"].status == "ERROR" and "1 NaN and 2 inf" in status["phantom_000"].errors[0]
    assert status["phantom_001"].status == "ERROR" and "non-integer" in status["phantom_001"].errors[0]
    assert (
        status["phantom_002"].status == "ERROR" and "label without image" in status["phantom_002"].errors[0]
    )
    assert status["phantom_003"].status == "OK"
    text = format_report(report)
    for cid in ("phantom_000", "phantom_001", "phantom_002"):
        assert f"ERROR {cid}" in text
    assert "FAILED: 4 cases, 1 ok, 0 with warnings, 3 with errors" in text


def test_grid_values_empty_and_unreadable(tmp_path, phantoms, stored_writer):
    ds = shutil.copytree(phantoms, tmp_path / "ds")
    label = ds / "labelsTr" / "phantom_000.nii.gz"
    image = sitk.ReadImage(str(label))
    image.SetOrigin([v + 5.0 for v in image.GetOrigin()])
    image.SetSpacing([v * 1.1 for v in image.GetSpacing()])
    sitk.WriteImage(image, str(label))
    rewrite(ds / "labelsTr" / "phantom_001.nii.gz", lambda a: np.where(a == 1, 9, a).astype(a.dtype))
    rewrite(ds / "labelsTr" / "phantom_002.nii.gz", np.zeros_like)
    (ds / "imagesTr" / "phantom_003_0000.nii.gz").write_bytes(b"not a volume")
    stored_writer(ds / "imagesTr" / "phantom_004_0000.nii.gz", np.zeros((1, 4, 4), np.int16))
    report = check_dataset(get_layout("nnunet", ds))
    by_id = {c.case_id: c for c in report.cases}
    assert "spacing" in by_id["phantom_000"].errors[0] and "origin" in by_id["phantom_000"].errors[0]
    assert "[9]" in by_id["phantom_001"].errors[0]
    assert by_id["phantom_002"].status == "WARN" and "empty" in by_id["phantom_002"].warnings[0]
    assert "unreadable" in by_id["phantom_003"].errors[0]
    assert "image without label" in by_id["phantom_004"].errors[0]
    assert not report.ok


def test_real_datasets_pass(shared):
    report = check_dataset(get_layout("nnunet", shared / "chaos-mr"))
    assert report.ok and [c.status for c in report.cases] == ["OK"] * 4, format_report(report)
    report = check_dataset(
        get_layout("btcv", shared / "real-ct", shared / "real-ct" / "btcv8_label_map.json")
    )
    assert report.ok
    report = check_dataset(get_layout("btcv", shared / "real-ct"))  # TotalSegmentator values are not BTCV's
    assert not report.ok and "outside the declared set" in report.cases[0].errors[0]


def test_missing_root_is_reported(tmp_path):
    (tmp_path / "x").mkdir()
    report = check_dataset(get_layout("folder", tmp_path / "x"))
    assert not report.ok and "empty" in format_report(report)
