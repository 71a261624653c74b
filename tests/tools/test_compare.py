"""`sautomed compare`: several runs' summary.json as one table."""

from __future__ import annotations

import math

from sautomed.cli import main
from sautomed.evaluation.metrics import ClassResult, summarize, write_metrics
from sautomed.tools.compare import compare_table


def _run(folder, rows, classes, seconds=None):
    summary = summarize(rows, classes)
    if seconds is not None:
        summary["predict_seconds_per_case"] = seconds
    write_metrics(rows, summary, folder)
    return folder


def test_compare_puts_runs_side_by_side(tmp_path, capsys):
    a = _run(
        tmp_path / "unet3d",
        [
            ClassResult("c1", "liver", 0.9, 4.0, "ok"),
            ClassResult("c2", "liver", 0.7, 6.0, "ok"),
            ClassResult("c1", "spleen", 0.0, 300.0, "missed"),
            ClassResult("c2", "spleen", math.nan, math.nan, "not_applicable"),
        ],
        ["liver", "spleen"],
        seconds=1.25,
    )
    b = _run(
        tmp_path / "sautomed",
        [
            ClassResult("c1", "liver", 0.5, 10.0, "ok"),
            ClassResult("c1", "aorta", 0.0, math.nan, "false_positive"),
        ],
        ["liver", "aorta"],
    )
    assert main(["compare", str(a), str(b / "summary.json")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "| measure | unet3d | sautomed |"
    rows = {line.split(" | ")[0].lstrip("| "): line.strip("| ").split(" | ")[1:] for line in lines[2:]}
    assert rows["mean DSC"] == ["0.5333", "0.2500"]  # (0.9 + 0.7 + 0) / 3, (0.5 + 0) / 2
    assert rows["liver DSC"] == ["0.8000", "0.5000"] and rows["liver HD95 (mm)"] == ["5.00", "10.00"]
    assert rows["spleen DSC"] == ["0.0000", "-"]  # a class the other run does not have
    assert rows["aorta HD95 (mm)"] == ["-", "-"]  # NaN (null in the JSON)
    assert rows["missed (case, class)"] == ["1", "0"] and rows["false positive (case, class)"] == ["0", "1"]
    assert rows["cases"] == ["2", "1"] and rows["predict s / case"] == ["1.25", "-"]


def test_same_folder_names_are_told_apart_by_path(tmp_path):
    rows = [ClassResult("c", "liver", 1.0, 0.0, "ok")]
    a = _run(tmp_path / "x" / "run", rows, ["liver"])
    b = _run(tmp_path / "y" / "run", rows, ["liver"])
    assert compare_table([a, b]).splitlines()[0] == f"| measure | {a} | {b} |"


def test_a_folder_without_summary_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "summary.json").write_text("{not json")
    for folder, message in (("empty", "no summary.json"), ("bad", "unreadable summary")):
        assert main(["compare", str(tmp_path / folder)]) == 1
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
