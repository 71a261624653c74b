"""Check a dataset before training: every case, every problem, one report (``sautomed check-data``).

Per case, ERROR for: an unreadable file (missing, empty, corrupt, 2D, 4D, vector), an image without label or
a label without image, a label grid (size, spacing, origin, direction) differing from the image's, NaN or inf
voxels in an image, non-integer label values, label values outside the layout's declared set, a duplicate
case id. WARN for an empty label (all background). Values are checked as stored, before any repair.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from .io import VolumeError, grid_mismatches, read_array
from .layouts import Case, DatasetError, Layout, describe

OK, WARN, ERROR = "OK", "WARN", "ERROR"


@dataclass
class CaseReport:
    case_id: str
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        return ERROR if self.errors else WARN if self.warnings else OK


@dataclass
class CheckReport:
    dataset: str  # layout, root and classes
    cases: list[CaseReport] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # dataset-level (root missing, ...)

    @property
    def ok(self) -> bool:
        """True when no case and no dataset-level problem is an error."""
        return not self.errors and all(c.status != ERROR for c in self.cases)

    def case(self, case_id: str) -> CaseReport:
        """The report of ``case_id`` (created on first use)."""
        for c in self.cases:
            if c.case_id == case_id:
                return c
        self.cases.append(CaseReport(case_id))
        return self.cases[-1]


def _check_case(layout: Layout, case: Case, report: CaseReport) -> None:
    try:
        image, geom = read_array(case.image)
    except VolumeError as e:
        report.errors.append(f"image unreadable: {e}")
        return
    if np.issubdtype(image.dtype, np.floating):
        n_nan, n_inf = int(np.isnan(image).sum()), int(np.isinf(image).sum())
        if n_nan or n_inf:
            report.errors.append(f"image {case.image}: {n_nan} NaN and {n_inf} inf voxels")
    for k, path in enumerate(case.channels, start=1):  # further channels: readable, on channel 0's grid
        try:
            channel, channel_geom = read_array(path)
        except VolumeError as e:
            report.errors.append(f"channel {k} unreadable: {e}")
            continue
        mismatches = grid_mismatches(channel_geom, geom)
        if mismatches:
            report.errors.append(f"channel {k} {path} grid differs from channel 0: " + "; ".join(mismatches))
        elif np.issubdtype(channel.dtype, np.floating) and not np.isfinite(channel).all():
            report.errors.append(f"channel {k} {path}: non-finite voxels")
    if case.label is None:
        return
    try:
        if case.label.is_dir():  # CHAOS PNG stack, matched to the DICOM series
            source = layout.read_source_label(case, geom)
        else:
            source, label_geom = read_array(case.label)
            mismatches = grid_mismatches(label_geom, geom)
            if mismatches:
                report.errors.append(f"label {case.label} grid differs from image: " + "; ".join(mismatches))
                return
            if np.issubdtype(source.dtype, np.floating):
                bad = ~np.isfinite(source) | (source != np.round(source))
                if bad.any():
                    examples = np.unique(source[bad])[:5].tolist()
                    report.errors.append(
                        f"label {case.label}: {int(bad.sum())} non-integer values (e.g. {examples})"
                    )
                    return
                source = source.astype(np.int64)
    except (VolumeError, DatasetError) as e:
        report.errors.append(f"label unreadable: {e}")
        return
    unexpected = layout.unexpected_values(source)
    if unexpected:
        report.errors.append(f"label {case.label}: values {unexpected[:10]} outside the declared set")
    elif not layout.remap(source).any():
        report.warnings.append(f"label {case.label} is empty (all background after the label map)")


def check_dataset(layout: Layout) -> CheckReport:
    """Check every case of ``layout`` and report all problems (never stops at the first)."""
    report = CheckReport(describe(layout))
    try:
        found = layout.discover()
    except (DatasetError, OSError, ValueError) as e:
        report.errors.append(str(e))
        return report
    counts = Counter(c.case_id for c in found.cases)
    for orphan in found.orphans:
        report.case(orphan.case_id).errors.append(f"{orphan.problem}: {orphan.path}")
    for case in found.cases:
        entry = report.case(case.case_id)
        if counts[case.case_id] > 1 and not any("duplicate" in e for e in entry.errors):
            entry.errors.append(f"duplicate case id ({counts[case.case_id]} cases)")
        _check_case(layout, case, entry)
    report.cases.sort(key=lambda c: c.case_id)
    return report


def format_report(report: CheckReport) -> str:
    """Human-readable report: one line per case, indented problems, a summary line."""
    lines = [report.dataset]
    lines += [f"ERROR {e}" for e in report.errors]
    width = max((len(c.case_id) for c in report.cases), default=0)
    for c in report.cases:
        lines.append(f"{c.status:<5} {c.case_id:<{width}}")
        lines += [f"      error: {e}" for e in c.errors] + [f"      warning: {w}" for w in c.warnings]
    n = Counter(c.status for c in report.cases)
    verdict = "OK" if report.ok else "FAILED"
    lines.append(
        f"{verdict}: {len(report.cases)} cases, {n[OK]} ok, {n[WARN]} with warnings, {n[ERROR]} with errors"
    )
    return "\n".join(lines)
