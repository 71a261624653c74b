"""`sautomed check-data` reports every problem of a dataset, each case named, exit code 1; never a traceback.

Already covered in tests/data/test_check.py: NaN/inf voxels, non-integer float labels, label values outside
the declared set, spacing + origin mismatch, an unreadable image, an empty label. Here: each grid property on
its own, unreadable kinds of image, files named but missing, duplicate ids, symlinks, awkward paths.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from robustness_helpers import rotation, write_image

from sautomed.cli import main
from sautomed.data.layouts import DatasetError, get_layout

GRID = dict(spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0), direction=np.eye(3))


def nnunet(root: Path, cases: dict[str, dict], labels=None) -> Path:
    """An nnU-Net dataset: per case, the label's grid changes (shape, spacing, origin, direction)."""
    root.mkdir(parents=True, exist_ok=True)
    spec = {"labels": labels or {"background": 0, "organ": 1}, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(spec))
    for cid, change in cases.items():
        write_image(root / "imagesTr" / f"{cid}_0000.nii.gz", np.zeros((4, 5, 6), np.int16), **GRID)
        grid = {**GRID, **{k: v for k, v in change.items() if k != "shape"}}
        label = np.zeros(change.get("shape", (4, 5, 6)), np.uint8)
        label[1, 1, 1] = 1
        write_image(root / "labelsTr" / f"{cid}.nii.gz", label, **grid)
    return root


def check(root: Path, layout: str, capsys) -> tuple[int, dict[str, str]]:
    """Run check-data; (exit code, {case id: its report block})."""
    code = main(["check-data", "--layout", layout, "--root", str(root)])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    blocks: dict[str, str] = {}
    current = None
    for line in captured.out.splitlines()[1:-1]:
        if not line.startswith(" "):
            current = line.split(maxsplit=1)[1].strip()
            blocks[current] = line
        else:
            blocks[current] += "\n" + line
    return code, blocks


def test_each_grid_property_alone_is_an_error(tmp_path, capsys):
    root = nnunet(
        tmp_path / "data set ü",  # a space and a non-ASCII character in the path
        {
            "ok": {},
            "size": {"shape": (4, 5, 7)},
            "spacing": {"spacing": (1.0, 1.0, 2.5)},
            "origin": {"origin": (0.0, 4.0, 0.0)},
            "direction": {"direction": rotation(2, 5)},
        },
    )
    code, blocks = check(root, "nnunet", capsys)
    assert code == 1
    assert blocks["ok"].startswith("OK")
    for prop in ("size", "spacing", "origin", "direction"):
        block = blocks[prop]
        assert block.startswith("ERROR") and "grid differs from image" in block and f"{prop} " in block, block
        others = {"size", "spacing", "origin", "direction"} - {prop}
        assert not any(f"; {o} " in block or f": {o} " in block for o in others), block  # that one only


def test_unreadable_images_are_named_with_the_reason(tmp_path, capsys):
    root = nnunet(tmp_path / "ds", {k: {} for k in ("two_d", "four_d", "empty", "truncated", "fine")})
    images = root / "imagesTr"
    sitk.WriteImage(sitk.Image([5, 4], sitk.sitkInt16), str(images / "two_d_0000.nii.gz"))
    sitk.WriteImage(sitk.Image([6, 5, 4, 2], sitk.sitkInt16), str(images / "four_d_0000.nii.gz"))
    (images / "empty_0000.nii.gz").write_bytes(b"")
    raw = gzip.decompress((images / "truncated_0000.nii.gz").read_bytes())
    (images / "truncated_0000.nii.gz").write_bytes(gzip.compress(raw[: len(raw) - 40]))
    code, blocks = check(root, "nnunet", capsys)
    assert code == 1 and blocks["fine"].startswith("OK")
    for cid, reason in {"two_d": "2D", "four_d": "4D", "empty": "empty", "truncated": "truncated"}.items():
        assert blocks[cid].startswith("ERROR") and "image unreadable" in blocks[cid] and reason in blocks[cid]
        assert f"{cid}_0000.nii.gz" in blocks[cid]


def test_dataset_json_naming_missing_files(tmp_path, capsys):
    root = nnunet(tmp_path / "msd", {"a": {}})
    spec = json.loads((root / "dataset.json").read_text())
    spec["training"] = [
        {"image": "./imagesTr/a_0000.nii.gz", "label": "./labelsTr/a.nii.gz"},
        {"image": "./imagesTr/gone.nii.gz", "label": "./labelsTr/gone.nii.gz"},
    ]
    (root / "dataset.json").write_text(json.dumps(spec))
    code, blocks = check(root, "nnunet", capsys)
    assert code == 1 and blocks["a_0000"].startswith("OK")
    assert "named in dataset.json but missing" in blocks["gone"]
    assert "imagesTr/gone.nii.gz" in blocks["gone"] and "labelsTr/gone.nii.gz" in blocks["gone"]


def test_duplicate_case_ids(tmp_path, capsys):
    write_image(tmp_path / "scans" / "a.nii.gz", np.zeros((2, 3, 4), np.int16))
    write_image(tmp_path / "scans" / "a.mha", np.zeros((2, 3, 4), np.int16))
    write_image(tmp_path / "scans" / "b.nii.gz", np.zeros((2, 3, 4), np.int16))
    code, blocks = check(tmp_path / "scans", "folder", capsys)
    assert code == 1 and "duplicate case id (2 cases)" in blocks["a"] and blocks["b"].startswith("OK")
    with pytest.raises(DatasetError, match="duplicate case id 'a'"):  # and training refuses them
        get_layout("folder", tmp_path / "scans").cases()


def test_symlinks_and_stray_files(tmp_path, capsys):
    """A symlinked volume is a case; a dangling symlink is reported, never skipped silently; other files
    are not volumes and are left out."""
    real = write_image(tmp_path / "elsewhere" / "real.nii.gz", np.zeros((2, 3, 4), np.int16))
    scans = tmp_path / "scans"
    scans.mkdir()
    (scans / "linked.nii.gz").symlink_to(real)
    (scans / "dangling.nii.gz").symlink_to(tmp_path / "nowhere.nii.gz")
    (scans / "notes.txt").write_text("x")
    (scans / ".hidden.nii.gz").write_bytes(b"x")
    code, blocks = check(scans, "folder", capsys)
    assert code == 1 and sorted(blocks) == ["dangling", "linked"]
    assert blocks["linked"].startswith("OK")
    assert blocks["dangling"].startswith("ERROR") and "broken symbolic link" in blocks["dangling"]
    with pytest.raises(DatasetError, match="broken symbolic link"):
        get_layout("folder", scans).cases()
    # in an nnU-Net dataset the dangling image is its case's error
    root = nnunet(tmp_path / "ds", {"a": {}, "b": {}})
    (root / "imagesTr" / "b_0000.nii.gz").unlink()
    (root / "imagesTr" / "b_0000.nii.gz").symlink_to(tmp_path / "nowhere.nii.gz")
    code, blocks = check(root, "nnunet", capsys)
    assert code == 1 and blocks["a"].startswith("OK") and "does not exist" in blocks["b"]
