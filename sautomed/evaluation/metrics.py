"""Segmentation metrics: plain functions first (DSC, HD95 in mm), then the per-case table and its summary.

Empty-mask policy (design.md section 3), per case and class:

| ground truth | prediction | status         | DSC | HD95                         |
|--------------|------------|----------------|-----|------------------------------|
| empty        | empty      | not_applicable | -   | -                            |
| present      | empty      | missed         | 0   | the volume's diagonal in mm  |
| empty        | present    | false_positive | 0   | not applicable               |
| present      | present    | ok             | DSC | HD95 (medpy, voxel spacing)  |

Means are taken over what is applicable; a class with nothing applicable reports NaN, never 0.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from medpy.metric.binary import hd95 as _medpy_hd95

from sautomed.data.io import atomic_write
from sautomed.errors import UserError
from sautomed.evaluation.gather import gather_lists, unique_by

STATUSES = ("ok", "missed", "false_positive", "not_applicable")


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice similarity coefficient of two boolean masks (1.0 when both are empty)."""
    pred = np.asarray(pred, dtype=bool)
    ref = np.asarray(ref, dtype=bool)
    denom = int(pred.sum()) + int(ref.sum())
    if denom == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, ref).sum()) / denom


def hd95_mm(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> float:
    """95th percentile symmetric Hausdorff distance in mm (medpy); both masks must be non-empty.

    `spacing` is in the array's axis order (z, y, x for canonical volumes).
    """
    pred = np.asarray(pred, dtype=bool)
    ref = np.asarray(ref, dtype=bool)
    if not pred.any() or not ref.any():
        raise UserError("hd95_mm needs two non-empty masks; apply the empty-mask policy first")
    return float(_medpy_hd95(pred, ref, voxelspacing=tuple(float(s) for s in spacing)))


def volume_diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Length of the volume's diagonal in mm: the HD95 charged for a missed organ."""
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing))))


@dataclass(frozen=True)
class ClassResult:
    """One case and class. ``slices_missed``: reference slices beyond the prediction's first and last slice
    (an organ cut short at its ends, or all of a missed one); ``slices_beyond``: predicted slices beyond the
    reference's first and last (an organ carried past its ends, or all of a false positive). Slices run
    along the canonical volume's first axis."""

    case: str
    class_name: str
    dsc: float
    hd95_mm: float
    status: str
    slices_missed: int = 0
    slices_beyond: int = 0


def slices_past_ends(pred: np.ndarray, ref: np.ndarray) -> tuple[int, int]:
    """(reference slices outside the prediction's slice extent, predicted slices outside the reference's)
    of two boolean (Z, ...) masks; an empty mask's extent is empty."""
    zp = np.flatnonzero(pred.reshape(pred.shape[0], -1).any(1))
    zr = np.flatnonzero(ref.reshape(ref.shape[0], -1).any(1))
    if not len(zp) or not len(zr):
        return len(zr), len(zp)
    missed = int(((zr < zp[0]) | (zr > zp[-1])).sum())
    beyond = int(((zp < zr[0]) | (zp > zr[-1])).sum())
    return missed, beyond


def evaluate_case(
    case_id: str,
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float],
    class_names: Sequence[str],
) -> list[ClassResult]:
    """Score one case: `pred` and `ref` are integer label maps on the same (original) grid."""
    if pred.shape != ref.shape:
        raise UserError(f"{case_id}: prediction shape {pred.shape} != reference shape {ref.shape}")
    diagonal = volume_diagonal_mm(ref.shape, spacing)
    rows = []
    for index, name in enumerate(class_names, start=1):
        p, r = pred == index, ref == index
        has_p, has_r = bool(p.any()), bool(r.any())
        ends = slices_past_ends(p, r)
        if not has_r and not has_p:
            rows.append(ClassResult(case_id, name, math.nan, math.nan, "not_applicable"))
        elif has_r and not has_p:
            rows.append(ClassResult(case_id, name, 0.0, diagonal, "missed", *ends))
        elif has_p and not has_r:
            rows.append(ClassResult(case_id, name, 0.0, math.nan, "false_positive", *ends))
        else:
            rows.append(ClassResult(case_id, name, dice(p, r), hd95_mm(p, r, spacing), "ok", *ends))
    return rows


def gather_rows(rows: Sequence[ClassResult]) -> list[ClassResult]:
    """Every rank's rows under DDP (each case once, as ranks may evaluate a padded copy), sorted by case
    and class; this process's rows alone otherwise."""
    (rows,) = gather_lists(rows)
    return unique_by(rows, lambda r: (r.case, r.class_name))


def _nanmean(values: Iterable[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return float(sum(vals) / len(vals)) if vals else math.nan


def summarize(rows: Sequence[ClassResult], class_names: Sequence[str]) -> dict[str, Any]:
    """Means over what is applicable (per class, then over all applicable case-class pairs)."""
    per_class: dict[str, dict[str, float | int]] = {}
    for name in class_names:
        mine = [r for r in rows if r.class_name == name]
        per_class[name] = {
            "dsc": _nanmean(r.dsc for r in mine),
            "hd95_mm": _nanmean(r.hd95_mm for r in mine),
            "missed": sum(r.status == "missed" for r in mine),
            "false_positive": sum(r.status == "false_positive" for r in mine),
            "applicable": sum(r.status != "not_applicable" for r in mine),
            # how it failed: organs cut short at their ends, carried past them (cases, and slices in all)
            "cut_short_cases": sum(r.status == "ok" and r.slices_missed > 0 for r in mine),
            "slices_missed_at_ends": sum(r.slices_missed for r in mine),
            "carried_past_cases": sum(r.status == "ok" and r.slices_beyond > 0 for r in mine),
            "slices_beyond_ends": sum(r.slices_beyond for r in mine),
        }
    return {
        "mean_dsc": _nanmean(r.dsc for r in rows),
        "mean_hd95_mm": _nanmean(r.hd95_mm for r in rows),
        "per_class": per_class,
        "missed_cases": sum(r.status == "missed" for r in rows),
        "false_positive_cases": sum(r.status == "false_positive" for r in rows),
        "num_cases": len({r.case for r in rows}),
    }


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_metrics(rows: Sequence[ClassResult], summary: dict[str, Any], out_dir: Path) -> None:
    """Write `metrics.csv` (case, class, dsc, hd95_mm, status, slices_missed_at_ends, slices_beyond_ends) and
    `summary.json` atomically.

    NaN is written as an empty CSV cell and as JSON null.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(
        ["case", "class", "dsc", "hd95_mm", "status", "slices_missed_at_ends", "slices_beyond_ends"]
    )
    for r in sorted(rows, key=lambda r: (r.case, r.class_name)):
        d = asdict(r)
        writer.writerow(
            [
                d["case"],
                d["class_name"],
                "" if math.isnan(r.dsc) else f"{r.dsc:.6f}",
                "" if math.isnan(r.hd95_mm) else f"{r.hd95_mm:.4f}",
                r.status,
                r.slices_missed,
                r.slices_beyond,
            ]
        )
    text = buf.getvalue()
    atomic_write(out_dir / "metrics.csv", lambda p: p.write_text(text))
    blob = json.dumps(_json_safe(summary), indent=2, sort_keys=False)
    atomic_write(out_dir / "summary.json", lambda p: p.write_text(blob + "\n"))
