"""Prediction output: label maps written on the input's exact grid, atomically, one per input.

Shared by every model family: a family's `predict_step` returns `{"labels", "geom", "output", "source"}` or,
for an input that could not be read, `{"error", "source"}`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter

from sautomed.data.io import is_dicom_dir, is_volume_file, volume_stem, write_label_volume
from sautomed.data.layouts.nnunet import CHANNEL
from sautomed.errors import UserError
from sautomed.evaluation.gather import gather_lists
from sautomed.evaluation.postprocess import keep_largest_component
from sautomed.evaluation.probabilities import write_probabilities

log = logging.getLogger(__name__)

IGNORED_NAMES = {".DS_Store", "Thumbs.db", "desktop.ini"}


@dataclass
class PredictPlan:
    """What a predict run will do: (input, output) pairs, and the inputs it leaves alone, with reasons."""

    jobs: list[tuple[Path, Path]] = field(default_factory=list)
    ignored: list[tuple[Path, str]] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)


def output_name(src: Path) -> str:
    """The prediction's file name for input ``src``, as nnU-Net names predictions: ``case_0000.nii.gz`` ->
    ``case.nii.gz`` (the channel suffix always goes), ``case.nrrd`` -> ``case.nrrd``, a DICOM folder ``ser/``
    -> ``ser.nii.gz``."""
    if src.is_dir():
        return f"{src.name}.nii.gz"
    found = _channel_of(src)
    if found is not None and found[1] == 0:
        stem = volume_stem(src)
        return stem[: -len("_0000")] + src.name[len(stem) :]
    return src.name


def _channel_of(src: Path) -> tuple[str, int] | None:
    """(case, k) of an nnU-Net channel file ``case_000k.<ext>``; None for any other name."""
    match = CHANNEL.match(volume_stem(src))
    return None if match is None or src.is_dir() else (match.group(1), int(match.group(2)))


def _multichannel(candidates: list[Path], channels: int, plan: PredictPlan) -> list[Path]:
    """The ``_0000`` files among ``candidates``; the other channel files and the rest go to ``ignored``."""
    kept = []
    for src in candidates:
        found = _channel_of(src)
        if found is not None and found[1] == 0:
            kept.append(src)
        elif found is not None and found[1] < channels:
            plan.ignored.append((src, f"channel {found[1]} of {found[0]}, read with its _0000 file"))
        else:
            plan.ignored.append((src, f"not a case_0000 file of the model's {channels} channels"))
    return kept


def plan_predictions(
    inputs: Path | Sequence[Path], out_dir: Path, overwrite: bool, channels: int = 1
) -> PredictPlan:
    """Turn `--input` (volume files, DICOM series folders or folders of volumes) into output jobs.

    With ``channels`` C > 1 (a model reading several channels) the inputs are nnU-Net channel files: each
    ``case_0000`` file is a job (its ``case_0001`` .. siblings are read with it). A ``case_0000`` input is
    written as ``case.<ext>`` whatever the channel count, as nnU-Net names its predictions.
    Raises FileNotFoundError when an input does not exist, ValueError when an output would replace an input
    (whatever ``overwrite`` says: e.g. ``--output`` is the input folder) or when two inputs would be
    written to the same output.
    """
    out_dir = Path(out_dir)
    inputs = [Path(inputs)] if isinstance(inputs, (str, Path)) else [Path(p) for p in inputs]
    plan = PredictPlan()
    candidates: list[Path] = []
    for inp in inputs:
        if not inp.exists():
            raise FileNotFoundError(f"{inp}: input does not exist")
        if inp.is_file() or is_dicom_dir(inp):
            candidates.append(inp)
            continue
        for p in sorted(inp.iterdir()):
            if p.name in IGNORED_NAMES or p.name.startswith("."):
                plan.ignored.append((p, "hidden or system file"))
            elif p.is_symlink() and not p.exists():
                plan.ignored.append((p, "broken symbolic link"))
            elif p.is_file() and is_volume_file(p):
                candidates.append(p)
            elif p.is_dir() and is_dicom_dir(p):
                candidates.append(p)
            else:
                plan.ignored.append((p, "not an image volume or DICOM series"))
    if channels > 1:
        candidates = _multichannel(candidates, channels, plan)
        if not candidates and len(inputs) == 1 and inputs[0].is_file():
            raise UserError(f"{inputs[0]}: {plan.ignored[-1][1]}")
    claimed: dict[Path, Path] = {}
    for src in candidates:
        dst = out_dir / output_name(src)
        if dst.resolve() == src.resolve():
            raise UserError(
                f"{dst}: the output would replace its own input {src}; choose another --output folder"
            )
        if dst in claimed:
            raise UserError(
                f"{claimed[dst]} and {src} would both be written to {dst}; predict them into separate folders"
            )
        claimed[dst] = src
        if dst.exists() and not overwrite:
            plan.kept.append(dst)
        else:
            plan.jobs.append((src, dst))
    return plan


def prediction_item(
    batch: dict[str, Any],
    segment: Callable[[Any, Any], Any],
    with_probabilities: bool = False,
    keep_largest: Sequence[int] = (),
) -> dict[str, Any]:
    """What every family's `predict_step` hands the writer: the labels of `segment(image, geom)` with the
    batch's geometry, output path and source, or the batch's error (a bad input is reported, not fatal).
    ``with_probabilities`` (predict --save-probabilities): `segment` returns the labels and their (Z, C+1,
    Y, X) class probabilities, from one pass. ``keep_largest`` (predict --keep-largest): the label values
    whose largest 3D component alone is kept (the probabilities stay as the model gave them)."""
    if "error" in batch:
        return {"error": batch["error"], "source": batch["source"]}
    geom = batch["geom"]
    out = segment(batch["image"], geom)
    labels, probabilities = out if with_probabilities else (out, None)
    if keep_largest:
        labels = keep_largest_component(np.asarray(labels), max(keep_largest), keep_largest)
    item = {"labels": labels, "geom": geom, "output": batch["output"], "source": batch["source"]}
    if with_probabilities:
        item["probabilities"] = probabilities
    return item


class VolumeWriter(BasePredictionWriter):
    """Writes each predicted volume as soon as it is ready; records failures instead of stopping."""

    def __init__(self, overwrite: bool = False) -> None:
        super().__init__(write_interval="batch")
        self.overwrite = overwrite
        self.written: list[str] = []
        self.failed: list[tuple[str, str]] = []
        self._last = time.monotonic()  # each case's seconds: from the previous case's end

    def write_on_batch_end(
        self,
        trainer: Any,
        pl_module: Any,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if "error" in prediction:
            self.failed.append((prediction["source"], prediction["error"]))
            return
        try:
            write_label_volume(
                prediction["labels"], prediction["geom"], prediction["output"], overwrite=self.overwrite
            )
            if "probabilities" in prediction:
                write_probabilities(
                    prediction["probabilities"],
                    prediction["geom"],
                    pl_module.class_names,
                    prediction["output"],
                    overwrite=self.overwrite,
                )
        except (OSError, ValueError) as exc:
            self.failed.append((prediction["source"], f"could not write {prediction['output']}: {exc}"))
            return
        self.written.append(prediction["output"])
        now = time.monotonic()
        seconds, self._last = now - self._last, now
        log.info("wrote %s (%.1f s)", prediction["output"], seconds)

    def on_predict_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._last = time.monotonic()

    def on_predict_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self.written, self.failed = gather_lists(self.written, self.failed)
