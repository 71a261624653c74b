"""`make demo`: phantoms -> fit (tiny 3D-SAutoMed, all modules on, CPU) -> test (held-out) -> predict.

Leaves runs/demo/{best.ckpt, last.ckpt, config.yaml, summary.json, metrics.csv, predictions/} and prints the
held-out mean DSC. Extra arguments are passed to `sautomed fit` (e.g. `--trainer.max_time 00:00:02:00`).
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from sautomed.cli import main

CONFIG = "configs/demo.yaml"
RUN = Path("runs/demo")
TEST_IMAGES = Path("phantoms/test/imagesTr")


def run_demo(extra: Sequence[str] = ()) -> int:
    # a fresh run folder each time: the demo is the reproducible reference run
    for stale in ("best.ckpt", "last.ckpt", "summary.json", "metrics.csv", "splits.json"):
        (RUN / stale).unlink(missing_ok=True)
    if (RUN / "predictions").exists():
        shutil.rmtree(RUN / "predictions")
    steps = [
        ["fit", "--config", CONFIG, *extra],
        ["test", "--config", CONFIG, "--ckpt_path", str(RUN / "best.ckpt")],
        [
            "predict",
            "--ckpt_path",
            str(RUN / "best.ckpt"),
            "--input",
            str(TEST_IMAGES),
            "--output",
            str(RUN / "predictions"),
            "--no-progress",
        ],
    ]
    for argv in steps:
        print("\n$ sautomed " + " ".join(argv), flush=True)
        code = main(argv)
        if code:
            print(f"demo: step `sautomed {argv[0]}` failed with exit code {code}", file=sys.stderr)
            return code
    summary = json.loads((RUN / "summary.json").read_text())
    print("\n== demo finished ==")
    for name, vals in summary["per_class"].items():
        print(f"  {name:>16}: DSC {vals['dsc']:.3f}  HD95 {vals['hd95_mm']:.1f} mm")
    print(
        f"held-out phantoms: mean DSC {summary['mean_dsc']:.4f}, mean HD95 {summary['mean_hd95_mm']:.2f} mm "
        f"over {summary['num_cases']} cases"
    )
    print(f"outputs: {RUN}/best.ckpt, {RUN}/summary.json, {RUN}/metrics.csv, {RUN}/predictions/")
    return 0


if __name__ == "__main__":
    sys.exit(run_demo(sys.argv[1:]))
