"""The CLI in-process: help, user errors, fit -> test -> predict, resume rules, determinism."""

from __future__ import annotations

import json
import logging

import numpy as np
import SimpleITK as sitk
import torch

from sautomed.cli import main
from sautomed.models.sautomed.inference import InferenceEngine
from sautomed.models.sautomed.network import SAutoMedNet
from sautomed.writers import output_name


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("fit", "validate", "test", "predict", "check-data", "phantoms", "bench"):
        assert f"\n  {cmd} " in out


def test_unknown_command_is_one_line_without_traceback(capsys):
    assert main(["frobnicate"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("sautomed: error: unknown command") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_phantoms_then_check_data(tmp_path, capsys):
    out = tmp_path / "ph"
    assert main(["phantoms", "--out", str(out), "--cases", "2", "--seed", "3"]) == 0
    assert main(["check-data", "--layout", "nnunet", "--root", str(out)]) == 0
    assert main(["check-data", "--layout", "nnunet", "--root", str(tmp_path / "missing")]) == 1
    assert "missing" in capsys.readouterr().err


def test_fit_writes_the_run_folder(trained_run):
    cfg, run = trained_run
    for name in ("config.yaml", "last.ckpt", "best.ckpt", "splits.json"):
        assert (run / name).is_file(), name
    ckpt = torch.load(run / "last.ckpt", map_location="cpu", weights_only=True)
    carried = ckpt["sautomed"]
    assert carried["network"]["image_size"] == 64
    assert carried["class_names"] == ["liver", "right_kidney", "left_kidney", "spleen", "aorta"]
    assert carried["preprocessing"]["image_size"] == 64


def test_test_writes_metrics_and_encodes_each_slice_once(trained_run, tiny_phantoms, monkeypatch):
    cfg, run = trained_run
    encoded = []
    original = SAutoMedNet.encode
    monkeypatch.setattr(
        SAutoMedNet, "encode", lambda self, x: encoded.append(x.shape[0]) or original(self, x)
    )
    fit_config = (run / "config.yaml").read_bytes()
    assert main(["test", "--config", str(cfg), "--ckpt_path", str(run / "best.ckpt")]) == 0
    assert (run / "config.yaml").read_bytes() == fit_config  # the fit's record is never replaced
    assert "ckpt_path" in (run / "test_config.yaml").read_text()  # the evaluation's own, beside its outputs
    summary = json.loads((run / "summary.json").read_text())
    assert summary["num_cases"] == 2
    assert summary["checkpoint"].endswith("best.ckpt")
    assert set(summary["per_class"]) == {"liver", "right_kidney", "left_kidney", "spleen", "aorta"}
    lines = (run / "metrics.csv").read_text().strip().splitlines()
    assert (
        lines[0] == "case,class,dsc,hd95_mm,status,slices_missed_at_ends,slices_beyond_ends"
        and len(lines) == 1 + 2 * 5
    )
    depth = sum(sitk.ReadImage(str(p)).GetSize()[2] for p in (tiny_phantoms / "test" / "imagesTr").iterdir())
    assert sum(encoded) == depth  # every slice of every test volume encoded exactly once


def test_predict_keeps_geometry_and_existing_outputs(
    trained_run, tiny_phantoms, tmp_path, capsys, monkeypatch
):
    _, run = trained_run
    encoded = []
    original = SAutoMedNet.encode
    monkeypatch.setattr(
        SAutoMedNet, "encode", lambda self, x: encoded.append(x.shape[0]) or original(self, x)
    )
    images = tiny_phantoms / "test" / "imagesTr"
    (tmp_path / "in").mkdir()
    for p in images.iterdir():
        (tmp_path / "in" / p.name).write_bytes(p.read_bytes())
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    (tmp_path / "in" / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08garbage")
    out = tmp_path / "out"
    argv = [
        "predict",
        "--ckpt_path",
        str(run / "best.ckpt"),
        "--input",
        str(tmp_path / "in"),
        "--output",
        str(out),
    ]
    assert main([*argv, "--no-progress"]) == 1  # the broken input makes the run fail ...
    err = capsys.readouterr().err
    assert "broken.nii.gz" in err and "notes.txt" in err
    for src in images.iterdir():  # ... while every valid input is written on its exact grid, named as
        # nnU-Net names predictions: case_0000.nii.gz -> case.nii.gz
        assert src.name.endswith("_0000.nii.gz") and not (out / src.name).exists()
        a, b = (
            sitk.ReadImage(str(src)),
            sitk.ReadImage(str(out / output_name(src))),
        )
        assert a.GetSize() == b.GetSize() and a.GetSpacing() == b.GetSpacing()
        assert a.GetOrigin() == b.GetOrigin() and a.GetDirection() == b.GetDirection()
        assert b.GetPixelID() == sitk.sitkUInt8
    assert not (out / "broken.nii.gz").exists()
    depth = sum(sitk.ReadImage(str(p)).GetSize()[2] for p in images.iterdir())
    assert sum(encoded) == depth  # every slice of every valid input encoded exactly once
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    (tmp_path / "in" / "broken.nii.gz").unlink()
    assert main([*argv, "--no-progress"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # kept without --overwrite
    assert "kept existing" in capsys.readouterr().err


def test_predictions_repeat_exactly(trained_run, tiny_phantoms, tmp_path):
    _, run = trained_run
    src = next((tiny_phantoms / "test" / "imagesTr").iterdir())
    outs = []
    for k in range(2):
        out = tmp_path / f"o{k}"
        assert (
            main(
                [
                    "predict",
                    "--ckpt_path",
                    str(run / "best.ckpt"),
                    "--input",
                    str(src),
                    "--output",
                    str(out),
                    "--no-progress",
                ]
            )
            == 0
        )
        outs.append(sitk.GetArrayFromImage(sitk.ReadImage(str(out / output_name(src)))))
    np.testing.assert_array_equal(outs[0], outs[1])


def test_predict_encoder_bf16_runs_the_encoder_alone_in_bf16(
    trained_run, tiny_phantoms, tmp_path, monkeypatch
):
    _, run = trained_run
    src = next((tiny_phantoms / "test" / "imagesTr").iterdir())
    seen: list[tuple[torch.dtype | None, torch.dtype | None]] = []
    real = InferenceEngine.encode_volume

    def spy(self: InferenceEngine, volume: torch.Tensor) -> torch.Tensor:
        seen.append((self.encoder_dtype, self.autocast_dtype))
        return real(self, volume)

    monkeypatch.setattr(InferenceEngine, "encode_volume", spy)
    labels = []
    for flag in ([], ["--encoder-bf16"]):
        out = tmp_path / ("bf16" if flag else "fp32")
        argv = ["predict", "--ckpt_path", str(run / "best.ckpt"), "--input", str(src), "--output", str(out)]
        assert main([*argv, "--no-progress", *flag]) == 0
        labels.append(sitk.GetArrayFromImage(sitk.ReadImage(str(out / output_name(src)))))
    assert seen == [(None, None), (torch.bfloat16, None)]
    assert (labels[0] == labels[1]).mean() > 0.95  # bf16 features move few voxels


def test_bf16_on_a_cpu_without_native_bf16_warns(trained_run, tiny_phantoms, tmp_path, monkeypatch, caplog):
    _, run = trained_run
    src = next((tiny_phantoms / "test" / "imagesTr").iterdir())
    monkeypatch.setattr("sautomed.models.sautomed.inference.cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr("sautomed.models.sautomed.inference._warned_bf16", False)
    argv = ["predict", "--ckpt_path", str(run / "best.ckpt"), "--input", str(src), "--output", str(tmp_path)]
    with caplog.at_level(logging.WARNING, logger="sautomed"):
        assert main([*argv, "--no-progress", "--encoder-bf16"]) == 0
    assert any("no native bfloat16" in r.getMessage() for r in caplog.records)


def test_ckpt_path_last_without_checkpoint_is_an_error(tiny_phantoms, tmp_path, capsys, make_config):
    cfg = make_config(tmp_path / "c.yaml", tiny_phantoms, tmp_path / "empty_run")
    assert main(["fit", "--config", str(cfg), "--ckpt_path", "last"]) == 1
    err = capsys.readouterr().err
    assert "nothing" in err or "no " in err
    assert "Traceback" not in err and not (tmp_path / "empty_run" / "last.ckpt").exists()


def test_truncated_checkpoint_is_a_clear_error(trained_run, tiny_phantoms, tmp_path, capsys):
    _, run = trained_run
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes((run / "last.ckpt").read_bytes()[:5000])
    src = next((tiny_phantoms / "test" / "imagesTr").iterdir())
    code = main(["predict", "--ckpt_path", str(bad), "--input", str(src), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 1 and "truncated or corrupt" in err and "Traceback" not in err


def test_checkpoint_of_another_configuration_names_the_mismatch(trained_run, tiny_phantoms, tmp_path, capsys):
    cfg, run = trained_run
    code = main(
        [
            "test",
            "--config",
            str(cfg),
            "--ckpt_path",
            str(run / "best.ckpt"),
            "--model.network.history_tokens",
            "2",
            "--trainer.default_root_dir",
            str(tmp_path),
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and "history_tokens" in err and "Traceback" not in err


def test_resume_goes_on_past_the_checkpoint(trained_run, tmp_path):
    cfg, run = trained_run
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "last.ckpt").write_bytes((run / "last.ckpt").read_bytes())
    (resumed / "splits.json").write_bytes((run / "splits.json").read_bytes())
    step0 = torch.load(resumed / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]
    assert (
        main(
            [
                "fit",
                "--config",
                str(cfg),
                "--trainer.default_root_dir",
                str(resumed),
                "--trainer.max_epochs",
                "2",
                "--ckpt_path",
                "last",
            ]
        )
        == 0
    )
    after = torch.load(resumed / "last.ckpt", map_location="cpu", weights_only=True)
    assert after["global_step"] == 2 * step0 and after["epoch"] == 1
    assert after["optimizer_states"][0]["state"]  # AdamW moments restored and carried on


def test_same_seed_same_checkpoint(tiny_phantoms, tmp_path, make_config):
    states = []
    for k in range(2):
        cfg = make_config(tmp_path / f"c{k}.yaml", tiny_phantoms, tmp_path / f"run{k}")
        assert main(["fit", "--config", str(cfg), "--trainer.limit_val_batches", "0"]) == 0
        states.append(torch.load(tmp_path / f"run{k}" / "last.ckpt", map_location="cpu", weights_only=True))
    for key, value in states[0]["state_dict"].items():
        assert torch.equal(value, states[1]["state_dict"][key]), key


def test_evaluation_with_another_preprocessing_than_the_checkpoints_is_refused(
    trained_run, tiny_phantoms, make_config, tmp_path, capsys
):
    _, run = trained_run
    ckpt = str(run / "best.ckpt")
    cases = (
        ({"preprocessing": {"image_size": 64, "normalization": "percentile"}}, "normalization percentile"),
        ({"preprocessing": {"image_size": 64, "normalization": "ct", "window": [-100, 200]}}, "window"),
        ({"preprocessing": {"image_size": 48, "normalization": "ct"}}, "image_size 48"),
    )
    for k, (data, named) in enumerate(cases):
        cfg = make_config(tmp_path / f"c{k}.yaml", tiny_phantoms, tmp_path / f"run{k}", **data)
        assert main(["test", "--config", str(cfg), "--ckpt_path", ckpt]) == 1
        err = capsys.readouterr().err
        assert "preprocessing differs from the checkpoint's" in err and named in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_bug_shows_its_traceback_a_user_error_one_line(monkeypatch, capsys):
    import sautomed.cli as cli

    def broken(argv):
        raise ValueError("a programming error inside sautomed")

    monkeypatch.setitem(cli.TOOLS, "phantoms", broken)
    try:
        main(["phantoms", "--out", "x"])
    except ValueError as exc:  # not turned into one line: a bug must be seen whole
        assert "programming error" in str(exc)
    else:
        raise AssertionError("a ValueError of a bug was swallowed")
    monkeypatch.undo()
    capsys.readouterr()
    assert main(["phantoms", "--out", "x", "--cases", "0"]) == 1  # our refusal: one line, exit 1
    err = capsys.readouterr().err
    assert err.strip() == "sautomed: error: --cases must be at least 1"


def test_a_preempted_run_exits_non_zero_in_one_line(monkeypatch, capsys):
    """Lightning raises SIGTERMException (a SystemExit without a code) on a scheduler's SIGTERM; the run must
    not look successful."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    import sautomed.cli as cli

    def preempted(argv):
        raise SIGTERMException

    monkeypatch.setitem(cli.TOOLS, "phantoms", preempted)
    assert main(["phantoms"]) == 143
    err = capsys.readouterr().err.strip()
    assert err.startswith("sautomed: stopped by SIGTERM") and len(err.splitlines()) == 1


def test_predict_with_several_checkpoints_averages_them(trained_run, tiny_phantoms, tmp_path, capsys):
    _, run = trained_run
    images = tiny_phantoms / "test" / "imagesTr"
    best = str(run / "best.ckpt")
    assert (
        main(
            ["predict", "--ckpt_path", best, "-i", str(images), "-o", str(tmp_path / "one"), "--no-progress"]
        )
        == 0
    )
    argv = [
        "predict",
        "--ckpt_path",
        best,
        best,
        "-i",
        str(images),
        "-o",
        str(tmp_path / "two"),
        "--no-progress",
    ]
    assert main(argv) == 0  # one model twice: its own labels (argmax of the mean of equal probabilities)
    for src in images.iterdir():
        one = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "one" / output_name(src))))
        two = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "two" / output_name(src))))
        np.testing.assert_array_equal(one, two)
    labels = json.loads((tmp_path / "two" / "labels.json").read_text())
    assert labels["family"] == "ensemble:sautomed,sautomed"
    ckpt = torch.load(best, map_location="cpu", weights_only=True)
    ckpt["sautomed"]["class_names"] = ["liver", "spleen", "right_kidney", "left_kidney", "aorta"]
    torch.save(ckpt, tmp_path / "other.ckpt")
    argv = [
        "predict",
        "--ckpt_path",
        best,
        str(tmp_path / "other.ckpt"),
        "-i",
        str(images),
        "-o",
        str(tmp_path / "x"),
    ]
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "an ensemble needs one input and one class list" in err and "other.ckpt" in err
    assert len(err.strip().splitlines()) == 1


def test_predict_slices_an_oblique_stack_along_its_acquisition(
    trained_run, tmp_path, monkeypatch, oblique_stack
):
    _, run = trained_run
    (tmp_path / "in").mkdir()
    oblique_stack(tmp_path / "in")
    (tmp_path / "in" / "oblique_labels.nii.gz").unlink()
    encoded = []
    original = SAutoMedNet.encode
    monkeypatch.setattr(
        SAutoMedNet, "encode", lambda self, x: encoded.append(x.shape[0]) or original(self, x)
    )
    out = tmp_path / "out"
    argv = ["predict", "--ckpt_path", str(run / "best.ckpt"), "-i", str(tmp_path / "in"), "-o", str(out)]
    assert main([*argv, "--no-progress"]) == 0
    assert sum(encoded) == 12  # the 12 acquired slices, not 64 slices across them
    a, b = (
        sitk.ReadImage(str(tmp_path / "in" / "oblique_0000.nii.gz")),
        sitk.ReadImage(str(out / "oblique.nii.gz")),
    )
    assert a.GetSize() == b.GetSize() and a.GetSpacing() == b.GetSpacing()
    assert a.GetOrigin() == b.GetOrigin() and a.GetDirection() == b.GetDirection()


def test_help_answers_without_importing_torch_or_lightning():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from sautomed.cli import main\n"
        "main(['--help'])\n"
        "try:\n    main(['predict', '--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = sorted(m for m in ('torch', 'lightning', 'monai') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert "HEAVY []" in out.stdout and "--ckpt_path" in out.stdout


def test_predicts_mode_choices_are_the_engines():
    from sautomed.models.sautomed.inference import MODES
    from sautomed.predict import MODES as PREDICT_MODES

    assert tuple(PREDICT_MODES) == tuple(MODES)
