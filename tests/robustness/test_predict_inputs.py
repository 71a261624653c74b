"""`sautomed predict` on awkward inputs: each output on its input's exact grid and voxel order, broken inputs
named, nothing clobbered, unwritable or full output folders a clear error with no partial file."""

from __future__ import annotations

import errno
import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from robustness_helpers import assert_one_line_error, assert_same_grid, rotation, write_image

from sautomed.cli import main
from sautomed.data import io
from sautomed.models.sautomed.module import SAutoMedModule

CORONAL = np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]])  # index axes (x, z towards inferior, y)
SAGITTAL = np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]])  # index axes (y, z towards inferior, x)
OBLIQUE = rotation(0, 25) @ rotation(2, 30)
LEFT_HANDED = np.diag([1.0, 1.0, -1.0])


def write_dicom_series(
    folder: Path, volume: np.ndarray, spacing=(2.0, 0.8, 0.8), gap_after: int | None = None
):
    """One axial DICOM file per slice of a (z, y, x) int16 volume; ``gap_after``: leave out the next slice."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    uid = "1.2.826.0.1.3680043.2.1125.7"
    for k in range(volume.shape[0]):
        z = 50.0 + (k + (1 if gap_after is not None and k > gap_after else 0)) * spacing[0]
        sl = sitk.GetImageFromArray(volume[k].astype(np.int16))
        sl.SetSpacing((spacing[2], spacing[1]))
        for key, value in {
            "0008|0060": "CT",
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0008|0018": f"{uid}.{k + 1}",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.9",
            "0020|000e": uid,
            "0020|0013": str(k + 1),
            "0020|0032": f"-50\\-60\\{z}",
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0028|0030": f"{spacing[1]}\\{spacing[2]}",
        }.items():
            sl.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"slice {k:03d}.dcm"))
        writer.Execute(sl)


def predict(ckpt: Path, inp: Path, out: Path, *extra: str) -> int:
    return main(
        [
            "predict",
            "--ckpt_path",
            str(ckpt),
            "--input",
            str(inp),
            "--output",
            str(out),
            "--no-progress",
            *extra,
        ]
    )


def hu(shape, seed=0, dtype=np.int16) -> np.ndarray:
    return np.random.default_rng(seed).integers(-200, 300, shape).astype(dtype)


def test_awkward_inputs_come_back_on_their_grid(trained_run, tmp_path, capsys):
    """One predict over a folder of awkward inputs (path with a space and non-ASCII characters)."""
    _, run = trained_run
    inp, out = tmp_path / "in put ü", tmp_path / "out é"
    nonfinite = np.random.default_rng(1).normal(0, 100, (2, 20, 24)).astype(np.float32)
    nonfinite[0, 0, :3] = [np.nan, np.inf, -np.inf]
    good = {  # name: (stored array, direction)
        "nan inf.nii.gz": (nonfinite, np.eye(3)),
        "constant.nii.gz": (np.full((2, 16, 16), 40, np.int16), np.eye(3)),
        "one_slice.nii.gz": (hu((1, 24, 24)), np.eye(3)),
        "two_slices.nii.gz": (hu((2, 24, 24)), rotation(1, 40)),
        "odd_3x13x7.nii.gz": (hu((3, 13, 7)), rotation(2, -70)),
        "non_square.nii.gz": (hu((2, 40, 24)), np.eye(3)),
        "elongated.nii.gz": (hu((2, 4, 300)), np.eye(3)),
        "uint8.nii.gz": (hu((2, 16, 16)).clip(0).astype(np.uint8), np.eye(3)),
        "int32.nii.gz": (hu((2, 16, 16), dtype=np.int32), np.eye(3)),
        "float64.nii.gz": (hu((2, 16, 16), dtype=np.float64), np.eye(3)),
        "coronal.nii.gz": (hu((16, 2, 12)), CORONAL),
        "sagittal.nii.gz": (hu((12, 2, 16)), SAGITTAL),
        "oblique.nii.gz": (hu((2, 16, 16)), OBLIQUE),
        "left_handed.nii.gz": (hu((2, 16, 16)), LEFT_HANDED),
        "ñame ü.nii.gz": (hu((2, 16, 16)), np.eye(3)),
        "metaimage.mha": (hu((2, 16, 16)), np.diag([-1.0, -1.0, 1.0])),
    }
    for name, (stored, direction) in good.items():
        write_image(inp / name, stored, direction=direction)
    target = write_image(tmp_path / "elsewhere" / "target.nii.gz", hu((2, 12, 12)), (0.5, 0.6, 3.0))
    (inp / "link.nii.gz").symlink_to(target)
    (inp / "dangling.nii.gz").symlink_to(tmp_path / "missing.nii.gz")
    write_dicom_series(inp / "dicom series", hu((3, 16, 16)))
    broken = {
        "two_d.nii.gz": "2D",
        "four_d.nii.gz": "4D",
        "empty.nii.gz": "empty",
        "truncated.nii.gz": "truncated",
    }
    sitk.WriteImage(sitk.Image([8, 9], sitk.sitkInt16), str(inp / "two_d.nii.gz"))
    sitk.WriteImage(sitk.Image([4, 5, 2, 2], sitk.sitkFloat32), str(inp / "four_d.nii.gz"))
    (inp / "empty.nii.gz").write_bytes(b"")
    raw = gzip.decompress(write_image(tmp_path / "full.nii.gz", hu((3, 20, 20))).read_bytes())
    (inp / "truncated.nii.gz").write_bytes(gzip.compress(raw[: len(raw) // 2]))
    (inp / "notes.txt").write_text("not an image")
    (inp / ".DS_Store").write_bytes(b"\0")

    with pytest.warns(
        UserWarning, match=r"nan inf\.nii\.gz: replaced 3 non-finite voxels \(1 NaN, 1 \+inf, 1 -inf\)"
    ):
        code = predict(run / "best.ckpt", inp, out)
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    for name, reason in broken.items():  # named, with the reason, and nothing written for them
        line = next(line for line in err.splitlines() if line.startswith("sautomed: failed") and name in line)
        assert reason in line, line
        assert not (out / name).exists()
    for name in ("notes.txt", "dangling.nii.gz", ".DS_Store"):
        assert f"ignored {inp / name}" in err
    expected = [*good, "link.nii.gz", "dicom series.nii.gz"]
    assert f"wrote {len(expected)} of {len(expected) + len(broken)} outputs" in err
    assert sorted(p.name for p in out.iterdir()) == sorted([*expected, "labels.json"])  # no temporary file
    for name in good:
        assert_same_grid(out / name, sitk.ReadImage(str(inp / name)))
    assert_same_grid(out / "link.nii.gz", sitk.ReadImage(str(target)))
    series = sitk.ImageSeriesReader()
    series.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(inp / "dicom series")))
    ref, dcm_out = series.Execute(), sitk.ReadImage(str(out / "dicom series.nii.gz"))
    assert dcm_out.GetSize() == ref.GetSize() and dcm_out.GetDirection() == ref.GetDirection()
    np.testing.assert_allclose(dcm_out.GetSpacing(), ref.GetSpacing(), rtol=1e-6)  # NIfTI keeps float32
    np.testing.assert_allclose(dcm_out.GetOrigin(), ref.GetOrigin(), rtol=1e-6)


def _threshold_segmenter(self, image: torch.Tensor, out_hw, mode=None) -> np.ndarray:
    """Stand-in for the network: labels from the intensities (2 above 0.75, 1 above 0.25), so the test
    can tell where every voxel went."""
    assert tuple(out_hw) == tuple(image.shape[1:]) == (64, 64)
    return ((image > 0.25).to(torch.uint8) + (image > 0.75).to(torch.uint8)).numpy()


VOXEL_ORDERS = {  # name: (stored numpy shape, direction); each makes a 64 x 64 axial plane
    "axial": ((3, 64, 64), np.eye(3)),
    "coronal": ((64, 3, 64), CORONAL),
    "sagittal": ((64, 3, 64), SAGITTAL),
    "oblique": ((3, 64, 64), OBLIQUE),
    "left_handed": ((3, 64, 64), LEFT_HANDED),
    "ras": ((3, 64, 64), np.diag([-1.0, -1.0, 1.0])),
    "one_slice_coronal_up": ((64, 1, 64), CORONAL.T),
    "two_slices": ((2, 64, 64), np.eye(3)),
}


def test_voxel_order_is_kept(trained_run, tmp_path, monkeypatch):
    """Every output voxel lands where its input voxel was (a stand-in segmenter labels by intensity)."""
    _, run = trained_run
    rng = np.random.default_rng(5)
    stored = {}
    for name, (shape, direction) in VOXEL_ORDERS.items():
        stored[name] = rng.choice(np.array([-1000, 100, 1000], np.int16), shape)
        src = write_image(tmp_path / "in" / f"{name}.nii.gz", stored[name], direction=direction)
        assert io.read_array(src)[1].shape_zyx[1:] == (64, 64), name  # the test's own setup
    monkeypatch.setattr(SAutoMedModule, "segment_volume", _threshold_segmenter)
    assert predict(run / "best.ckpt", tmp_path / "in", tmp_path / "out") == 0
    for name, values in stored.items():
        written = tmp_path / "out" / f"{name}.nii.gz"
        expected = (values == 100).astype(np.uint8) + 2 * (values == 1000).astype(np.uint8)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(written))), expected, name)
        assert_same_grid(written, sitk.ReadImage(str(tmp_path / "in" / f"{name}.nii.gz")))


def test_output_folder_is_the_input_folder(trained_run, tmp_path, capsys):
    _, run = trained_run
    folder = tmp_path / "scans"
    write_image(folder / "a.nii.gz", hu((2, 16, 16)))
    write_image(folder / "b.nii.gz", hu((2, 16, 16), seed=1))
    write_dicom_series(folder / "ser", hu((2, 16, 16)))
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    for extra in ([], ["--overwrite"]):
        assert predict(run / "best.ckpt", folder, folder, *extra) == 1
        line = assert_one_line_error(capsys.readouterr().err)
        assert "would replace its own input" in line
        assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before  # nothing clobbered
    # one file as input and its own folder as output: the same refusal
    assert predict(run / "best.ckpt", folder / "a.nii.gz", folder, "--overwrite") == 1
    assert "would replace its own input" in assert_one_line_error(capsys.readouterr().err)
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before


def test_two_inputs_one_output_name_is_refused(trained_run, tmp_path, capsys):
    _, run = trained_run
    write_image(tmp_path / "in" / "x.nii.gz", hu((2, 16, 16)))
    write_dicom_series(tmp_path / "in" / "x", hu((2, 16, 16)))  # a DICOM folder `x/` is written as x.nii.gz
    assert predict(run / "best.ckpt", tmp_path / "in", tmp_path / "out") == 1
    assert "would both be written to" in assert_one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_read_only_output_folder_is_one_clear_line(trained_run, tmp_path, monkeypatch, capsys):
    """Refused before any work. Root ignores permission bits, so as root the denial the kernel would give
    a normal user is simulated at os.open for files made in that folder."""
    _, run = trained_run
    src = write_image(tmp_path / "in" / "a.nii.gz", hu((2, 16, 16)))
    out = tmp_path / "locked"
    out.mkdir()
    out.chmod(0o555)
    if os.geteuid() == 0:
        real_open = os.open

        def denying_open(path, flags, *args, **kwargs):
            if Path(os.fsdecode(path)).parent == out and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", denying_open)
    called = []
    monkeypatch.setattr(SAutoMedModule, "segment_volume", lambda *a, **k: called.append(1))
    try:
        assert predict(run / "best.ckpt", src, out) == 1
    finally:
        out.chmod(0o755)
    line = assert_one_line_error(capsys.readouterr().err)
    assert str(out) in line and "not writable" in line and "Permission denied" in line
    assert not called and list(out.iterdir()) == []
    # a missing output folder under a file: cannot be created, one line too
    assert predict(run / "best.ckpt", src, src / "sub") == 1
    assert "cannot create the output folder" in assert_one_line_error(capsys.readouterr().err)


def test_full_disk_on_write_leaves_no_partial_file(trained_run, tmp_path, monkeypatch, capsys):
    _, run = trained_run
    src = write_image(tmp_path / "in" / "a.nii.gz", hu((1, 16, 16)))
    out = tmp_path / "out"

    def no_space(image, path, *args, **kwargs):
        Path(path).write_bytes(b"\x1f\x8b partial")  # the writer got half way
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(io.sitk, "WriteImage", no_space)
    assert predict(run / "best.ckpt", src, out) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"sautomed: failed {src}: could not write {out / 'a.nii.gz'}" in err and "No space left" in err
    # neither the output nor its temporary file (labels.json, the class table, is complete)
    assert [p.name for p in out.iterdir() if p.name != "labels.json"] == []
    monkeypatch.undo()
    assert predict(run / "best.ckpt", src, out) == 0  # space again: the rerun writes it
    assert_same_grid(out / "a.nii.gz", sitk.ReadImage(str(src)))


def test_dicom_folder_with_two_series_and_a_missing_slice(trained_run, tmp_path):
    """Two series: the choice is stated. A missing slice: a warning that the spacing is wrong near the gap."""
    _, run = trained_run
    two = tmp_path / "in" / "two"
    write_dicom_series(two, hu((3, 16, 16)))
    other = sitk.GetImageFromArray(hu((16, 16), seed=3))
    tags = {"0020|000e": "1.2.3.4.5", "0020|0032": "-50\\-60\\50", "0020|0037": "1\\0\\0\\0\\1\\0"}
    for key, value in tags.items():
        other.SetMetaData(key, value)
    sitk.WriteImage(other, str(two / "other.dcm"))
    write_dicom_series(tmp_path / "in" / "gap", hu((4, 16, 16)), gap_after=1)
    with pytest.warns(UserWarning) as caught:
        assert predict(run / "best.ckpt", tmp_path / "in", tmp_path / "out") == 0
    messages = [str(w.message) for w in caught]
    assert any("2 DICOM series" in m and "using 1.2.826.0.1.3680043.2.1125.7" in m for m in messages)
    assert any("uneven DICOM slice spacing" in m and "missing slice" in m for m in messages)
    assert sitk.ReadImage(str(tmp_path / "out" / "two.nii.gz")).GetSize() == (16, 16, 3)
    assert sitk.ReadImage(str(tmp_path / "out" / "gap.nii.gz")).GetSize() == (16, 16, 4)


def test_labels_resized_back_exactly():
    """The in-plane resize back to the input size never drops a row or a column (odd and elongated)."""
    from sautomed.evaluation.postprocess import logits_to_labels

    for hw in ((4, 300), (13, 7), (1, 1), (301, 3)):
        labels = logits_to_labels(torch.randn(2, 3, 64, 64), hw)
        assert labels.shape == (2, *hw) and labels.dtype == torch.uint8
