"""Per-case label statistics: voxel count, volume in mL (from the spacing) and, for CT, mean HU per class.

Written by `sautomed predict --statistics` as ``OUT/<case>.statistics.json`` per case and one
``OUT/statistics.csv`` for the folder (rows of cases predicted again are replaced, others kept).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sautomed.data.io import Geometry, atomic_write
from sautomed.errors import UserError

CSV_FILE = "statistics.csv"
CSV_COLUMNS = ("case", "class", "value", "voxels", "volume_ml", "mean_hu")


def case_statistics(
    labels: np.ndarray, geom: Geometry, class_names: Sequence[str], image: np.ndarray | None = None
) -> dict[str, Any]:
    """Statistics of one canonical label map (values 1..C for ``class_names``).

    ``image`` (raw CT intensities on the same grid) adds each class's mean HU; None leaves it out.
    """
    if labels.shape != geom.shape_zyx:
        raise UserError(f"{geom.path}: labels {labels.shape} do not match the grid {geom.shape_zyx}")
    if image is not None and image.shape != labels.shape:
        raise UserError(f"{geom.path}: image {image.shape} and labels {labels.shape} differ in shape")
    voxel_ml = float(np.prod(geom.spacing)) / 1000.0  # mm^3 -> mL
    counts = np.bincount(labels.ravel().astype(np.int64), minlength=len(class_names) + 1)
    sums = None
    if image is not None:
        sums = np.bincount(
            labels.ravel().astype(np.int64), weights=image.ravel().astype(np.float64), minlength=counts.size
        )
    classes = {}
    for value, name in enumerate(class_names, start=1):
        n = int(counts[value])
        entry: dict[str, Any] = {"value": value, "voxels": n, "volume_ml": n * voxel_ml}
        if sums is not None:
            entry["mean_hu"] = float(sums[value] / n) if n else None
        classes[name] = entry
    extra = sorted(int(v) for v in np.nonzero(counts[len(class_names) + 1 :])[0] + len(class_names) + 1)
    return {
        "spacing_mm": list(geom.spacing_zyx),
        "voxel_volume_ml": voxel_ml,
        "intensity": "HU" if image is not None else None,
        "classes": classes,
        "unknown_values": extra,
    }


def write_case_statistics(stats: Mapping[str, Any], out: Path) -> Path:
    """Write one case's statistics as JSON, atomically (NaN-free: absent means are null)."""
    text = json.dumps(stats, indent=2) + "\n"
    return atomic_write(Path(out), lambda p: p.write_text(text))


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def update_statistics_csv(out_dir: Path, per_case: Mapping[str, Mapping[str, Any]]) -> Path:
    """Write ``out_dir/statistics.csv`` with these cases' rows; rows of other cases already there are kept."""
    path = Path(out_dir) / CSV_FILE
    rows: list[dict[str, str]] = []
    if path.is_file():
        try:
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                if tuple(reader.fieldnames or ()) != CSV_COLUMNS:
                    raise UserError(f"{path}: not a sautomed statistics table (columns {reader.fieldnames})")
                rows = [r for r in reader if r["case"] not in per_case]
        except OSError as exc:
            raise UserError(f"{path}: cannot read the existing statistics table ({exc})") from exc
    for case, stats in per_case.items():
        for name, c in stats["classes"].items():
            rows.append(
                {
                    "case": case,
                    "class": name,
                    "value": str(c["value"]),
                    "voxels": str(c["voxels"]),
                    "volume_ml": _fmt(float(c["volume_ml"])),
                    "mean_hu": _fmt(c.get("mean_hu")),
                }
            )
    rows.sort(key=lambda r: (r["case"], int(r["value"])))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    text = buf.getvalue()
    return atomic_write(path, lambda p: p.write_text(text))
