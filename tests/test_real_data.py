"""Proof on real anatomy (slow, runs in CI): the tiny network fitted to the shared abdominal CT for at most
10 minutes (256 steps at S = 96: 4.0 minutes on the 2-core machine of 2026-12-07), then scored on that
volume, for the 8 BTCV organs.

An overfitting check: it shows the whole pipeline (box prompts and history included) can learn real organs.
The issue's bar is mean DSC >= 0.80 with every organ >= 0.60, asserted as it is. Deterministic for the seed on
one CPU, not across CPUs: with 24 epochs (192 steps) it scored mean 0.877, pancreas 0.72 (the smallest organ,
644 voxels) on the machine of 2026-11, and 0.831, pancreas 0.56, on that of 2026-12-03. With 32 epochs (256
steps, the config now) on the latter: mean 0.899, pancreas 0.76, the rest 0.90-0.94. With the paper's loss
and plain foreground targets it was 0.804 with the pancreas at 0.50. At S = 96 (2026-12-07, to keep CI
short; 128 took 7 minutes on that machine): mean 0.876, pancreas 0.74, the rest 0.86-0.94.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from sautomed.cli import main

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / ".." / "shared" / "data"


def test_tiny_network_learns_the_real_ct_organs(tmp_path, monkeypatch):
    if not (SHARED / "real-ct" / "ct.nii.gz").is_file():
        pytest.fail(f"shared real data missing at {SHARED}; CI provides ../shared beside the project")
    monkeypatch.chdir(ROOT)  # the config names ../shared relative to the project root
    run = tmp_path / "run"
    common = [
        "--config",
        "tests/configs/real_ct_overfit.yaml",
        "--trainer.default_root_dir",
        str(run),
        "--data.cache_dir",
        str(tmp_path / "cache"),
    ]
    start = time.monotonic()
    assert main(["fit", *common]) == 0
    assert time.monotonic() - start < 10 * 60 + 30  # max_time 10:00 plus set-up
    assert main(["validate", *common, "--ckpt_path", str(run / "last.ckpt")]) == 0
    summary = json.loads((run / "summary.json").read_text())
    per_class = {name: v["dsc"] for name, v in summary["per_class"].items()}
    print("real-ct overfit:", summary["mean_dsc"], per_class)
    assert len(per_class) == 8
    assert summary["mean_dsc"] >= 0.80, per_class
    assert min(per_class.values()) >= 0.60, per_class
