"""`predict` writes labels.json beside its outputs, and with --statistics / --preview their files."""

from __future__ import annotations

import csv
import hashlib
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from PIL import Image

from sautomed.cli import main
from sautomed.tools.labels import COLOURS
from sautomed.writers import output_name


@pytest.fixture()
def inputs(small_phantoms, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for p in sorted((small_phantoms / "imagesTr").iterdir())[:2]:
        (folder / p.name).write_bytes(p.read_bytes())
    return folder


def test_labels_json_statistics_and_previews(untrained_ckpt, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["predict", "--ckpt_path", str(untrained_ckpt), "--input", str(inputs), "--output", str(out)]
    assert main([*argv, "--no-progress", "--statistics", "--preview"]) == 0
    table = json.loads((out / "labels.json").read_text())
    names = ["liver", "right_kidney", "left_kidney", "spleen", "aorta"]
    assert [table["labels"][str(v)]["name"] for v in range(1, 6)] == names
    assert [tuple(table["labels"][str(v)]["colour"]) for v in range(1, 6)] == list(COLOURS[:5])
    assert table["checkpoint"]["sha256"] == hashlib.sha256(untrained_ckpt.read_bytes()).hexdigest()
    assert table["family"] == "sautomed"

    with open(out / "statistics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 5
    for src in sorted(inputs.iterdir()):
        case = output_name(src)[: -len(".nii.gz")]  # case_0000.nii.gz -> case
        image = sitk.ReadImage(str(src))
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / output_name(src))))
        hu = sitk.GetArrayFromImage(image).astype(np.float64)
        stats = json.loads((out / f"{case}.statistics.json").read_text())
        assert stats["intensity"] == "HU"  # the checkpoint normalises as CT
        for value, name in enumerate(names, start=1):
            mask = labels == value
            entry = stats["classes"][name]
            assert entry["voxels"] == int(mask.sum())
            assert entry["volume_ml"] == pytest.approx(mask.sum() * np.prod(image.GetSpacing()) / 1000)
            if mask.any():
                assert entry["mean_hu"] == pytest.approx(hu[mask].mean(), rel=1e-5)
            else:
                assert entry["mean_hu"] is None
            row = next(r for r in rows if r["case"] == case and r["class"] == name)
            assert int(row["voxels"]) == entry["voxels"]
        png = Image.open(out / f"{case}.png")
        assert png.format == "PNG" and png.width > 256 and png.height > 256


def test_a_folder_of_another_models_predictions_is_refused(untrained_ckpt, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["predict", "--input", str(inputs), "--output", str(out), "--no-progress"]
    assert main([*argv, "--ckpt_path", str(untrained_ckpt)]) == 0
    before = (out / "labels.json").read_bytes()
    mtime = (out / "labels.json").stat().st_mtime_ns
    (out / output_name(next(inputs.iterdir()))).unlink()  # predicted again by the same model: the table stays
    assert main([*argv, "--ckpt_path", str(untrained_ckpt)]) == 0
    assert (out / "labels.json").stat().st_mtime_ns == mtime
    other = tmp_path / "other.ckpt"
    ckpt = torch.load(untrained_ckpt, map_location="cpu", weights_only=True)
    ckpt["sautomed"]["class_names"] = ["a", "b", "c", "d", "e"]
    torch.save(ckpt, other)
    (out / output_name(next(inputs.iterdir()))).unlink()  # one output to predict again, with another model
    assert main([*argv, "--ckpt_path", str(other)]) == 1
    err = capsys.readouterr().err
    assert "labels.json" in err and "another model" in err
    assert (out / "labels.json").read_bytes() == before
    assert len(list(out.glob("*.nii.gz"))) == 1  # nothing predicted into the mixed folder


def test_a_bad_case_is_reported_and_the_others_go_on(small_phantoms, tmp_path):
    from sautomed.tools.predict_outputs import Extras, write_extras

    images = sorted((small_phantoms / "imagesTr").iterdir())[:2]
    out = tmp_path / "out"
    out.mkdir()
    good = out / images[0].name
    good.write_bytes((small_phantoms / "labelsTr" / images[0].name.replace("_0000", "")).read_bytes())
    bad = out / images[1].name
    bad.write_bytes(b"\x1f\x8b\x08 not a volume")
    notes = []
    failed = write_extras(
        [(images[0], good), (images[1], bad)],
        out,
        ["liver", "right_kidney", "left_kidney", "spleen", "aorta"],
        {"normalization": "ct", "window": [-125, 275]},
        Extras(statistics=True, preview=True),
        report=notes.append,
    )
    assert [src for src, _ in failed] == [str(images[1])]
    assert str(bad) in failed[0][1]  # the reason names the bad file
    case = images[0].name[: -len(".nii.gz")]
    assert (out / f"{case}.statistics.json").is_file() and (out / f"{case}.png").is_file()
    with open(out / "statistics.csv") as f:
        assert {r["case"] for r in csv.DictReader(f)} == {case}
