"""`sautomed evaluate`: score a folder of label maps against a dataset's references, matched by case id.

Scored on the reference grid with the policy and files of `sautomed test`
(:mod:`sautomed.evaluation.metrics`): ``metrics.csv`` and ``summary.json``, plus ``report.html``. A case
without a prediction is scored as an empty prediction (each class present in the reference is *missed*), never
dropped. A prediction on another grid is an error naming the case, or, with ``--resample``, is resampled onto
the reference grid (nearest neighbour) with a note. A case that cannot be scored (unreadable file, other grid,
unknown label values) is reported and left out, listed under ``failed`` in the summary, and the exit code is
1; the other cases are scored.

Prediction values: by class name when the predictions carry a label table (``--labels``, or
``PRED/labels.json`` written by `sautomed predict`), else they are the reference's class indices 1..C (the
layout's class order, which a model trained on that layout predicts).

    sautomed evaluate --pred preds/ --ref /data/Dataset001 --layout nnunet --out eval/
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from sautomed.data.io import (
    Geometry,
    VolumeError,
    grid_mismatches,
    integral_labels,
    is_volume_file,
    read_array,
    read_label_volume,
    to_canonical,
    volume_stem,
)
from sautomed.data.layouts import LAYOUTS, get_layout
from sautomed.errors import UserError
from sautomed.evaluation.metrics import ClassResult, evaluate_case, summarize, write_metrics
from sautomed.evaluation.thumbnails import THUMBNAILS, write_thumbnail
from sautomed.tools.errors import CASE_ERRORS, naming
from sautomed.tools.labels import LABELS_FILE, read_label_names, value_map
from sautomed.tools.report import write_report

REF_LAYOUTS = (*[name for name in LAYOUTS if name != "folder"], "labels")
OUTPUT_FILES = ("metrics.csv", "summary.json", "report.html", THUMBNAILS)


class EvaluateError(UserError):
    """Evaluation cannot start (bad folders, no classes); the message names the file."""


@dataclass(frozen=True)
class Reference:
    """One reference case: its id, where its label lives, and how to read it (labels 0..C, geometry)."""

    case_id: str
    path: Path
    load: Callable[[], tuple[np.ndarray, Geometry]]


@dataclass
class Evaluation:
    rows: list[ClassResult] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # cases without a prediction (scored as empty)
    resampled: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # case -> reason (not scored)
    unmatched: list[str] = field(default_factory=list)  # prediction files without a reference


# ------------------------------------------------------------------------------------------ references


def _labels_folder(root: Path, names: dict[int, str]) -> tuple[tuple[str, ...], list[Reference]]:
    values = sorted(names)
    index = {v: k for k, v in enumerate(values, start=1)}

    def loader(path: Path) -> Callable[[], tuple[np.ndarray, Geometry]]:
        def load() -> tuple[np.ndarray, Geometry]:
            array, geom = read_array(path)
            labels = integral_labels(array, str(path))
            unknown = sorted(set(np.unique(labels).tolist()) - set(values) - {0})
            if unknown:
                raise VolumeError(f"{path}: reference values {unknown[:10]} are not in the label table")
            out = np.zeros(labels.shape, np.uint8)
            for v, k in index.items():
                out[labels == v] = k
            return out, geom

        return load

    refs = [
        Reference(volume_stem(p), p, loader(p))
        for p in sorted(root.iterdir())
        if not p.name.startswith(".") and is_volume_file(p)
    ]
    return tuple(names[v] for v in values), refs


def values_found(root: Path) -> dict[int, str]:
    """Every foreground value of the label maps in ``root``, named ``label_<value>``."""
    values: set[int] = set()
    for p in sorted(root.iterdir()):
        if not p.name.startswith(".") and is_volume_file(p):
            values |= {int(v) for v in np.unique(read_label_volume(p)) if v > 0}
    if not values:
        raise EvaluateError(f"{root}: the reference label maps hold no foreground value")
    return {v: f"label_{v}" for v in sorted(values)}


def references(
    root: Path, layout: str, label_map: Path | None, names: dict[int, str] | None
) -> tuple[tuple[str, ...], list[Reference]]:
    """(class names 1..C, reference cases) of the dataset at ``root``."""
    if layout == "labels":
        if not root.is_dir():
            raise EvaluateError(f"{root}: reference folder does not exist")
        if not names:  # another tool's label maps and no table: the values the references hold, by value
            names = values_found(root)
            print(
                f"note: no label table (--labels JSON, or {LABELS_FILE} in --pred): the values found in the "
                f"references, {sorted(names)}, are scored by value as {', '.join(names.values())}",
                file=sys.stderr,
            )
        return _labels_folder(root, names)
    lay = get_layout(layout, root, label_map)
    refs = []
    for case in lay.cases():
        if case.label is None:
            continue

        def load(case: Any = case) -> tuple[np.ndarray, Geometry]:
            loaded = lay.load(case)
            return loaded.label, loaded.geom

        refs.append(Reference(case.case_id, case.label, load))
    if not refs:
        raise EvaluateError(f"{root}: the {layout} dataset holds no labelled cases")
    return lay.class_names, refs


# ----------------------------------------------------------------------------------------- predictions


def _candidate_ids(stem: str) -> list[str]:
    """Case ids a prediction file name may stand for: as is, without nnU-Net's channel `_0000`, without
    BTCV's `img` / `label` prefix."""
    ids = [stem]
    base = re.sub(r"_\d{4}$", "", stem)
    ids.append(base)
    ids += [re.sub(r"^(img|label)", "", s) for s in (stem, base)]
    return list(dict.fromkeys(ids))


def match_predictions(pred_dir: Path, case_ids: Sequence[str]) -> tuple[dict[str, Path], list[Path]]:
    """Prediction file for each case id (an exact name first), and the files that match no case.

    Two files standing for one case are an EvaluateError naming both.
    """
    files = sorted(p for p in pred_dir.iterdir() if not p.name.startswith(".") and is_volume_file(p))
    wanted = set(case_ids)
    matched: dict[str, Path] = {p_stem: p for p in files if (p_stem := volume_stem(p)) in wanted}
    taken = set(matched.values())
    unmatched = []
    for p in files:
        if p in taken:
            continue
        hit = [i for i in _candidate_ids(volume_stem(p)) if i in wanted]
        if not hit:
            unmatched.append(p)
        elif hit[0] in matched:
            raise EvaluateError(
                f"{pred_dir}: two predictions for case {hit[0]}: {matched[hit[0]].name}, {p.name}"
            )
        else:
            matched[hit[0]] = p
    return matched, unmatched


def reference_image(geom: Geometry) -> sitk.Image:
    """An empty SimpleITK image on a geometry's stored grid (the target of a resampling)."""
    image = sitk.Image([int(v) for v in geom.size], sitk.sitkUInt8)
    image.SetSpacing(geom.spacing)
    image.SetOrigin(geom.origin)
    image.SetDirection(geom.direction)
    return image


def read_prediction(path: Path, ref: Geometry, resample: bool) -> tuple[np.ndarray, bool]:
    """Canonical integer labels of a prediction on the reference grid; (labels, whether resampled).

    VolumeError when it lies on another grid and ``resample`` is False.
    """
    array, geom = read_array(path)
    problems = grid_mismatches(geom, ref)
    if not problems:
        return integral_labels(array, str(path)), False
    if not resample:
        raise VolumeError(
            f"{path}: prediction grid differs from the reference ({'; '.join(problems)}); "
            "pass --resample to resample it (nearest neighbour)"
        )
    try:
        image = sitk.ReadImage(str(path))
        out = sitk.Resample(
            image, reference_image(ref), sitk.Transform(), sitk.sitkNearestNeighbor, 0, image.GetPixelID()
        )
    except RuntimeError as exc:
        raise VolumeError(f"{path}: resampling onto the reference grid failed ({exc})") from exc
    return integral_labels(to_canonical(sitk.GetArrayFromImage(out), ref), str(path)), True


def to_class_indices(
    labels: np.ndarray, mapping: dict[int, int] | None, num_classes: int, name: str
) -> np.ndarray:
    """Prediction values -> reference class indices (``mapping`` by class name, else values as indices)."""
    present = set(np.unique(labels).tolist()) - {0}
    known = set(mapping) if mapping is not None else set(range(1, num_classes + 1))
    unknown = sorted(present - known)
    if unknown:
        raise VolumeError(
            f"{name}: prediction values {unknown[:10]} are not among the known classes "
            f"{sorted(known)} (give a label table with --labels)"
        )
    if mapping is None:
        return labels.astype(np.uint8)
    out = np.zeros(labels.shape, np.uint8)
    for value, index in mapping.items():
        out[labels == value] = index
    return out


# ------------------------------------------------------------------------------------------ evaluation


def evaluate_folder(
    pred_dir: Path,
    class_names: Sequence[str],
    refs: Sequence[Reference],
    mapping: dict[int, int] | None,
    resample: bool = False,
    report: Callable[[str], None] = lambda line: None,
    thumbnails: Path | None = None,
) -> Evaluation:
    """Score every reference case against its prediction in ``pred_dir`` (see the module docstring).

    ``thumbnails``: a folder to write each scored case's reference | prediction thumbnail into (the report's).
    """
    result = Evaluation()
    matched, unmatched = match_predictions(pred_dir, [r.case_id for r in refs])
    result.unmatched = [str(p) for p in unmatched]
    for ref in refs:
        try:
            truth, geom = ref.load()
        except CASE_ERRORS as exc:
            result.failed[ref.case_id] = f"reference unreadable: {naming(exc, ref.path)}"
            report(f"failed {ref.case_id}: {result.failed[ref.case_id]}")
            continue
        path = matched.get(ref.case_id)
        if path is None:
            result.missing.append(ref.case_id)
            report(f"note: {ref.case_id}: no prediction in {pred_dir}; scored as an empty prediction")
            pred = np.zeros(truth.shape, np.uint8)
        else:
            try:
                raw, was_resampled = read_prediction(path, geom, resample)
                pred = to_class_indices(raw, mapping, len(class_names), str(path))
            except CASE_ERRORS as exc:
                result.failed[ref.case_id] = naming(exc, path)
                report(f"failed {ref.case_id}: {result.failed[ref.case_id]}")
                continue
            if was_resampled:
                result.resampled.append(ref.case_id)
                report(f"note: {ref.case_id}: resampled {path} onto the reference grid (nearest neighbour)")
        result.rows += evaluate_case(ref.case_id, pred, truth, geom.spacing_zyx, class_names)
        if thumbnails is not None:
            write_thumbnail(thumbnails, ref.case_id, None, truth, pred)
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sautomed evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--pred", required=True, type=Path, help="folder of predicted label maps")
    p.add_argument("--ref", required=True, type=Path, help="reference dataset root (or folder of label maps)")
    p.add_argument(
        "--layout",
        choices=REF_LAYOUTS,
        default=None,
        help="reference layout; 'labels' = a folder of label maps named by case id "
        "(default: nnunet when --ref holds a dataset.json, else labels)",
    )
    p.add_argument(
        "--labels",
        type=Path,
        default=None,
        help=f"the predictions' label table (default: PRED/{LABELS_FILE})",
    )
    p.add_argument("--label-map", type=Path, default=None, help="label map JSON of the reference layout")
    p.add_argument(
        "--out", type=Path, default=None, help="folder for metrics.csv, summary.json (default PRED)"
    )
    p.add_argument("--resample", action="store_true", help="resample predictions on another grid (nearest)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing metrics.csv / summary.json")
    return p


def evaluate_main(argv: Sequence[str]) -> int:
    a = build_parser().parse_args(argv)
    if not a.pred.is_dir():
        raise EvaluateError(f"{a.pred}: prediction folder does not exist")
    out = a.out or a.pred
    existing = [out / name for name in OUTPUT_FILES if (out / name).exists()]
    if existing and not a.overwrite:
        raise EvaluateError(f"{existing[0]}: exists; choose another --out or pass --overwrite")
    table = a.labels or (a.pred / LABELS_FILE if (a.pred / LABELS_FILE).is_file() else None)
    names = read_label_names(table) if table else None
    layout = a.layout or ("nnunet" if (a.ref / "dataset.json").is_file() else "labels")
    class_names, refs = references(a.ref, layout, a.label_map, names)
    mapping = None
    if names is not None and layout != "labels":
        extra = sorted(n for n in names.values() if n not in class_names)
        if extra:  # the reference does not annotate them: they cannot be scored
            print(
                f"note: predicted classes {extra} are not in the reference; scored as background",
                file=sys.stderr,
            )
        known = {v: n for v, n in names.items() if n in class_names}
        mapping = value_map(known, {n: i for i, n in enumerate(class_names, 1)}, str(table))
        mapping.update({v: 0 for v, n in names.items() if n not in class_names})
    elif names is not None:
        mapping = {v: k for k, v in enumerate(sorted(names), start=1)}

    result = evaluate_folder(
        a.pred,
        class_names,
        refs,
        mapping,
        a.resample,
        report=lambda line: print(line, file=sys.stderr),
        thumbnails=out,
    )
    for path in result.unmatched:
        print(f"note: {path}: no reference case of that name; not scored", file=sys.stderr)
    summary = summarize(result.rows, class_names)
    summary.update(
        predictions=str(a.pred.resolve()),
        reference=str(a.ref.resolve()),
        layout=layout,
        label_table=str(table) if table else None,
        missing_predictions=result.missing,
        resampled=result.resampled,
        failed=result.failed,
        unmatched_predictions=result.unmatched,
    )
    write_metrics(result.rows, summary, out)
    if result.rows:
        write_report(out)
    mean = summary["mean_dsc"]
    print(
        f"evaluate: mean DSC {mean:.4f}, mean HD95 {summary['mean_hd95_mm']:.2f} mm over "
        f"{summary['num_cases']} cases ({len(result.missing)} without prediction, {len(result.failed)} "
        f"failed) -> {out}",
        file=sys.stderr,
    )
    return 1 if result.failed else 0
