"""`sautomed compare RUN_DIR...`: the `summary.json` of several test runs side by side, as one table.

Rows are the measures (mean DSC and HD95, each class's DSC and HD95, missed and false-positive counts, cases,
predict seconds per case where the run recorded them), columns are the runs; a Markdown table, so it pastes
into docs/results.md as it is. A value a run does not have (or NaN, written as null) shows as `-`.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sautomed.run_folder import UserError


def read_summary(run: Path) -> dict[str, Any]:
    """A run folder's `summary.json` (or that file itself); a UserError when missing or unreadable."""
    path = run / "summary.json" if run.is_dir() else run
    if not path.is_file():
        raise UserError(f"{run}: no summary.json (run `sautomed test` with this run folder first)")
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable summary ({exc})") from exc
    if not isinstance(summary, dict) or "mean_dsc" not in summary:
        raise UserError(f"{path}: not a sautomed summary (no mean_dsc)")
    return summary


def _fmt(value: Any, digits: int) -> str:
    if value is None or isinstance(value, str):
        return "-" if value is None else value
    if isinstance(value, float) and value != value:  # NaN
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _labels(runs: Sequence[Path]) -> list[str]:
    """Column names: each run folder's name, or the path as given where names repeat."""
    names = [(r.parent.name if r.is_file() else r.name) or str(r) for r in runs]
    return [n if names.count(n) == 1 else str(r) for n, r in zip(names, runs)]


def compare_table(runs: Sequence[Path]) -> str:
    """The Markdown table comparing the runs' summaries."""
    summaries = [read_summary(Path(r)) for r in runs]
    classes: list[str] = []
    for s in summaries:
        classes += [c for c in (s.get("per_class") or {}) if c not in classes]

    def per_class(s: dict[str, Any], name: str, key: str) -> Any:
        return ((s.get("per_class") or {}).get(name) or {}).get(key)

    rows: list[tuple[str, list[str]]] = [
        ("mean DSC", [_fmt(s.get("mean_dsc"), 4) for s in summaries]),
        ("mean HD95 (mm)", [_fmt(s.get("mean_hd95_mm"), 2) for s in summaries]),
    ]
    for name in classes:
        rows.append((f"{name} DSC", [_fmt(per_class(s, name, "dsc"), 4) for s in summaries]))
        rows.append((f"{name} HD95 (mm)", [_fmt(per_class(s, name, "hd95_mm"), 2) for s in summaries]))
    rows += [
        ("missed (case, class)", [_fmt(s.get("missed_cases"), 0) for s in summaries]),
        ("false positive (case, class)", [_fmt(s.get("false_positive_cases"), 0) for s in summaries]),
        ("cases", [_fmt(s.get("num_cases"), 0) for s in summaries]),
        ("predict s / case", [_fmt(s.get("predict_seconds_per_case"), 2) for s in summaries]),
    ]
    header = ["measure", *_labels([Path(r) for r in runs])]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join([label, *cells]) + " |" for label, cells in rows]
    return "\n".join(lines)


def compare_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="sautomed compare", description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders (or summary.json files) of test runs")
    a = p.parse_args(argv)
    print(compare_table(a.runs))
    return 0
