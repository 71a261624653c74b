"""What every family's LightningModule shares once it has label maps: one base class.

A family subclasses :class:`SegmentationModule` and supplies its network, its training step and four small
pieces: ``family_config()`` (the config its checkpoints carry), ``segment_case(image, geom)`` (a case's label
map on the original grid), ``data_class_names(dm)`` (the class names the data module gives it, with its own
checks) and ``check_loaded_config(cfg)`` (a checkpoint of its family and network). The base does the rest,
the same way for all:

* validate / test: each case segmented and scored (``metrics.evaluate_case``), its seconds and thumbnail
  recorded; at the epoch's end the rows of every rank gathered (each case once), summarised, logged as
  ``val/mean_dsc`` (the checkpoint monitor), and in ``validate`` / ``test`` written as ``metrics.csv`` and
  ``summary.json`` with the checkpoint's provenance (which of the evaluated cases it trained on);
* predict: ``prediction_item`` for the writer (a bad input is reported, not fatal);
* checkpoints: the family's config and the fit's cases saved with the weights; on loading, the class names
  and preprocessing the weights were trained with are kept, and data prepared otherwise (another
  normalisation, window, image size, class order) is refused in one line that names the difference.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from sautomed.data.splits import FitRecord, fit_record, fit_split_record, split_provenance
from sautomed.evaluation.gather import gather_lists
from sautomed.evaluation.metrics import ClassResult, evaluate_case, gather_rows, summarize, write_metrics
from sautomed.evaluation.postprocess import class_probabilities, keep_largest_component
from sautomed.evaluation.thumbnails import write_run_thumbnail
from sautomed.evaluation.tta import tta_probabilities
from sautomed.run_folder import UserError
from sautomed.schedule import ScheduleHooks
from sautomed.writers import prediction_item

log = logging.getLogger(__name__)


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively: a YAML config and a checkpoint record a pair differently."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _relevant(pre: dict[str, Any]) -> dict[str, Any]:
    """The preprocessing settings that change the network's input (a CT window means nothing for MR)."""
    pre = _plain(dict(pre))
    if pre.get("normalization") == "percentile":
        pre.pop("window", None)
        pre.setdefault("percentile_region", "volume")  # a checkpoint made before the setting existed
    elif pre.get("normalization") == "ct":
        pre.pop("percentiles", None)
        pre.pop("percentile_region", None)
    return pre


def input_mismatch(
    trained_names: Sequence[str],
    trained_pre: dict[str, Any] | None,
    names: Sequence[str],
    pre: dict[str, Any],
    this: str = "the data",
    that: str = "the checkpoint",
) -> str | None:
    """One line naming how ``this`` (classes ``names``, preprocessing ``pre``) differs from what ``that``'s
    weights were trained on; None when it does not."""
    if tuple(trained_names) != tuple(names):
        ours, theirs = ", ".join(names), ", ".join(trained_names)
        return f"{this}'s classes ({ours}) are not {that}'s ({theirs}) in name and order"
    if trained_pre is None:  # a checkpoint that did not record its preprocessing: nothing to compare
        return None
    theirs, ours = _relevant(trained_pre), _relevant(pre)
    diff = [k for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)]
    if not diff:
        return None
    said = ", ".join(f"{k} {ours.get(k)} ({that}: {theirs.get(k)})" for k in diff)
    return f"{this}'s preprocessing differs from {that}'s: {said}"


def class_names_of(dm: Any, num_classes: int, setting: str) -> tuple[str, ...]:
    """The data module's class names; a UserError when their count is not the model's ``setting``."""
    names = tuple(dm.class_names)
    if len(names) != num_classes:
        raise UserError(
            f"the data has {len(names)} classes ({', '.join(names)}) but {setting} is {num_classes}"
        )
    return names


def first_channel(image: Any) -> Any:
    """(C, Z, S, S) -> (Z, S, S) for a thumbnail; a (Z, S, S) volume as it is."""
    return image[0] if getattr(image, "ndim", 3) == 4 else image


class SegmentationModule(ScheduleHooks, L.LightningModule):
    """The shared evaluation, prediction and checkpoint provenance of every model family (module docstring).

    Subclasses set ``class_names`` and implement ``family_config``, ``segment_case``, ``data_class_names``
    and ``check_loaded_config`` (and ``volume_scores`` for ensembles and TTA); ``evaluate_extra``,
    ``extra_results``, ``monitored_dsc`` and ``summary_line`` let a family add its own evaluation (M-SAM's
    oracle clicks).
    """

    def __init__(self) -> None:
        super().__init__()
        self.class_names: tuple[str, ...] = ()
        self.preprocessing: dict[str, Any] | None = None
        self.fit_split: FitRecord | None = None  # the loaded checkpoint's fit cases (data.splits)
        self._trained_with: tuple[tuple[str, ...], dict[str, Any] | None] | None = None
        self._rows: list[ClassResult] = []
        self._seconds: list[float] = []
        self.last_summary: dict[str, Any] = {}
        self.tta = False  # test-time augmentation (predict --tta; evaluation/tta.py)
        self.save_probabilities = False  # predict --save-probabilities (evaluation/probabilities.py)
        self.keep_largest: tuple[int, ...] = ()  # predict --keep-largest: classes post-processed after all

    # -- what a family supplies ----------------------------------------------------------------------------
    def family_config(self) -> dict[str, Any]:
        """The config the family's checkpoints carry (``checkpoint["sautomed"]``), with ``family``."""
        raise NotImplementedError

    def segment_case(self, image: Any, geom: Any) -> np.ndarray:
        """A preprocessed case -> its (Z, Y, X) uint8 label map on the original grid (``geom.shape_zyx``)."""
        raise NotImplementedError

    def data_class_names(self, dm: Any) -> tuple[str, ...]:
        """The class names the model takes from the data module; raise on data it cannot train or score."""
        raise NotImplementedError

    def volume_scores(self, image: Any) -> tuple[Any, bool]:
        """A preprocessed case -> its (Z, C+1, h, w) class scores at the network's grid, and whether they are
        probabilities already (else logits): what ``case_probabilities`` (ensembles) reads."""
        raise NotImplementedError

    def case_probabilities(self, image: Any, geom: Any) -> Any:
        """(Z, C+1, Y, X) class probabilities on the original grid (``evaluation.ensemble``)."""
        scores, are_probabilities = self.volume_scores(image)
        return class_probabilities(scores, tuple(geom.shape_zyx[1:]), are_probabilities)

    def check_loaded_config(self, cfg: dict[str, Any] | None) -> None:
        """Refuse (before any weight is loaded) a checkpoint of another family or network."""
        raise NotImplementedError

    def reference(self, batch: dict[str, Any]) -> np.ndarray:
        """The (Z, Y, X) reference the predictions are scored against (the label map; M-SAM: binary)."""
        return batch["label"].cpu().numpy()

    @property
    def scores_automatic(self) -> bool:
        """Whether validate / test segment each case as predict does (M-SAM may evaluate clicks alone)."""
        return True

    def evaluate_extra(self, batch: dict[str, Any], ref: np.ndarray) -> None:
        """A family's own per-case evaluation beside the automatic one (none by default)."""

    def reset_extra(self) -> None:
        """Forget what ``evaluate_extra`` collected (a new evaluation epoch)."""

    def extra_results(self, prefix: str) -> tuple[list[ClassResult], dict[str, Any]]:
        """After every rank's cases are in: the family's extra metrics.csv rows and summary.json keys."""
        return [], {}

    def monitored_dsc(self, summary: dict[str, Any]) -> float:
        """The value logged as ``<prefix>/mean_dsc``: the checkpoint monitor."""
        return summary["mean_dsc"]

    def summary_line(self, prefix: str, summary: dict[str, Any]) -> str:
        return (
            f"{prefix}: mean DSC {summary['mean_dsc']:.4f}, mean HD95 {summary['mean_hd95_mm']:.2f} mm "
            f"over {summary['num_cases']} cases -> {self.trainer.default_root_dir}"
        )

    # -- the data module ----------------------------------------------------------------------------------
    def _datamodule(self) -> Any:
        return getattr(self.trainer, "datamodule", None) if self._trainer is not None else None

    def _sync_from_datamodule(self) -> None:
        """Take the class names and preprocessing from the data, refusing data unlike the checkpoint's."""
        dm = self._datamodule()
        if dm is None or not hasattr(dm, "preprocessing"):
            return
        names = tuple(self.data_class_names(dm))
        pre = asdict(dm.preprocessing)
        if self._trained_with is not None:
            problem = input_mismatch(*self._trained_with, names, pre)
            if problem is not None:
                raise UserError(f"{problem}: evaluate with the fit's data.preprocessing and classes")
        self.class_names, self.preprocessing = names, pre

    def setup(self, stage: str) -> None:
        if stage == "fit":  # before the optimiser is configured: a data mismatch stops the run at once
            self._sync_from_datamodule()

    # -- validate / test ---------------------------------------------------------------------------------
    def _evaluate(self, batch: dict[str, Any]) -> None:
        if batch["label"] is None:
            raise UserError(f"case {batch['case_id']} has no label: it cannot be evaluated")
        ref = self.reference(batch)
        self.evaluate_extra(batch, ref)
        if not self.scores_automatic:
            return
        start = time.perf_counter()
        pred = self.segment(batch["image"], batch["geom"])
        self._seconds.append(time.perf_counter() - start)
        case = batch["case_id"]
        self._rows.extend(evaluate_case(case, pred, ref, batch["geom"].spacing_zyx, self.class_names))
        write_run_thumbnail(self._trainer, case, first_channel(batch["image"]), ref, pred)

    def on_validation_epoch_start(self) -> None:
        self._sync_from_datamodule()
        self._rows, self._seconds = [], []
        self.reset_extra()

    on_test_epoch_start = on_validation_epoch_start

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch)

    def _finish_evaluation(self, prefix: str) -> None:
        rows, (seconds,) = gather_rows(self._rows), gather_lists(self._seconds)
        self._rows, self._seconds = [], []
        extra_rows, extra_summary = self.extra_results(prefix)
        summary = summarize(rows, self.class_names)
        summary["predict_seconds_per_case"] = float(np.mean(seconds)) if seconds else None
        summary.update(extra_summary)
        monitored = self.monitored_dsc(summary)
        value = 0.0 if monitored is None or math.isnan(monitored) else monitored
        self.log(f"{prefix}/mean_dsc", value, sync_dist=False, rank_zero_only=False)
        if self.trainer.state.fn in ("validate", "test") and self.trainer.is_global_zero:
            ckpt = self.trainer.ckpt_path
            summary["checkpoint"] = str(ckpt) if ckpt else None
            dm = self._datamodule()
            stage = "val" if self.trainer.state.fn == "validate" else "test"
            evaluated = dm.case_fingerprints(stage) if hasattr(dm, "case_fingerprints") else {}
            summary.update(split_provenance(self.fit_split if ckpt else None, evaluated, ckpt))
            if summary["overlaps_training"]:
                cases = summary["overlaps_training"]
                log.warning(
                    "%s: %d of the evaluated cases are training cases of the checkpoint (%s): not held-out "
                    "scores",
                    prefix,
                    len(cases),
                    ", ".join(cases),
                )
            summary["config"] = self.family_config()
            write_metrics(rows + extra_rows, summary, Path(self.trainer.default_root_dir))
            self.print(self.summary_line(prefix, summary))
        elif self.trainer.is_global_zero and not self.trainer.sanity_checking:
            log.info(
                "epoch %d: validation mean DSC %.4f over %d cases", self.current_epoch, value, len(seconds)
            )
        self.last_summary = summary

    def on_validation_epoch_end(self) -> None:
        self._finish_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._finish_evaluation("test")

    # -- predict -------------------------------------------------------------------------------------------
    @property
    def supports_tta(self) -> bool:
        """Whether the family gives ``volume_scores`` (the slice-based ones), which TTA needs."""
        return type(self).volume_scores is not SegmentationModule.volume_scores

    def segment(self, image: Any, geom: Any) -> np.ndarray:
        """``segment_case``, or with ``tta`` the argmax of the augmented probabilities (and the family's
        largest-component step when its inference settings ask for it)."""
        if not self.tta:
            return self.segment_case(image, geom)
        return self.labels_of(tta_probabilities(self, image, geom))

    def labels_of(self, probabilities: Any) -> np.ndarray:
        """(Z, C+1, Y, X) class probabilities -> the (Z, Y, X) uint8 labels ``segment_case`` would write: the
        argmax, and the family's largest-component step when its inference settings ask for it."""
        labels = probabilities.argmax(1).to(torch.uint8).cpu().numpy()
        if getattr(getattr(self, "inference", None), "largest_component", False):
            labels = keep_largest_component(labels, len(self.class_names))
        return labels

    def probabilities(self, image: Any, geom: Any) -> Any:
        """The (Z, C+1, Y, X) class probabilities ``predict --save-probabilities`` writes (with ``tta``, the
        augmented ones): what ensembles average."""
        return tta_probabilities(self, image, geom) if self.tta else self.case_probabilities(image, geom)

    def segment_with_probabilities(self, image: Any, geom: Any) -> tuple[np.ndarray, Any]:
        """The labels and the class probabilities of one pass (``predict --save-probabilities``): the labels
        are ``labels_of`` the probabilities, which is what ``segment`` computes from the same scores."""
        probabilities = self.probabilities(image, geom)
        return self.labels_of(probabilities), probabilities

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        if self.save_probabilities:
            return prediction_item(batch, self.segment_with_probabilities, True, self.keep_largest)
        return prediction_item(batch, self.segment, False, self.keep_largest)

    # -- the checkpoint carries its config and its fit -----------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["sautomed"] = self.family_config()
        split = fit_split_record(self._datamodule(), self._trainer)  # evaluations name training cases
        if split is not None:
            checkpoint["sautomed"]["split"] = split

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        cfg = checkpoint.get("sautomed")
        self.check_loaded_config(cfg)
        self.adopt_checkpoint_config(cfg)
        self.fit_split = fit_record(checkpoint)

    def adopt_checkpoint_config(self, cfg: dict[str, Any]) -> None:
        """The class names and preprocessing the checkpoint's weights were trained with."""
        self.class_names = tuple(cfg["class_names"])
        pre = cfg.get("preprocessing")
        self.preprocessing = dict(pre) if pre else None
        self._trained_with = (self.class_names, self.preprocessing)
