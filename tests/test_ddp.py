"""Lightning DDP on 2 CPU processes (gloo): a short fit, a test whose summary equals the single-process one
(each case evaluated once), and a predict that shards its inputs and writes every output exactly once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sautomed.cli import main
from sautomed.writers import output_name

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def sautomed(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sautomed", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=600,
    )


def test_ddp_fit_test_predict(trained_run, tiny_phantoms, make_config, tmp_path):
    ddp = ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu"]
    cfg = make_config(tmp_path / "ddp.yaml", tiny_phantoms, tmp_path / "run")
    fit = sautomed("fit", "--config", str(cfg), *ddp)
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert (tmp_path / "run" / "last.ckpt").is_file()

    # the same checkpoint tested in one process and in two gives the same summary
    cfg1, run1 = trained_run
    ckpt = str(run1 / "best.ckpt")
    single, double = tmp_path / "single", tmp_path / "double"
    assert (
        main(["test", "--config", str(cfg1), "--ckpt_path", ckpt, "--trainer.default_root_dir", str(single)])
        == 0
    )
    res = sautomed(
        "test", "--config", str(cfg1), "--ckpt_path", ckpt, "--trainer.default_root_dir", str(double), *ddp
    )
    assert res.returncode == 0, res.stderr[-3000:]
    a = json.loads((single / "summary.json").read_text())
    b = json.loads((double / "summary.json").read_text())
    assert b["num_cases"] == a["num_cases"] == 2
    for key in ("mean_dsc", "mean_hd95_mm", "per_class", "missed_cases", "false_positive_cases"):
        assert a[key] == b[key], key
    assert (single / "metrics.csv").read_text() == (double / "metrics.csv").read_text()

    # predict shards the inputs across ranks: every output written once
    out = tmp_path / "pred"
    images = tiny_phantoms / "test" / "imagesTr"
    res = sautomed(
        "predict",
        "--ckpt_path",
        ckpt,
        "--input",
        str(images),
        "--output",
        str(out),
        "--devices",
        "2",
        "--strategy",
        "ddp",
        "--no-progress",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    n = len(list(images.iterdir()))
    assert f"wrote {n} of {n} outputs" in res.stderr
    written = sorted(p.name for p in out.iterdir() if p.name != "labels.json")
    assert written == sorted(output_name(p) for p in images.iterdir())
