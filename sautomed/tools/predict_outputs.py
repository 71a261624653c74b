"""What `sautomed predict` writes beside the label maps: ``labels.json``, statistics, previews, DICOM-SEG.

``labels.json`` is written (atomically) before any prediction, so an output folder holding another model's
predictions is refused up front (see :func:`sautomed.tools.labels.write_label_table`). Statistics and
previews are made from the written label maps and their inputs after the predictions; a case that fails
is reported and the others go on.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sautomed import __version__
from sautomed.data.io import read_label_volume, read_volume, volume_stem
from sautomed.tools.dicom_seg import require_highdicom, write_dicom_seg
from sautomed.tools.errors import CASE_ERRORS, naming
from sautomed.tools.labels import LABELS_FILE, label_table, write_label_table
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
    p.add_argument(
        "--dicom-seg",
        action="store_true",
        help="OUT/<case>.seg.dcm for DICOM series inputs: a DICOM Segmentation (needs highdicom)",
    )


@dataclass(frozen=True)
class Extras:
    """Which extra files `predict` writes per case."""

    statistics: bool = False
    preview: bool = False
    dicom_seg: bool = False

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> Extras:
        """The flags of :func:`add_output_arguments`; VolumeError now if --dicom-seg lacks highdicom."""
        if a.dicom_seg:
            require_highdicom()
        return cls(a.statistics, a.preview, a.dicom_seg)


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
    extras: Extras,
    report: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
) -> list[tuple[str, str]]:
    """Statistics, previews, DICOM-SEG for the (input, written label map) pairs; returns the failures."""
    statistics, preview = extras.statistics, extras.preview
    if not (statistics or preview or extras.dicom_seg) or not done:
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
            if extras.dicom_seg and Path(src).is_dir():
                version = _algorithm_version(out_dir)
                write_dicom_seg(
                    labels, geom, Path(src), class_names, out_dir / f"{case}.seg.dcm", version=version
                )
            elif extras.dicom_seg:
                report(f"note: {src}: not a DICOM series; no DICOM-SEG written for it")
        except CASE_ERRORS as exc:
            failed.append((str(src), f"statistics / preview / DICOM-SEG failed: {naming(exc, dst)}"))
    if per_case:
        try:
            update_statistics_csv(out_dir, per_case)
        except (OSError, ValueError) as exc:
            failed.append((str(out_dir), f"statistics.csv not written: {exc}"))
    return failed


def _algorithm_version(out_dir: Path) -> str:
    """sautomed's version and the checkpoint's hash (from OUT/labels.json), for DICOM-SEG provenance."""
    try:
        sha = json.loads((out_dir / LABELS_FILE).read_text())["checkpoint"]["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        sha = None
    return f"{__version__} ckpt {sha[:16]}" if sha else __version__
