"""`sautomed info`: family, classes, preprocessing, config, validation and the run folder's record."""

from __future__ import annotations

import json
import shutil

import yaml

from sautomed.cli import main


def test_info_reports_what_the_checkpoint_and_its_run_folder_hold(untrained_ckpt, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    ckpt = run / "best.ckpt"
    shutil.copy(untrained_ckpt, ckpt)
    config = {"model": {"lr": 0.000321, "network": {"backbone": "tiny"}}, "trainer": {"max_epochs": 77}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    summary = {
        "checkpoint": str(ckpt),
        "mean_dsc": 0.654321,
        "num_cases": 3,
        "per_class": {"liver": {"dsc": 0.9}},
    }
    (run / "summary.json").write_text(json.dumps(summary))
    assert main(["info", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "family: sautomed" in out
    assert "classes: 1 liver, 2 right_kidney, 3 left_kidney, 4 spleen, 5 aorta" in out
    assert "normalization: ct" in out and "window: [-125, 275]" in out
    assert "backbone: tiny" in out and "num_classes: 5" in out and "encoder_finetune: full" in out
    assert "epoch: 3" in out and "global_step: 40" in out
    assert "best val/mean_dsc: 0.8125" in out
    assert "lr: 0.000321" in out and "max_epochs: 77" in out
    assert "mean DSC 0.654321" in out

    summary["checkpoint"] = str(run / "last.ckpt")  # a summary of another checkpoint is not this one's
    (run / "summary.json").write_text(json.dumps(summary))
    assert main(["info", str(ckpt), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert "summary" not in info and info["classes"]["5"] == "aorta"
    assert info["validation"][0]["best_score"] == 0.8125


def test_info_on_a_broken_checkpoint_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["info", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("sautomed: error:") and "bad.ckpt" in err and len(err.strip().splitlines()) == 1
