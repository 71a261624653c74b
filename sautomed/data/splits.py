"""Seeded k-fold cross-validation splits and ``splits.json`` (nnU-Net style: a list of {"train", "val"}).

A user's ``splits.json`` (``data.splits_file``) wins, and its train and val lists of a fold must not share a
case; otherwise the split is computed from the sorted case ids with a seeded shuffle, cut into ``folds``
parts, and written to ``run_dir/splits.json`` atomically. A ``run_dir/splits.json`` already there (a resumed
run, validate) must be the split the config's ``folds`` and ``split_seed`` make, or it is an error naming
the difference. With fewer cases than folds, ``min(folds, n)`` folds are made (with a
warning); a single case gives one fold where it is both the training and the validation case.
"""

from __future__ import annotations

import json
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sautomed.errors import UserError

from .io import atomic_write

SPLITS_FILE = "splits.json"


def kfold_split(case_ids: Sequence[str], folds: int = 5, seed: int = 0) -> list[dict[str, list[str]]]:
    """``min(folds, n)`` folds of {"train": [...], "val": [...]} (each list sorted); every id is val once."""
    ids = sorted(set(case_ids))
    if len(ids) != len(case_ids):
        raise UserError("duplicate case ids in split input")
    if not ids:
        raise UserError("cannot split an empty list of cases")
    if folds < 1:
        raise UserError(f"folds must be >= 1, got {folds}")
    if len(ids) == 1:
        return [{"train": list(ids), "val": list(ids)}]
    k = min(folds, len(ids))
    if k < folds:
        warnings.warn(
            f"{len(ids)} cases for {folds} folds: making {k} folds of one validation case each", stacklevel=2
        )
    if k == 1:  # folds=1: everything trains, everything validates
        return [{"train": list(ids), "val": list(ids)}]
    order = list(ids)
    random.Random(seed).shuffle(order)
    parts = [order[i::k] for i in range(k)]
    return [{"train": sorted(set(ids) - set(part)), "val": sorted(part)} for part in parts]


def read_splits(path: Path, case_ids: Sequence[str] | None = None) -> list[dict[str, list[str]]]:
    """Read and validate a splits.json; ids not among ``case_ids`` (when given) are an error."""
    try:
        splits = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable splits file ({e})") from e
    if (
        not isinstance(splits, list)
        or not splits
        or not all(
            isinstance(s, dict) and isinstance(s.get("train"), list) and isinstance(s.get("val"), list)
            for s in splits
        )
    ):
        raise UserError(f"{path}: a splits file is a non-empty list of {{'train': [...], 'val': [...]}}")
    if case_ids is not None:
        known = set(case_ids)
        unknown = sorted({i for s in splits for i in s["train"] + s["val"]} - known)
        if unknown:
            raise UserError(f"{path}: case ids not in the dataset: {unknown[:10]}")
    return [{"train": [str(i) for i in s["train"]], "val": [str(i) for i in s["val"]]} for s in splits]


def check_disjoint(splits: list[dict[str, list[str]]], path: Path) -> None:
    """ValueError naming the fold and the cases that are both training and validation cases."""
    for k, s in enumerate(splits):
        both = sorted(set(s["train"]) & set(s["val"]))
        if both:
            raise UserError(
                f"{path}: fold {k} has {len(both)} case(s) in both train and val: {', '.join(both[:10])}"
            )


def check_matches_config(
    splits: list[dict[str, list[str]]], path: Path, case_ids: Sequence[str], folds: int, seed: int
) -> None:
    """ValueError naming the difference when ``splits`` is not ``kfold_split(case_ids, folds, seed)``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the few-cases warning was given when the split was made
        expected = kfold_split(case_ids, folds, seed)
    hint = "use another --trainer.default_root_dir, or pass the file as data.splits_file to keep it"
    if len(splits) != len(expected):
        raise UserError(
            f"{path} has {len(splits)} folds but data.folds={folds} makes {len(expected)} over the "
            f"{len(case_ids)} cases: {hint}"
        )
    for k, (mine, theirs) in enumerate(zip(splits, expected)):
        if sorted(mine["val"]) != theirs["val"] or sorted(mine["train"]) != theirs["train"]:
            extra = sorted(set(mine["val"]) - set(theirs["val"]))[:5]
            missing = sorted(set(theirs["val"]) - set(mine["val"]))[:5]
            raise UserError(
                f"{path} is not the split of data.folds={folds}, data.split_seed={seed} over the "
                f"{len(case_ids)} cases of the dataset: fold {k} validates {extra} instead of {missing} "
                f"(another split_seed, or other cases); {hint}"
            )


def write_splits(splits: list[dict[str, list[str]]], path: Path) -> Path:
    """Write splits as JSON, atomically."""
    text = json.dumps(splits, indent=2) + "\n"
    return atomic_write(Path(path), lambda tmp: tmp.write_text(text))


def resolve_split(
    case_ids: Sequence[str],
    run_dir: Path | None,
    fold: int,
    folds: int = 5,
    seed: int = 0,
    user_file: Path | None = None,
) -> tuple[list[str], list[str]]:
    """(train ids, val ids) of ``fold``: from ``user_file``, else ``run_dir/splits.json``, else computed.

    A computed or user-given split is written to ``run_dir/splits.json``; ``run_dir`` None (a data module
    used without a trainer) reads and writes no run folder. ``ValueError`` when ``fold`` is
    out of range, when a user's fold trains on a validation case, or when the run folder's split is not the
    one ``folds`` and ``seed`` make.
    """
    existing = None if run_dir is None else Path(run_dir) / SPLITS_FILE
    if user_file is not None:
        splits = read_splits(Path(user_file), case_ids)
        check_disjoint(splits, Path(user_file))
        if existing is not None and Path(user_file).resolve() != existing.resolve():
            write_splits(splits, existing)  # the run folder records the split it used
    elif existing is not None and existing.is_file():
        splits = read_splits(existing, case_ids)
        check_matches_config(splits, existing, case_ids, folds, seed)
    else:
        splits = kfold_split(case_ids, folds, seed)
        if existing is not None:
            write_splits(splits, existing)
    if not 0 <= fold < len(splits):
        raise UserError(f"fold {fold} out of range: the split has {len(splits)} folds (0..{len(splits) - 1})")
    return list(splits[fold]["train"]), list(splits[fold]["val"])


def fit_validates(trainer: Any) -> bool:
    """Whether a Lightning trainer's fit validates at all: a validation loop and data, and an interval
    (``check_val_every_n_epoch``) that ``max_epochs`` reaches. A fit that never validates chooses no
    checkpoint (chaos_mr_litemedsam: every case trains, last.ckpt is the model)."""
    every, max_epochs = getattr(trainer, "check_val_every_n_epoch", 1), getattr(trainer, "max_epochs", None)
    reached = every is None or max_epochs is None or max_epochs < 0 or every <= max_epochs
    return bool(getattr(trainer, "enable_validation", True)) and reached


def fit_split_record(datamodule: Any, trainer: Any) -> dict[str, Any] | None:
    """What a family writes under ``checkpoint["sautomed"]["split"]`` during a fit: ``{case id: image
    hash}`` of its "train" and "val" cases and "validates" (``fit_validates``); None when the datamodule
    cannot name its cases."""
    if not hasattr(datamodule, "case_fingerprints"):
        return None
    record: dict[str, Any] = {k: datamodule.case_fingerprints(k) for k in ("train", "val")}
    record["validates"] = fit_validates(trainer)
    return record


@dataclass(frozen=True)
class FitRecord:
    """A checkpoint's record of its fit: ``{case id: image hash}`` of its training and validation cases;
    whether the fit validated on them (so chose a best checkpoint by them; True for checkpoints written
    before this was recorded); and the file that Lightning's monitored ModelCheckpoint had saved as best when
    this checkpoint was written (None before the first validation: ``last.ckpt`` is saved before the last
    epoch's validation, so its copy may lag by an epoch)."""

    train: dict[str, str]
    val: dict[str, str]
    validates: bool = True
    best_path: str | None = None


def fit_record(checkpoint: dict[str, Any]) -> FitRecord | None:
    """The ``FitRecord`` of a loaded checkpoint: what the family wrote under
    ``checkpoint["sautomed"]["split"]`` (``fit_split_record``) and the monitored ModelCheckpoint's best
    path from the callback states. None when the checkpoint has no record."""
    split = (checkpoint.get("sautomed") or {}).get("split")
    if split is None:
        return None
    best_path = None
    for state in (checkpoint.get("callbacks") or {}).values():
        # an unmonitored ModelCheckpoint (last.ckpt) calls its last file its best: only a monitored one chose
        monitored = isinstance(state, dict) and state.get("monitor")
        if monitored and state.get("best_model_path"):
            best_path = str(state["best_model_path"])
    train, val = dict(split.get("train", {})), dict(split.get("val", {}))
    return FitRecord(train, val, bool(split.get("validates", True)), best_path)


def split_provenance(
    fit: FitRecord | None, evaluated: dict[str, str], checkpoint: str | None = None
) -> dict[str, list[str] | None]:
    """What an evaluation's summary says about the checkpoint's fit; cases are matched by image content.

    Args:
        fit: the checkpoint's record of its fit (``fit_record``), or None (a checkpoint without one, or no
            checkpoint).
        evaluated: ``{case id: image hash}`` of the cases evaluated now.
        checkpoint: the path of the checkpoint evaluated.

    Returns ``best_ckpt_chosen_on`` (the fit's validation cases, which chose its best checkpoint by
    validation mean DSC; None when the fit never validated, so chose nothing),
    ``checkpoint_chosen_on`` (those cases if the evaluated file is that best checkpoint, matched by file
    name; ``[]`` for any other, e.g. ``last.ckpt``, which no validation chose) and ``overlaps_training``
    (the evaluated cases that the checkpoint was trained on); all None when the fit is unknown.
    """
    if fit is None:
        return {"best_ckpt_chosen_on": None, "checkpoint_chosen_on": None, "overlaps_training": None}
    trained = set(fit.train.values())
    val = sorted(fit.val)
    chosen = bool(fit.best_path and checkpoint and Path(fit.best_path).name == Path(checkpoint).name)
    return {
        "best_ckpt_chosen_on": val if fit.validates else None,
        "checkpoint_chosen_on": val if chosen else [],
        "overlaps_training": sorted(case for case, digest in evaluated.items() if digest in trained),
    }
