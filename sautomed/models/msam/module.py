"""The M-SAM LightningModule: wires the network, the click refinement, the loss and the automatic mode.

Training step (batches of ``MSAMDataModule``'s crops: ``image``, ``label`` (B, 1, S^3)): the crops are
encoded once and refined for ``refinement.iterations`` iterations with simulated clicks (clicks.py); the loss
is Dice + BCE over the iterations (loss.py).

Validation / test (the shared volume batches: ``image`` (Z, S, S), ``label`` (Z, Y, X), ``geom``,
``case_id``), per case:

* **oracle-prompted** (the paper's protocol, needs the ground truth): one S^3 crop centred on the lesion's
  bounding box, clicks from the error region; DSC inside the crop after 1, 3, 5 and 10 clicks, logged as
  ``val/oracle_dsc@k``;
* **automatic** (what ``predict`` does): ``automatic.segment_automatic`` on the whole volume, scored with the
  shared metrics on the original grid (``val/mean_dsc``, per-case CSV and summary JSON in validate / test).

The oracle-prompted evaluation, its metrics.csv rows and summary.json keys, and the report validate / test
write to the run folder are in evaluation.py; the optimiser's parameter groups in optim.py.

The target is binary: labels in ``foreground_labels`` (None: all labels > 0, the whole tumour); predictions
are written as label 1 (``lesion``). The checkpoint carries the whole config (``checkpoint["sautomed"]``,
family ``msam``), so :meth:`MSAMModule.from_checkpoint_dict` rebuilds the module from it alone.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from sautomed.evaluation.base import SegmentationModule
from sautomed.evaluation.metrics import ClassResult
from sautomed.guards import weights_from_elsewhere
from sautomed.models.msam.automatic import AutoSettings, segment_automatic
from sautomed.models.msam.clicks import ClickMode
from sautomed.models.msam.consistency import Consistency
from sautomed.models.msam.corrupt import corrupt_masks
from sautomed.models.msam.cutout import cut_out_lesion
from sautomed.models.msam.evaluation import (
    CLASS_NAMES,
    MODES,
    EvaluationSettings,
    OracleCase,
    gather_oracle,
    oracle_class_name,
    oracle_dsc,
    oracle_results,
    reference_on_image_grid,
    summary_line,
)
from sautomed.models.msam.loss import LossSettings, refinement_loss
from sautomed.models.msam.network import MSAMConfig, MSAMNet
from sautomed.models.msam.optim import build_optimizer, warn_of_a_slow_decoder
from sautomed.models.msam.patches import binary_target
from sautomed.models.msam.refinement import RefinementSettings, refine_with_clicks
from sautomed.models.msam.session import ClickSession, ClicksFile
from sautomed.run_folder import UserError, check_checkpoint_config
from sautomed.schedule import Schedule, ScheduleBy, check_schedule
from sautomed.writers import prediction_item

__all__ = [
    "CLASS_NAMES",
    "FAMILY",
    "MODES",
    "CheckpointFamilyError",
    "EvaluationSettings",
    "MSAMModule",
    "RefinementSettings",
    "oracle_class_name",
]


FAMILY = "msam"
# network settings a checkpoint may differ in from the loading config: they concern the initial weights only
_NON_STRUCTURAL = {"sam_med3d_checkpoint", "encoder_finetune"}


class CheckpointFamilyError(UserError):
    """A checkpoint of another model family (or not a sautomed checkpoint)."""


class MSAMModule(SegmentationModule):
    """M-SAM training and evaluation.

    Args:
        network: the network's settings (variant, crop size, fusion switch, LoRA, SAM-Med3D checkpoint).
        refinement: click refinement in training.
        loss: loss weights, and whether the loss takes all iterations or the last.
        evaluation: oracle / automatic evaluation settings.
        automatic: the automatic mode (sliding windows, self-prompting).
        foreground_labels: labels forming the binary target (None: all > 0).
        lr: AdamW learning rate of the adapter and the encoder's LoRA (8e-4 in the public code).
        decoder_lr_scale: factor on ``lr`` for the prompt encoder and mask decoder (0.1 in the public code).
        weight_decay: AdamW weight decay (0.1 in the public code).
        scheduler: ``none``; ``cosine`` to zero over the run's steps (or its clock: ``schedule_by``); or
            ``multistep``: the learning rates times ``gamma`` at each epoch in ``milestones`` (the public
            code: epochs 120 and 180, gamma 0.1).
        milestones: epochs at which ``multistep`` lowers the learning rates.
        gamma: ``multistep``'s factor at each milestone.
        schedule_by: ``steps`` (``cosine`` spans max_epochs / max_steps; repeats exactly for a seed) or
            ``clock`` (it spans the ``trainer.max_time`` guard less ``schedule_margin_s`` when that comes
            first, and the run stops at its end: a budgeted run ends its schedule on any machine; ``cosine``
            only; ``sautomed/schedule.py``).
        schedule_margin_s: seconds of max_time kept for the last validation and checkpoint (clock only).
        schedule_min_steps: the optimiser steps the config's figures were measured with: a run whose clock
            ends sooner warns that it trained less (a slower machine); 0: none; clock only (schedule.py).
    """

    def __init__(
        self,
        network: MSAMConfig = MSAMConfig(),  # noqa: B008
        refinement: RefinementSettings = RefinementSettings(),  # noqa: B008
        loss: LossSettings = LossSettings(),  # noqa: B008
        evaluation: EvaluationSettings = EvaluationSettings(),  # noqa: B008
        automatic: AutoSettings = AutoSettings(),  # noqa: B008
        foreground_labels: list[int] | None = None,
        lr: float = 8e-4,
        decoder_lr_scale: float = 0.1,
        weight_decay: float = 0.1,
        scheduler: Literal["none", "cosine", "multistep"] = "none",
        milestones: tuple[int, ...] = (120, 180),
        gamma: float = 0.1,
        schedule_by: ScheduleBy = "steps",
        schedule_margin_s: float = 60.0,
        schedule_min_steps: int = 0,
    ) -> None:
        super().__init__()
        self.network_cfg, self.refinement, self.loss_settings = network, refinement, loss
        self.evaluation, self.automatic = evaluation, automatic
        self.foreground_labels = None if foreground_labels is None else list(foreground_labels)
        self.lr, self.decoder_lr_scale, self.weight_decay, self.scheduler = (
            lr,
            decoder_lr_scale,
            weight_decay,
            scheduler,
        )
        check_schedule(scheduler, schedule_by, schedule_min_steps)
        self.milestones, self.gamma = tuple(int(m) for m in milestones), gamma
        self.schedule_by, self.schedule_margin_s, self.schedule_min_steps = (
            schedule_by,
            schedule_margin_s,
            schedule_min_steps,
        )
        self.schedule: Schedule | None = None
        self.net = MSAMNet(network)
        self.class_names = CLASS_NAMES
        self._oracle: list[OracleCase] = []  # (case, DSC after 1, 2, ... clicks)
        self.user_clicks: ClicksFile | None = None  # predict --clicks: each case's clicks (session.py)

    @property
    def input_channels(self) -> int:
        """Input channels the network reads (``predict`` reads a case's ``_0000`` .. files if more than 1)."""
        return self.network_cfg.in_channels

    @property
    def inference(self) -> AutoSettings:
        """How ``predict`` segments volumes: the automatic mode's settings (its flags replace fields)."""
        return self.automatic

    @inference.setter
    def inference(self, settings: AutoSettings) -> None:
        self.automatic = settings

    # -- construction from a checkpoint ----------------------------------------------------------------
    @classmethod
    def from_checkpoint_dict(cls, ckpt: dict[str, Any]) -> MSAMModule:
        """Rebuild the module from an M-SAM checkpoint alone (its config travels inside)."""
        cfg = ckpt.get("sautomed") or {}
        if cfg.get("family") != FAMILY:
            raise CheckpointFamilyError(f"checkpoint of model family {cfg.get('family')!r}, expected 'msam'")
        try:
            evaluation = dict(cfg["evaluation"])
            evaluation["oracle_clicks"] = tuple(evaluation["oracle_clicks"])
            with weights_from_elsewhere():  # the checkpoint's own weights replace the initial ones
                module = cls(
                    network=MSAMConfig(**{**cfg["network"], "sam_med3d_checkpoint": None}),
                    refinement=RefinementSettings(**cfg["refinement"]),
                    loss=LossSettings(**cfg["loss"]),
                    evaluation=EvaluationSettings(**evaluation),
                    automatic=AutoSettings(**cfg["automatic"]),
                    foreground_labels=cfg["foreground_labels"],
                )
        except (KeyError, TypeError) as exc:  # a checkpoint that says msam but lacks or misnames settings
            raise CheckpointFamilyError(f"an incomplete or unknown msam checkpoint config ({exc})") from exc
        module.load_state_dict(ckpt["state_dict"])
        module.adopt_checkpoint_config(cfg)
        return module

    def family_config(self) -> dict[str, Any]:
        return {
            "family": FAMILY,
            "network": asdict(self.network_cfg),
            "refinement": asdict(self.refinement),
            "loss": asdict(self.loss_settings),
            "evaluation": asdict(self.evaluation),
            "automatic": asdict(self.automatic),
            "foreground_labels": self.foreground_labels,
            "class_names": list(self.class_names),
            "preprocessing": self.preprocessing,
        }

    def check_loaded_config(self, cfg: dict[str, Any] | None) -> None:
        """Refuse (one line, before any weight is loaded) a checkpoint of another family or network."""
        check_checkpoint_config(cfg, FAMILY, asdict(self.network_cfg), _NON_STRUCTURAL, asdict(MSAMConfig()))

    def data_class_names(self, dm: Any) -> tuple[str, ...]:
        """M-SAM's one class (``lesion``: the labels in ``foreground_labels``), after checking the data."""
        channels = getattr(dm, "channels", 1)
        if channels != self.input_channels:
            raise UserError(
                f"data.channels {channels} and model.network.in_channels {self.input_channels} differ: "
                "set both to the number of input channels"
            )
        theirs = getattr(dm, "foreground_labels", self.foreground_labels)
        if (None if theirs is None else list(theirs)) != self.foreground_labels:
            raise UserError(
                f"model.foreground_labels {self.foreground_labels} and data.foreground_labels {theirs} "
                "differ: the crops would train another target than the one evaluated (set both)"
            )
        return CLASS_NAMES

    # -- training ----------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        image, target = batch["image"], batch["label"]  # (B, C_in, S, S, S), (B, 1, S, S, S)
        r = self.refinement
        gen = torch.Generator().manual_seed(
            r.seed * 1_000_003 + int(self.global_step) * 64 + self.global_rank
        )
        prompt_free = int(float(torch.rand(1, generator=gen)) < r.prompt_free_probability)
        if (r.cutout_probability > 0 or r.cutout_fake_probability > 0) and not prompt_free:
            size = tuple(r.cutout_size)
            image = cut_out_lesion(
                image, target, r.cutout_probability, size, gen, r.cutout_fill, r.cutout_fake_probability
            )
        initial = None
        if r.corrupt_probability > 0 and not prompt_free:
            if float(torch.rand(1, generator=gen)) < r.corrupt_probability:
                initial = corrupt_masks(target, tuple(r.corrupt_radius), gen)
        res = refine_with_clicks(
            self.net,
            image,
            target,
            r.iterations,
            gen,
            prompt_free,
            r.accumulate_clicks,
            r.detach_between,
            r.click_mode,
            initial=initial,
        )
        loss = refinement_loss(res.logits, target, self.loss_settings)
        bs = image.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        with torch.no_grad():
            pred = res.logits[-1] > 0
            inter = (pred & (target > 0)).sum()
            dsc = 2 * inter / (pred.sum() + (target > 0).sum()).clamp_min(1)
        self.log("train/dsc_last_iteration", dsc, batch_size=bs)
        return loss

    def configure_optimizers(self) -> Any:
        warn_of_a_slow_decoder(bool(self.network_cfg.sam_med3d_checkpoint), self.decoder_lr_scale)
        opt = build_optimizer(self.net, self.lr, self.decoder_lr_scale, self.weight_decay)
        if self.scheduler == "none":
            return opt
        if self.scheduler == "multistep":  # the public code: MultiStepLR over epochs
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(self.milestones), self.gamma)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total) or total <= 0:
            raise UserError("scheduler 'cosine' needs trainer.max_epochs or trainer.max_steps")
        # cosine to zero without warm-up (over the steps, or the clock: sautomed/schedule.py)
        self.schedule = Schedule(
            self.trainer, int(total), 0, self.schedule_by, self.schedule_margin_s, self.schedule_min_steps
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.schedule.factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- evaluation -----------------------------------------------------------------------------------------
    def segment_volume(self, image: Tensor, out_shape: tuple[int, int, int]) -> np.ndarray:
        """(C, Z, S, S) (or (Z, S, S)) preprocessed volume -> (Z, Y, X) uint8 labels (1 = lesion) on the
        original grid."""
        logits = segment_automatic(self.net, image, self.automatic)  # (Z, S, S)
        if tuple(logits.shape) != tuple(out_shape):
            logits = F.interpolate(logits[None, None], size=out_shape, mode="trilinear")[0, 0]
        return (logits > 0).cpu().numpy().astype(np.uint8)

    @property
    def oracle_click_mode(self) -> ClickMode:
        """Where the oracle evaluation clicks: ``evaluation.click_mode``, else the training's."""
        return self.evaluation.click_mode or self.refinement.click_mode

    @property
    def consistency(self) -> Consistency:
        """Click-consistent decoding of the oracle evaluation and a user's clicks (``consistency.py``)."""
        return Consistency(steps=self.evaluation.consistency_steps)

    def oracle_dsc(self, image: Tensor, target: np.ndarray, case_id: str) -> list[float]:
        """Oracle-prompted DSC after each of max(oracle_clicks) clicks, in a crop centred on the lesion (the
        mean over ``evaluation.click_seeds`` runs of clicks)."""
        r, e = self.refinement, self.evaluation
        if e.click_seeds < 1:
            raise UserError(f"evaluation.click_seeds must be at least 1, got {e.click_seeds}")
        runs = [
            oracle_dsc(
                self.net,
                image,
                target,
                case_id,
                max(e.oracle_clicks),
                self.network_cfg.image_size,
                r.seed + k,
                r.accumulate_clicks,
                self.oracle_click_mode,
                merge=e.merge,
                consistency=self.consistency,
            )
            for k in range(e.click_seeds)
        ]
        return [float(np.mean(dscs)) for dscs in zip(*runs, strict=True)]

    def segment_case(self, image: Tensor, geom: Any) -> np.ndarray:
        image = image if image.dim() == 4 else image[None]  # (C, Z, S, S)
        return self.segment_volume(image, tuple(geom.shape_zyx))

    def case_probabilities(self, image: Tensor, geom: Any) -> Tensor:
        """(Z, 2, Y, X) background / lesion probabilities on the original grid (ensembles of M-SAM)."""
        image = image if image.dim() == 4 else image[None]
        logits = segment_automatic(self.net, image, self.automatic)  # (Z, S, S)
        shape = tuple(geom.shape_zyx)
        if tuple(logits.shape) != shape:
            logits = F.interpolate(logits[None, None], size=shape, mode="trilinear")[0, 0]
        p = logits.float().sigmoid()
        return torch.stack([1 - p, p], 1)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """The automatic mode, or with ``user_clicks`` (``predict --clicks``) each case's clicks applied in
        order from the file's start mask (``session.ClickSession``); a click outside its volume fails that
        case alone."""
        clicks = self.user_clicks
        if clicks is None or "error" in batch:
            return super().predict_step(batch, batch_idx)
        mine = clicks.clicks_for(Path(batch["output"]).name)

        def segment(image: Tensor, geom: Any) -> np.ndarray:
            session = ClickSession(
                self.net, image, geom, clicks.start, self.automatic, clicks.local, self.consistency
            )
            return session.apply(mine)

        try:
            return prediction_item(batch, segment)
        except UserError as exc:
            return {"error": str(exc), "source": batch["source"]}

    def reference(self, batch: dict[str, Any]) -> np.ndarray:
        return binary_target(batch["label"].cpu().numpy(), self.foreground_labels).astype(np.uint8)

    @property
    def scores_automatic(self) -> bool:
        return self.evaluation.automatic

    def evaluate_extra(self, batch: dict[str, Any], ref: np.ndarray) -> None:
        """The oracle-prompted DSC after each click (the paper's protocol), for a case with a lesion."""
        if self.evaluation.oracle and ref.any():
            image = batch["image"] if batch["image"].dim() == 4 else batch["image"][None]  # (C, Z, S, S)
            ref_img = reference_on_image_grid(ref, tuple(image.shape[1:]))  # (Z, S, S)
            case = batch["case_id"]
            self._oracle.append((case, self.oracle_dsc(image, ref_img, case)))

    def reset_extra(self) -> None:
        self._oracle = []

    def extra_results(self, prefix: str) -> tuple[list[ClassResult], dict[str, Any]]:
        """The oracle-prompted means by click count (logged as ``<prefix>/oracle_dsc@k``), rows and keys."""
        oracle, self._oracle = gather_oracle(self._oracle), []
        means, rows, summary = oracle_results(oracle, self.evaluation.oracle_clicks, self.oracle_click_mode)
        if summary:
            summary["oracle_prompted"]["progressive_merge"] = self.evaluation.merge
            summary["oracle_prompted"]["click_seeds"] = self.evaluation.click_seeds
            summary["oracle_prompted"]["consistency_steps"] = self.evaluation.consistency_steps
            summary["oracle_prompted"]["accumulate_clicks"] = self.refinement.accumulate_clicks
        for k, value in means.items():
            self.log(f"{prefix}/oracle_dsc@{k}", value)
        return rows, {"modes": dict(MODES), **summary}

    def monitored_dsc(self, summary: dict[str, Any]) -> float:
        """The automatic mean DSC; with ``evaluation.automatic`` off, the oracle DSC after the most clicks."""
        if self.evaluation.automatic:
            return summary["mean_dsc"]
        return summary.get(f"oracle_dsc@{max(self.evaluation.oracle_clicks)}", math.nan)

    def summary_line(self, prefix: str, summary: dict[str, Any]) -> str:
        return summary_line(prefix, summary, self.trainer.default_root_dir)
