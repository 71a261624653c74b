"""`sautomed crossval` (k-fold CV of configs and their ensembles), `predict --save-probabilities` and
`sautomed ensemble`, on small phantoms stored in different orientations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from sautomed.cli import main
from sautomed.evaluation.probabilities import read_probabilities


@pytest.fixture(scope="module")
def crossval_run(small_phantoms, make_unet_config, tmp_path_factory) -> tuple[Path, list[Path], int]:
    """Two U-Net configs cross-validated over 2 folds of the 3 phantoms: (out folder, configs, exit code)."""
    base = tmp_path_factory.mktemp("crossval")
    configs = [
        make_unet_config(base / f"{k}.yaml", small_phantoms, base / k, k) for k in ("unet2d", "unet3d")
    ]
    out = base / "cv"
    rc = main(
        ["crossval", "--config", *map(str, configs), "--folds", "2", "--out", str(out), "--device", "cpu"]
    )
    return out, configs, rc


def test_crossval_scores_each_config_and_their_ensemble_on_held_out_cases(crossval_run, small_phantoms):
    out, _, rc = crossval_run
    assert rc == 0
    record = json.loads((out / "crossval.json").read_text())
    held = record["held_out"]
    cases = sorted(
        p.name[: -len("_0000.nii.gz")] for p in (small_phantoms / "imagesTr").glob("*_0000.nii.gz")
    )
    assert sorted(i for fold in held for i in fold) == cases  # every case held out exactly once
    names = {r["name"]: r for r in record["results"]}
    assert set(names) == {"unet2d", "unet3d", "unet2d+unet3d"}
    assert all(r["cases"] == len(cases) for r in names.values())
    best = max(names.values(), key=lambda r: round(r["mean_dsc"], 4))
    assert names[record["winner"]]["mean_dsc"] == pytest.approx(best["mean_dsc"], abs=1e-4)
    assert record["predict"].count("last.ckpt") == 2 * len(names[record["winner"]]["members"])
    assert "Winner" in (out / "crossval.md").read_text()
    for kind in ("unet2d", "unet3d"):
        for fold, ids in enumerate(held):  # the fold's split is the one its fit held out
            split = json.loads((out / kind / f"fold_{fold}" / "splits.json").read_text())
            assert sorted(split[fold]["val"]) == sorted(ids)
            assert not set(split[fold]["train"]) & set(ids)
    # the ensemble's labels are the argmax of the members' mean probabilities, on the input's grid
    for case in cases:
        a = read_probabilities(out / "unet2d" / "oof" / f"{case}.npz")
        b = read_probabilities(out / "unet3d" / "oof" / f"{case}.npz")
        mean = (a.probabilities.astype(np.float32) + b.probabilities.astype(np.float32)).argmax(0)
        written = sitk.ReadImage(str(out / "ensembles" / "unet2d+unet3d" / f"{case}.nii.gz"))
        image = sitk.ReadImage(str(small_phantoms / "imagesTr" / f"{case}_0000.nii.gz"))
        assert np.array_equal(sitk.GetArrayFromImage(written), mean)
        assert written.GetSize() == image.GetSize()
        assert written.GetOrigin() == image.GetOrigin()
        assert written.GetSpacing() == image.GetSpacing()
        assert written.GetDirection() == image.GetDirection()


def test_saved_probabilities_lie_in_the_label_maps_array_order(crossval_run, small_phantoms):
    """The argmax of `predict --save-probabilities`'s npz is the written label map, whatever the file's
    stored orientation (the phantoms are stored in different ones); the U-Net has no post-processing here."""
    out, _, _ = crossval_run
    for npz in sorted((out / "unet2d" / "oof").glob("*.npz")):
        saved = read_probabilities(npz)
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(saved.labels_file)))
        assert saved.probabilities.shape[1:] == labels.shape
        assert saved.class_names[0] == "background" and len(saved.class_names) == 6
        agree = (saved.probabilities.astype(np.float32).argmax(0) == labels).mean()
        assert agree > 0.999, (npz, agree)  # float16 may break a near tie
        assert np.allclose(saved.probabilities.astype(np.float32).sum(0), 1.0, atol=1e-2)


def test_a_second_run_keeps_the_fits_and_the_ensemble_command_agrees(crossval_run, capsys, tmp_path):
    out, configs, _ = crossval_run
    before = json.loads((out / "crossval.json").read_text())
    rc = main(
        ["crossval", "--config", *map(str, configs), "--folds", "2", "--out", str(out), "--device", "cpu"]
    )
    assert rc == 0
    err = capsys.readouterr().err
    assert err.count("done before, kept") == 4
    after = json.loads((out / "crossval.json").read_text())
    assert after["winner"] == before["winner"]
    assert [r["mean_dsc"] for r in after["results"]] == [r["mean_dsc"] for r in before["results"]]
    # `sautomed ensemble` on the two out-of-fold folders writes what crossval scored
    ens = tmp_path / "ens"
    assert (
        main(["ensemble", "-i", str(out / "unet2d" / "oof"), str(out / "unet3d" / "oof"), "-o", str(ens)])
        == 0
    )
    for mine in sorted((out / "ensembles" / "unet2d+unet3d").glob("*.nii.gz")):
        theirs = sitk.GetArrayFromImage(sitk.ReadImage(str(ens / mine.name)))
        assert np.array_equal(theirs, sitk.GetArrayFromImage(sitk.ReadImage(str(mine))))
    assert json.loads((ens / "labels.json").read_text())["labels"]["1"]["name"] == "liver"
    # nothing the user had is overwritten: a second ensemble into the same folder keeps the files
    assert (
        main(["ensemble", "-i", str(out / "unet2d" / "oof"), str(out / "unet3d" / "oof"), "-o", str(ens)])
        == 0
    )
    assert "exists" in capsys.readouterr().err


def test_crossval_refuses_what_it_sets_and_twin_names(small_phantoms, make_unet_config, tmp_path, capsys):
    cfg = make_unet_config(tmp_path / "unet2d.yaml", small_phantoms, tmp_path / "run", "unet2d")
    twin = tmp_path / "other"
    twin.mkdir()
    twin_cfg = make_unet_config(twin / "unet2d.yaml", small_phantoms, tmp_path / "run", "unet2d")
    out = str(tmp_path / "cv")
    assert main(["crossval", "--config", str(cfg), "--out", out, "--", "--data.fold", "1"]) != 0
    assert "--data.fold" in capsys.readouterr().err
    assert main(["crossval", "--config", str(cfg), str(twin_cfg), "--out", out]) != 0
    assert "named unet2d" in capsys.readouterr().err
    assert main(["crossval", "--config", str(cfg), "--folds", "1", "--out", out]) != 0
    assert not (tmp_path / "cv" / "unet2d").exists()  # refused before any fit


def test_ensemble_skips_a_case_one_folder_lacks(crossval_run, tmp_path, capsys):
    out, _, _ = crossval_run
    partial = tmp_path / "partial"
    partial.mkdir()
    npz = sorted((out / "unet3d" / "oof").glob("*.npz"))[0]
    (partial / npz.name).write_bytes(npz.read_bytes())
    label = read_probabilities(npz).labels_file
    (partial / label.name).write_bytes(label.read_bytes())
    ens = tmp_path / "ens"
    assert main(["ensemble", "-i", str(out / "unet2d" / "oof"), str(partial), "-o", str(ens)]) == 0
    err = capsys.readouterr().err
    assert "skipped" in err and str(partial) in err
    assert sorted(p.name for p in ens.glob("*.nii.gz")) == [label.name]


def test_postprocessing_is_chosen_per_class_where_it_helps_on_the_folds(small_phantoms, tmp_path):
    """Out-of-fold maps with a stray liver blob far from the liver and a kidney split in two by a missed
    slab: keeping the largest component helps the liver (chosen) and cuts the kidney in half (not chosen)."""
    from sautomed.tools.crossval import _score, choose_postprocessing

    data = {"root": str(small_phantoms), "layout": "nnunet"}
    ids, pred = [], tmp_path / "oof"
    pred.mkdir()
    for ref in sorted((small_phantoms / "labelsTr").glob("*.nii.gz")):
        image = sitk.ReadImage(str(ref))
        labels = sitk.GetArrayFromImage(image)
        z, y, x = np.nonzero(labels == 1)
        free = np.argwhere(labels == 0)  # a stray liver blob: background voxels farthest from the liver
        far = free[np.argmax(np.abs(free - [z.mean(), y.mean(), x.mean()]).sum(1))]
        blob = tuple(slice(max(0, c - 1), c + 2) for c in far)
        labels[blob] = np.where(labels[blob] == 0, 1, labels[blob])
        kz, _, _ = np.nonzero(labels == 2)
        if kz.size:  # the right kidney: its middle slab missed, two halves left
            mid = (kz.min() + kz.max()) // 2
            labels[mid][labels[mid] == 2] = 0
        out = sitk.GetImageFromArray(labels)
        out.CopyInformation(image)
        sitk.WriteImage(out, str(pred / ref.name))
        ids.append(ref.name[: -len(".nii.gz")])

    def score(folder: Path) -> dict:
        return _score(folder, data, ids)

    summary, chosen, before = choose_postprocessing("oof", pred, tmp_path / "post", score)
    assert "liver" in chosen and "right_kidney" not in chosen, chosen
    assert summary["per_class"]["liver"]["dsc"] > before["per_class"]["liver"]["dsc"]
    assert summary["per_class"]["right_kidney"] == before["per_class"]["right_kidney"]
    for f in sorted((tmp_path / "post" / "oof" / "chosen").glob("*.nii.gz")):  # on the input grids
        written, source = sitk.ReadImage(str(f)), sitk.ReadImage(str(pred / f.name))
        assert written.GetOrigin() == source.GetOrigin() and written.GetDirection() == source.GetDirection()
        assert written.GetSpacing() == source.GetSpacing()


def test_keep_largest_in_predict_and_ensemble(crossval_run, small_phantoms, tmp_path, capsys):
    """`predict --keep-largest` and `ensemble --keep-largest` keep one component of the named classes; an
    unknown class is a one-line error naming it."""
    out, _, _ = crossval_run
    oof = [out / "unet2d" / "oof", out / "unet3d" / "oof"]
    ens = tmp_path / "ens"
    assert main(["ensemble", "-i", *map(str, oof), "-o", str(ens), "--keep-largest", "all"]) == 0
    for f in sorted(ens.glob("*.nii.gz")):
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(f)))
        for c in range(1, 6):
            if (labels == c).any():
                assert ndimage.label(labels == c, np.ones((3, 3, 3)))[1] == 1
    assert main(["ensemble", "-i", *map(str, oof), "-o", str(tmp_path / "x"), "--keep-largest", "lung"]) != 0
    err = capsys.readouterr().err
    assert "lung" in err and "liver" in err and "Traceback" not in err
    ckpt = out / "unet2d" / "fold_0" / "last.ckpt"
    image = sorted((small_phantoms / "imagesTr").glob("*_0000.nii.gz"))[0]
    args = ["predict", "--ckpt_path", str(ckpt), "-i", str(image), "--device", "cpu", "--no-progress"]
    assert main([*args, "-o", str(tmp_path / "p"), "--keep-largest", "kidney"]) != 0
    assert "kidney" in capsys.readouterr().err
    assert main([*args, "-o", str(tmp_path / "p"), "--keep-largest", "liver", "2"]) == 0
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(next((tmp_path / "p").glob("*.nii.gz")))))
    for c in (1, 2):
        if (written == c).any():
            assert ndimage.label(written == c, np.ones((3, 3, 3)))[1] == 1


def test_bench_times_each_family_and_their_ensemble_as_predict_runs_them(
    crossval_run, small_phantoms, untrained_ckpt, tmp_path, capsys
):
    """`sautomed bench --ckpt`: trained checkpoints of any family timed in one run on one case; each timed
    result is the label map `predict` writes for that checkpoint (and for their ensemble)."""
    out, _, rc = crossval_run
    assert rc == 0
    ckpts = [out / kind / "fold_0" / "last.ckpt" for kind in ("unet2d", "unet3d")]
    image = sorted((small_phantoms / "imagesTr").glob("*.nii.gz"))[0]
    js = tmp_path / "bench.json"
    argv = ["bench", "--ckpt", *map(str, ckpts), "--image", str(image), "--repeats", "2", "--warmup", "0"]
    assert main([*argv, "--json", str(js)]) == 0
    r = json.loads(js.read_text())
    assert "ensemble of the 2" in capsys.readouterr().out
    assert list(r["case_shape_zyx"]) == list(sitk.GetArrayFromImage(sitk.ReadImage(str(image))).shape)

    def predicted_foreground(paths: list[Path], name: str) -> int:
        folder = tmp_path / name
        assert main(["predict", "--ckpt_path", *map(str, paths), "-i", str(image), "-o", str(folder),
                     "--no-progress"]) == 0  # fmt: skip
        written = next(p for p in folder.glob("*.nii.gz"))
        return int((sitk.GetArrayFromImage(sitk.ReadImage(str(written))) > 0).sum())

    for ckpt, row in zip(ckpts, r["checkpoints"], strict=True):
        assert row["checkpoint"] == str(ckpt) and row["family"] == "baseline"
        assert len(row["predict_all_s"]) == 2 and min(row["predict_all_s"]) > 0 and row["read_s"] > 0
        assert row["foreground_voxels"] == predicted_foreground([ckpt], ckpt.parent.parent.name) > 0
    assert r["ensemble"]["foreground_voxels"] == predicted_foreground(ckpts, "ensemble")
    assert r["ensemble"]["predict_s"] > 0

    # another family with another window, on the synthetic case: timed, the ensemble refused and why
    other = torch.load(untrained_ckpt, map_location="cpu", weights_only=True)
    other["sautomed"]["preprocessing"]["window"] = [-1000.0, 1000.0]
    torch.save(other, tmp_path / "other.ckpt")
    js2 = tmp_path / "bench2.json"
    argv = [
        "bench",
        "--ckpt",
        str(ckpts[0]),
        str(tmp_path / "other.ckpt"),
        "--case-slices",
        "6",
        "--out-size",
        "48",
    ]
    assert main([*argv, "--repeats", "1", "--warmup", "0", "--json", str(js2)]) == 0
    r2 = json.loads(js2.read_text())
    assert [row["family"] for row in r2["checkpoints"]] == ["baseline", "sautomed"]
    assert r2["case_shape_zyx"] == [6, 48, 48] and r2["image"].startswith("synthetic")
    assert "an ensemble needs one input" in r2["ensemble"]["refused"]
    assert "no ensemble:" in capsys.readouterr().out

    # user errors: one line, non-zero, naming the problem
    assert main(["bench", "--ckpt", str(ckpts[0]), "--model", "tiny"]) != 0
    assert "one or the other" in capsys.readouterr().err
    assert main(["bench", "--ckpt", str(tmp_path / "nope.ckpt")]) != 0
    assert "nope.ckpt: checkpoint not found" in capsys.readouterr().err
    assert main(["bench", "--ckpt", str(ckpts[0]), "--image", str(tmp_path / "absent.nii.gz")]) != 0
    assert "absent.nii.gz: image not found" in capsys.readouterr().err
