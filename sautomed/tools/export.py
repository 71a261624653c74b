"""`sautomed export`: predictions in a challenge's submission format.

``--format chaos-png``: one 8-bit PNG per DICOM slice, ``OUT/<patient>/Results/img000.png`` ... (CT) or
``OUT/<patient>/T2SPIR/Results/...`` (MR), in the source DICOM order: ``imgKKK.png`` is the DICOM file with
the K-th smallest InstanceNumber (0020,0013), rows and columns those of the DICOM slice (the rule
:func:`sautomed.data.layouts.read_png_stack` reads the CHAOS ground truth with). Grey values: CT liver 255;
MR liver 63, right kidney 126, left kidney 189, spleen 252. ``--dicom`` is the patient's DICOM series folder
(for one prediction file) or a CHAOS folder of patients (``<id>/DICOM_anon``, ``<id>/T2SPIR/DICOM_anon``),
matched by the prediction's case id. The prediction must lie on the DICOM series' grid.

``--format segthor``: ``OUT/Patient_XX.nii.gz`` (uint8, the prediction's grid) with SegTHOR's values
1 esophagus, 2 heart, 3 trachea, 4 aorta.

Prediction values are mapped by class name when a label table is found (``--labels``, or ``labels.json``
beside the predictions, as `sautomed predict` writes it); otherwise they must already be the challenge's
class indices. A case that fails is reported and skipped (exit code 1); existing outputs are kept unless
``--overwrite``. Each case's PNG folder appears complete or not at all (written aside, then renamed).
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from sautomed.data.io import (
    dicom_series_files,
    dicom_tags,
    from_canonical,
    grid_mismatches,
    integral_labels,
    is_dicom_dir,
    is_volume_file,
    read_array,
    volume_stem,
    write_volume,
)
from sautomed.data.layouts import CHAOS_CT_CLASSES, CHAOS_MR_CLASSES, SEGTHOR_CLASSES
from sautomed.errors import UserError
from sautomed.tools.errors import CASE_ERRORS, naming
from sautomed.tools.labels import LABELS_FILE, read_label_names, value_map

FORMATS = ("chaos-png", "segthor")
CHAOS_GREY = {
    "CT": {"liver": 255},
    "MR": {"liver": 63, "right_kidney": 126, "left_kidney": 189, "spleen": 252},
}
CHAOS_CLASSES = {"CT": CHAOS_CT_CLASSES, "MR": CHAOS_MR_CLASSES}


class ExportError(UserError):
    """A prediction cannot be exported; the message names the file."""


def to_target_values(
    labels: np.ndarray,
    names: dict[int, str] | None,
    target: dict[str, int],
    default: Sequence[str],
    what: str,
) -> np.ndarray:
    """Prediction values -> the format's values: by class name with a table (classes the format lacks become
    background, with a warning), else value k is class ``default[k-1]``."""
    if names is None:
        mapping = value_map(dict(enumerate(default, start=1)), target, what)
    else:
        lacking = sorted(n for n in names.values() if n not in target)
        if lacking:
            warnings.warn(
                f"{what}: classes {lacking} have no value in this format; written as background", stacklevel=2
            )
        mapping = {v: target.get(n, 0) for v, n in names.items()}
    present = {int(v) for v in np.unique(labels)} - {0}
    unknown = sorted(present - set(mapping))
    if unknown:
        raise ExportError(f"{what}: label values {unknown[:10]} have no class (known: {sorted(mapping)})")
    out = np.zeros(labels.shape, np.uint8)
    for value, grey in mapping.items():
        out[labels == value] = grey
    return out


# ----------------------------------------------------------------------------------------------- chaos


def dicom_modality(files: Sequence[str]) -> str:
    """CT or MR, from the series' Modality tag (0008,0060)."""
    modality = dicom_tags(files[0], ("0008|0060",)).get("0008|0060", "").upper()
    if modality not in CHAOS_GREY:
        raise ExportError(f"{files[0]}: DICOM modality {modality or 'missing'!r}; CHAOS has CT and MR")
    return modality


def chaos_series(root: Path) -> dict[str, Path]:
    """Patient id -> DICOM series folder under a CHAOS folder (CT ``<id>/DICOM_anon``, MR T2-SPIR)."""
    found: dict[str, Path] = {}
    for series in sorted(root.glob("**/DICOM_anon")):
        if not is_dicom_dir(series):
            continue
        parent = series.parent
        if parent.name == "T2SPIR":
            found.setdefault(parent.parent.name, series)
        elif parent.name != "T1DUAL":
            found.setdefault(parent.name, series)
    return found


def _patient_of(series: Path) -> str:
    parent = series.parent if series.name == "DICOM_anon" else series
    return parent.parent.name if parent.name == "T2SPIR" else parent.name


def _replace_folder(out: Path, fill: Callable[[Path], None], overwrite: bool) -> None:
    """Fill a hidden sibling folder, then rename it to ``out`` (the old one, with overwrite, goes last)."""
    if out.exists() and not overwrite:
        raise ExportError(f"{out}: exists (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        fill(tmp)
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export_chaos_case(
    pred: Path, series: Path, out_dir: Path, names: dict[int, str] | None, overwrite: bool = False
) -> Path:
    """Write one patient's PNG stack; returns its Results folder."""
    files = dicom_series_files(series)
    modality = dicom_modality(files)
    _, geom = read_array(series)  # the grid the prediction must lie on
    array, pred_geom = read_array(pred)
    problems = grid_mismatches(pred_geom, geom)
    if problems:
        raise ExportError(
            f"{pred}: prediction is not on the grid of the DICOM series {series}: {'; '.join(problems)}"
        )
    labels = integral_labels(array, str(pred))
    grey = to_target_values(labels, names, CHAOS_GREY[modality], CHAOS_CLASSES[modality], str(pred))
    stored = from_canonical(grey, geom)  # (series position, row, column), the series' file order
    instances = []
    for f in files:
        tag = dicom_tags(f, ("0020|0013",)).get("0020|0013", "")
        instances.append(int(tag) if tag.lstrip("-").isdigit() else None)
    if None in instances or len(set(instances)) != len(instances):
        raise ExportError(f"{series}: DICOM InstanceNumbers missing or repeated; the slice order is unknown")
    rank = {inst: k for k, inst in enumerate(sorted(instances))}
    patient = _patient_of(series)
    results = out_dir / patient / ("T2SPIR" if modality == "MR" else "") / "Results"

    def fill(folder: Path) -> None:
        for z, inst in enumerate(instances):
            Image.fromarray(stored[z]).save(folder / f"img{rank[inst]:03d}.png")

    _replace_folder(results, fill, overwrite)
    return results


# --------------------------------------------------------------------------------------------- segthor


def segthor_name(pred: Path) -> str:
    """``Patient_XX.nii.gz`` from a prediction named after its patient (the last number in the name)."""
    numbers = re.findall(r"\d+", re.sub(r"_\d{4}$", "", volume_stem(pred)))
    if not numbers:
        raise ExportError(f"{pred}: no patient number in the file name (SegTHOR wants Patient_XX.nii.gz)")
    return f"Patient_{int(numbers[-1]):02d}.nii.gz"


def export_segthor_case(
    pred: Path, out_dir: Path, names: dict[int, str] | None, overwrite: bool = False
) -> Path:
    """Write ``OUT/Patient_XX.nii.gz`` with SegTHOR's label values on the prediction's grid."""
    out = out_dir / segthor_name(pred)
    if out.exists() and not overwrite:
        raise ExportError(f"{out}: exists (pass --overwrite to replace it)")
    array, geom = read_array(pred)
    labels = integral_labels(array, str(pred))
    target = {name: v for v, name in enumerate(SEGTHOR_CLASSES, start=1)}
    values = to_target_values(labels, names, target, SEGTHOR_CLASSES, str(pred))
    return write_volume(values, geom, out, overwrite=overwrite)


# ----------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sautomed export", description=__doc__.splitlines()[0])
    p.add_argument("--format", required=True, choices=FORMATS, help="submission format")
    p.add_argument("--pred", required=True, type=Path, help="a predicted label map or a folder of them")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--dicom", type=Path, default=None, help="chaos-png: DICOM series folder, or CHAOS folder")
    p.add_argument(
        "--labels", type=Path, default=None, help=f"label table (default: {LABELS_FILE} beside --pred)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    return p


def export_main(argv: Sequence[str]) -> int:
    a = build_parser().parse_args(argv)
    if not a.pred.exists():
        raise ExportError(f"{a.pred}: prediction does not exist")
    folder = a.pred if a.pred.is_dir() else a.pred.parent
    preds = (
        sorted(p for p in a.pred.iterdir() if not p.name.startswith(".") and is_volume_file(p))
        if a.pred.is_dir()
        else [a.pred]
    )
    if not preds:
        raise ExportError(f"{a.pred}: no label maps to export")
    table = a.labels or (folder / LABELS_FILE if (folder / LABELS_FILE).is_file() else None)
    names = read_label_names(table) if table else None
    jobs: list[tuple[Path, Callable[[], Path]]] = []
    if a.format == "segthor":
        jobs = [(p, lambda p=p: export_segthor_case(p, a.out, names, a.overwrite)) for p in preds]
    else:
        if a.dicom is None or not a.dicom.is_dir():
            raise ExportError(f"--format chaos-png needs --dicom DIR (got {a.dicom})")
        if is_dicom_dir(a.dicom):
            if len(preds) != 1:
                raise ExportError(
                    f"{a.dicom} is one DICOM series; give one prediction file, not {len(preds)}"
                )
            series = {volume_stem(preds[0]): a.dicom}
        else:
            series = chaos_series(a.dicom)
            if not series:
                raise ExportError(f"{a.dicom}: no CHAOS DICOM series (<id>/DICOM_anon) found")
        for p in preds:
            stem = volume_stem(p)
            cid = next((c for c in (stem, re.sub(r"_\d{4}$", "", stem)) if c in series), None)
            if cid is None:
                print(
                    f"sautomed: failed {p}: no DICOM series for case {stem} under {a.dicom}", file=sys.stderr
                )
                jobs.append((p, lambda: None))
                continue
            jobs.append((p, lambda p=p, s=series[cid]: export_chaos_case(p, s, a.out, names, a.overwrite)))
    failed = 0
    for p, job in jobs:
        try:
            written = job()
        except CASE_ERRORS as exc:  # ExportError is a ValueError
            print(f"sautomed: failed {p}: {naming(exc, p)}", file=sys.stderr)
            failed += 1
            continue
        if written is None:
            failed += 1
        else:
            print(f"wrote {written}", file=sys.stderr)
    print(f"exported {len(jobs) - failed} of {len(jobs)} predictions to {a.out}", file=sys.stderr)
    return 1 if failed else 0
