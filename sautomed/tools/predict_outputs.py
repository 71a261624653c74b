"""What `sautomed predict` writes beside the label maps: ``labels.json``, statistics and previews.

``labels.json`` is written (atomically) before any prediction, so an output folder holding another model's
predictions is refused up front (see :func:`sautomed.tools.labels.write_label_table`). Statistics and
previews are made from the written label maps and their inputs after the predictions; a case that fails
is reported and the others go on.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from sautomed.data.io import VolumeError, read_label_volume, read_volume, volume_stem
from sautomed.tools.labels import label_table, write_label_table
from sautomed.tools.preview import write_preview
from sautomed.tools.statistics import case_statistics, update_statistics_csv, write_case_statistics


def add_output_arguments(p: argparse.ArgumentParser) -> None:
    """The `predict` flags of this module."""
    p.add_argument(
        "--statistics",
        action="store_true",
        help="per case voxels, volume (mL) and for CT mean HU of every class: OUT/<case>.statistics.json "
        "and OUT/statistics.csv",
    )
    p.add_argument(
        "--preview", action="store_true", help="OUT/<case>.png: axial, coronal and sagittal views with labels"
    )


def write_run_label_table(
    out_dir: Path, class_names: Sequence[str], ckpt_path: Path, family: str | None, overwrite: bool
) -> Path:
    """``OUT/labels.json``: value -> class name and colour, and the checkpoint's path and hash."""
    return write_label_table(out_dir, label_table(class_names, ckpt_path, family), overwrite=overwrite)


def _is_ct(preprocessing: Mapping[str, Any] | None) -> bool:
    return bool(preprocessing) and preprocessing.get("normalization") == "ct"


def write_extras(
    done: Sequence[tuple[Path, Path]],
    out_dir: Path,
    class_names: Sequence[str],
    preprocessing: Mapping[str, Any] | None,
    statistics: bool,
    preview: bool,
    report: Callable[[str], None] = lambda line: None,
) -> list[tuple[str, str]]:
    """Statistics and previews for the (input, written label map) pairs; returns the failures (input, why)."""
    if not (statistics or preview) or not done:
        return []
    ct = _is_ct(preprocessing)
    window = tuple(preprocessing["window"]) if ct and "window" in preprocessing else None
    failed: list[tuple[str, str]] = []
    per_case: dict[str, dict[str, Any]] = {}
    for src, dst in done:
        case = volume_stem(dst)
        try:
            image, geom = read_volume(src)
            labels = read_label_volume(dst, reference=geom)
            if statistics:
                stats = case_statistics(labels, geom, class_names, image if ct else None)
                stats = {"case": case, "source": str(src), "labels": str(dst), **stats}
                write_case_statistics(stats, out_dir / f"{case}.statistics.json")
                per_case[case] = stats
            if preview:
                write_preview(image, labels, geom, class_names, out_dir / f"{case}.png", window, title=case)
        except (VolumeError, OSError, ValueError) as exc:
            failed.append((str(src), f"statistics / preview failed: {exc}"))
    if per_case:
        try:
            update_statistics_csv(out_dir, per_case)
        except (OSError, ValueError) as exc:
            failed.append((str(out_dir), f"statistics.csv not written: {exc}"))
    done_count = len(done) - len(failed)
    report(
        f"wrote {'statistics ' if statistics else ''}{'previews ' if preview else ''}for {done_count} cases"
    )
    return failed
