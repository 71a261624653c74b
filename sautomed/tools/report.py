"""``report.html``: the metrics of a test / validate / evaluate folder as one self-contained HTML page.

Read from the folder's ``metrics.csv`` and ``summary.json``
(:func:`sautomed.evaluation.metrics.write_metrics`): the summary, the run's training-loss and validation
curves (``curves.py``, from the fit's CSV log when the folder is a run folder), a per-class table, and a case
x class table of DSC / HD95 with each cell's status (missed and false positive cells marked), worst case
first, each row with its thumbnail of reference and prediction side by side (``thumbnails/<case>.png``,
written by the evaluation, embedded in the page), plus the cases listed as missing or failed in the summary. A
``<case>.png`` preview in the folder is linked from its row. No scripts, no external files.

    sautomed report runs/btcv          # writes runs/btcv/report.html

`sautomed validate` / `test` write it too, through :class:`ReportWriter` (a callback the CLI adds).
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback

from sautomed.data.io import atomic_write
from sautomed.errors import UserError
from sautomed.evaluation.thumbnails import THUMBNAILS
from sautomed.tools.curves import curves_svg

REPORT_FILE = "report.html"
_STYLE = """body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f0f0f0}td.l,th.l{text-align:left}
td.missed{background:#f8c0c0}td.false_positive{background:#f8e0a0}td.not_applicable{color:#aaa}
.note{color:#666}"""


class ReportError(UserError):
    """The folder holds no metrics to report; the message names it."""


def _num(value: Any, digits: int = 4) -> str:
    return "-" if value is None or value == "" else f"{float(value):.{digits}f}"


def _dsc_colour(dsc: float) -> str:
    """Cell background from red (0) over yellow to green (1)."""
    red = int(255 * min(1.0, 2 * (1 - dsc)))
    green = int(255 * min(1.0, 2 * dsc))
    return f"background:rgba({red},{green},80,0.35)"


def read_metrics(folder: Path) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """The rows of ``metrics.csv`` and the ``summary.json`` of ``folder``."""
    folder = Path(folder)
    try:
        with open(folder / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        summary = json.loads((folder / "summary.json").read_text())
    except FileNotFoundError as exc:
        raise ReportError(f"{folder}: no metrics to report ({Path(exc.filename).name} missing)") from exc
    except (OSError, ValueError) as exc:
        raise ReportError(f"{folder}: unreadable metrics ({exc})") from exc
    if not rows or "class" not in rows[0]:
        raise ReportError(f"{folder / 'metrics.csv'}: holds no case rows")
    return rows, summary


def case_order(rows: Sequence[Mapping[str, str]]) -> list[str]:
    """Cases by their mean DSC over the classes that apply (missed, false positive: 0), worst first.

    Only the automatic rows count (statuses of the empty-mask policy): M-SAM's oracle-prompted rows are
    another protocol, and a case with no automatic row sorts last."""
    scores: dict[str, list[float]] = {}
    for r in rows:
        scores.setdefault(r["case"], [])
        if r["status"] in ("ok", "missed", "false_positive") and r["dsc"] not in ("", None):
            value = float(r["dsc"])
            scores[r["case"]].append(0.0 if math.isnan(value) else value)
    return sorted(scores, key=lambda c: (sum(scores[c]) / len(scores[c]) if scores[c] else 1.0, c))


def render(
    rows: Sequence[Mapping[str, str]],
    summary: Mapping[str, Any],
    previews: set[str],
    thumbnails: Mapping[str, bytes] | None = None,
    curves: Sequence[str] = (),
) -> str:
    """The HTML page; ``thumbnails``: {case: PNG bytes}, embedded; ``curves``: inline SVG panels."""
    e = html.escape
    thumbnails = thumbnails or {}
    classes = list(summary.get("per_class") or dict.fromkeys(r["class"] for r in rows))
    cases = case_order(rows)
    cell = {(r["case"], r["class"]): r for r in rows}
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>sautomed report</title><style>{_STYLE}"]
    out.append("</style></head><body><h1>Segmentation report</h1>")
    source = summary.get("checkpoint") or summary.get("predictions")
    if source:
        out.append(f"<p class='note'>{e(str(source))}</p>")
    out.append("<table><tr><th class='l'>mean DSC</th><th>mean HD95 (mm)</th><th>cases</th>")
    out.append("<th>missed</th><th>false positive</th></tr>")
    out.append(
        f"<tr><td>{_num(summary.get('mean_dsc'))}</td><td>{_num(summary.get('mean_hd95_mm'), 2)}</td>"
        f"<td>{summary.get('num_cases', len(cases))}</td><td>{summary.get('missed_cases', '-')}</td>"
        f"<td>{summary.get('false_positive_cases', '-')}</td></tr></table>"
    )
    if curves:
        out.append("<h2>Training</h2><p>" + " ".join(curves) + "</p>")
    out.append("<h2>Per class</h2><table><tr><th class='l'>class</th><th>DSC</th><th>HD95 (mm)</th>")
    out.append("<th>applicable</th><th>missed</th><th>false positive</th></tr>")
    for name in classes:
        c = (summary.get("per_class") or {}).get(name, {})
        out.append(
            f"<tr><td class='l'>{e(name)}</td><td>{_num(c.get('dsc'))}</td>"
            f"<td>{_num(c.get('hd95_mm'), 2)}</td>"
            f"<td>{c.get('applicable', '-')}</td><td>{c.get('missed', '-')}</td>"
            f"<td>{c.get('false_positive', '-')}</td></tr>"
        )
    out.append("</table><h2>Per case</h2><p class='note'>DSC / HD95 mm; red: missed, amber: false positive, ")
    out.append("grey: absent from both. Worst case first.</p><table><tr><th class='l'>case</th>")
    out += [f"<th>{e(n)}</th>" for n in classes]
    out.append("<th class='l'>reference | prediction</th></tr>" if thumbnails else "</tr>")
    for case in cases:
        link = f"<a href='{e(case)}.png'>{e(case)}</a>" if case in previews else e(case)
        out.append(f"<tr><td class='l'>{link}</td>")
        for name in classes:
            r = cell.get((case, name))
            if r is None:
                out.append("<td>-</td>")
                continue
            status = r["status"]
            style = f" style='{_dsc_colour(float(r['dsc']))}'" if status == "ok" else ""
            text = "-" if status == "not_applicable" else f"{_num(r['dsc'], 3)} / {_num(r['hd95_mm'], 1)}"
            out.append(f"<td class='{e(status)}'{style} title='{e(status)}'>{text}</td>")
        if thumbnails:
            png = thumbnails.get(case)
            data = base64.b64encode(png).decode("ascii") if png else None
            img = f"<img alt='{e(case)}: reference and prediction' src='data:image/png;base64,{data}'>"
            out.append(f"<td class='l'>{img}</td>" if data else "<td>-</td>")
        out.append("</tr>")
    out.append("</table>")
    for key, title in (
        ("missing_predictions", "Cases without a prediction (scored as empty)"),
        ("resampled", "Predictions resampled onto the reference grid"),
    ):
        if summary.get(key):
            out.append(f"<h2>{title}</h2><p>{e(', '.join(map(str, summary[key])))}</p>")
    if summary.get("failed"):
        out.append("<h2>Not scored (failed)</h2><ul>")
        out += [f"<li>{e(str(k))}: {e(str(v))}</li>" for k, v in summary["failed"].items()]
        out.append("</ul>")
    out.append("</body></html>\n")
    return "".join(out)


def write_report(folder: str | Path) -> Path:
    """Write ``folder/report.html`` (atomically) from the folder's metrics.csv and summary.json."""
    folder = Path(folder)
    rows, summary = read_metrics(folder)
    previews = {p.name[: -len(".png")] for p in folder.glob("*.png")}
    cases = {r["case"] for r in rows}
    thumbnails = {p.stem: p.read_bytes() for p in (folder / THUMBNAILS).glob("*.png") if p.stem in cases}
    text = render(rows, summary, previews, thumbnails, curves_svg(folder))
    return atomic_write(folder / REPORT_FILE, lambda p: p.write_text(text))


class ReportWriter(Callback):
    """After `validate` / `test` wrote metrics.csv and summary.json to the run folder: its report.html."""

    def _write(self, trainer: Any) -> None:
        if trainer.is_global_zero and trainer.state.fn in ("validate", "test"):
            folder = Path(trainer.default_root_dir)
            if (folder / "metrics.csv").is_file():
                write_report(folder)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        self._write(trainer)

    def on_test_end(self, trainer: Any, pl_module: Any) -> None:
        self._write(trainer)


def report_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="sautomed report", description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path, help="a folder with metrics.csv and summary.json (test, evaluate)")
    a = p.parse_args(argv)
    print(f"wrote {write_report(a.folder)}")
    return 0
