"""The run's loss and validation curves as inline SVG, for ``report.html`` (no plotting dependency).

Read from the CSV log Lightning writes during ``fit`` (``<run>/lightning_logs/version_*/metrics.csv``): the
newest log that holds ``train/loss``. ``train/loss`` is drawn against the step; the validation mean DSC
(``val/mean_dsc``, or ``val/dsc``) against the step too, when the fit validated.
"""

from __future__ import annotations

import csv
import html
import math
from collections.abc import Sequence
from pathlib import Path

SERIES = (("train/loss", "training loss", "#1f77b4"), ("val/mean_dsc", "validation mean DSC", "#d62728"))
WIDTH, HEIGHT, MARGIN = 520, 180, 40


def training_log(folder: str | Path) -> Path | None:
    """The newest ``lightning_logs/version_*/metrics.csv`` under ``folder`` that logged ``train/loss``."""
    logs = sorted(
        Path(folder).glob("lightning_logs/version_*/metrics.csv"),
        key=lambda p: int(p.parent.name.split("_")[-1]) if p.parent.name.split("_")[-1].isdigit() else -1,
    )
    for path in reversed(logs):
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if "train/loss" in header:
            return path
    return None


def read_series(path: Path) -> dict[str, list[tuple[float, float]]]:
    """{column: [(step, value), ...]} for the columns of :data:`SERIES` (``val/dsc`` as ``val/mean_dsc``)."""
    out: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in SERIES}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = row.get("step") or ""
            for name in out:
                value = row.get(name) or (row.get("val/dsc") if name == "val/mean_dsc" else None)
                if step and value:
                    v = float(value)
                    if math.isfinite(v):
                        out[name].append((float(step), v))
    return {k: v for k, v in out.items() if v}


def _panel(points: Sequence[tuple[float, float]], label: str, colour: str) -> str:
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
    w, h = WIDTH - 2 * MARGIN, HEIGHT - 2 * MARGIN

    def xy(x: float, y: float) -> str:
        return f"{MARGIN + (x - x0) / (x1 - x0) * w:.1f},{MARGIN + (1 - (y - y0) / (y1 - y0)) * h:.1f}"

    line = " ".join(xy(x, y) for x, y in points)
    e = html.escape
    return (
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{WIDTH}' height='{HEIGHT}' role='img' "
        f"aria-label='{e(label)}'><rect width='100%' height='100%' fill='#fff'/>"
        f"<rect x='{MARGIN}' y='{MARGIN}' width='{w}' height='{h}' fill='none' stroke='#bbb'/>"
        f"<polyline fill='none' stroke='{colour}' stroke-width='1.5' points='{line}'/>"
        f"<text x='{MARGIN}' y='{MARGIN - 8}' font-size='12'>{e(label)}</text>"
        f"<text x='{MARGIN - 4}' y='{MARGIN + 4}' font-size='10' text-anchor='end'>{y1:.3g}</text>"
        f"<text x='{MARGIN - 4}' y='{MARGIN + h}' font-size='10' text-anchor='end'>{y0:.3g}</text>"
        f"<text x='{MARGIN}' y='{HEIGHT - MARGIN + 14}' font-size='10'>step {x0:.0f}</text>"
        f"<text x='{MARGIN + w}' y='{HEIGHT - MARGIN + 14}' font-size='10' text-anchor='end'>{x1:.0f}</text>"
        "</svg>"
    )


def curves_svg(folder: str | Path) -> list[str]:
    """One SVG panel per series found in the run's training log (empty when the folder holds no fit log)."""
    path = training_log(folder)
    if path is None:
        return []
    series = read_series(path)
    return [_panel(series[name], label, colour) for name, label, colour in SERIES if name in series]


PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def lines_svg(
    series: dict[str, Sequence[tuple[float, float]]],
    title: str,
    x_label: str,
    y_label: str,
    y_range: tuple[float, float] | None = None,
) -> str:
    """Several named series of (x, y) points on one set of axes, as a standalone SVG with a legend (for a
    figure in the docs, e.g. DSC against the number of training cases). ValueError when there is no point."""
    points = [p for pts in series.values() for p in pts]
    if not points:
        raise ValueError("lines_svg: no points to draw")
    xs = sorted({p[0] for p in points})
    x0, x1 = xs[0], xs[-1] if xs[-1] > xs[0] else xs[0] + 1
    y0, y1 = y_range or (min(p[1] for p in points), max(p[1] for p in points))
    y1 = y1 if y1 > y0 else y0 + 1
    width, height, left, right, top, bottom = 560, 320, 60, 170, 36, 46
    w, h = width - left - right, height - top - bottom

    def xy(x: float, y: float) -> tuple[float, float]:
        return left + (x - x0) / (x1 - x0) * w, top + (1 - (y - y0) / (y1 - y0)) * h

    e = html.escape
    parts = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' role='img' "
        f"aria-label='{e(title)}'><rect width='100%' height='100%' fill='#fff'/>",
        f"<rect x='{left}' y='{top}' width='{w}' height='{h}' fill='none' stroke='#bbb'/>",
        f"<text x='{left}' y='{top - 14}' font-size='13'>{e(title)}</text>",
        f"<text x='{left + w / 2:.1f}' y='{height - 8}' font-size='11' text-anchor='middle'>"
        f"{e(x_label)}</text>",
        f"<text x='14' y='{top + h / 2:.1f}' font-size='11' text-anchor='middle' "
        f"transform='rotate(-90 14 {top + h / 2:.1f})'>{e(y_label)}</text>",
    ]
    for x in xs:
        px, _ = xy(x, y0)
        parts.append(
            f"<text x='{px:.1f}' y='{top + h + 14}' font-size='10' text-anchor='middle'>{x:g}</text>"
        )
    for k in range(5):
        y = y0 + (y1 - y0) * k / 4
        _, py = xy(x0, y)
        parts.append(f"<line x1='{left}' x2='{left + w}' y1='{py:.1f}' y2='{py:.1f}' stroke='#eee'/>")
        parts.append(f"<text x='{left - 4}' y='{py + 3:.1f}' font-size='10' text-anchor='end'>{y:.3g}</text>")
    for i, (name, pts) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        coords = [xy(x, y) for x, y in sorted(pts)]
        line = " ".join(f"{px:.1f},{py:.1f}" for px, py in coords)
        parts.append(f"<polyline fill='none' stroke='{colour}' stroke-width='1.8' points='{line}'/>")
        parts += [f"<circle cx='{px:.1f}' cy='{py:.1f}' r='3' fill='{colour}'/>" for px, py in coords]
        ly = top + 14 + 18 * i
        parts.append(
            f"<line x1='{left + w + 10}' x2='{left + w + 28}' y1='{ly}' y2='{ly}' stroke='{colour}' "
            "stroke-width='2'/>"
        )
        parts.append(f"<text x='{left + w + 32}' y='{ly + 4}' font-size='11'>{e(name)}</text>")
    return "".join(parts) + "</svg>\n"
