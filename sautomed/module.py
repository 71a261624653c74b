"""The LightningModule: wires the network, the loss and the inference engine; holds no math itself.

Training step = the paper's iterative history training: each window's distinct slices are encoded once
(warm-up-only slices in one batched no-grad pass, the target and its two neighbours in one batched pass with
gradients); n warm-up slices run from the initial state, each handing its predicted boxes and filtered history
to the next, and the target slice runs from that state; the loss is the target slice's. The warm-ups' encoder
work carries no gradient; their decoder steps do, so that the history tokens and filter learn (README, Method
notes).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch import Tensor

from sautomed.data.splits import FitRecord, fit_record, fit_split_record, split_provenance
from sautomed.guards import check_encoder_finetune, check_sam_decoder_finetune, weights_from_elsewhere
from sautomed.inference import InferenceEngine, InferenceSettings, Mode, logits_to_labels
from sautomed.losses import LossWeights, SAutoMedLoss, hard_dice_per_class
from sautomed.metrics import ClassResult, evaluate_case, gather_rows, summarize, write_metrics
from sautomed.models.sautomed.dense import dense_volume_logits, pretrain_dense_head
from sautomed.models.sautomed.network import NetworkConfig, SAutoMedNet
from sautomed.models.sautomed.refine import PretrainedBoxRefiner
from sautomed.models.sautomed.teacher import forced_boxes
from sautomed.models.sautomed.window import encode_window, encode_window_cached, neighbours
from sautomed.postprocess import keep_largest_component
from sautomed.run_folder import CheckpointMismatchError, check_checkpoint_config
from sautomed.schedule import Schedule, ScheduleBy, ScheduleHooks, check_schedule
from sautomed.tools.thumbnails import write_run_thumbnail
from sautomed.writers import prediction_item

__all__ = ["FAMILY", "CheckpointMismatchError", "InferenceSettings", "SAutoMedModule"]

log = logging.getLogger(__name__)

FAMILY = "sautomed"
# settings that may differ between a checkpoint and the model it is loaded into
_NON_STRUCTURAL = {
    "sam_checkpoint",
    "grad_checkpointing",
    "state_presence_gate",  # how the chain hands on its state: an inference choice, no weights
    "state_min_area",
    "state_largest_component",
    "presence_gate",
}


class SAutoMedModule(ScheduleHooks, L.LightningModule):
    """3D-SAutoMed training and evaluation.

    Args:
        network: the network's settings (backbone, S, classes, LoRA, ablation switches, SAM checkpoint).
        loss: loss-term weights.
        lr: AdamW learning rate (1e-4 in the paper).
        weight_decay: AdamW weight decay (1e-4 in the paper).
        scheduler: learning-rate schedule over `trainer.max_epochs` / `max_steps`: none, or cosine (after a
            linear warm-up over `warmup_fraction` of the steps, at most `warmup_max_steps`, at least 1).
        warmup_fraction: fraction of the steps in the scheduler's linear warm-up (cosine only).
        warmup_max_steps: upper bound of the scheduler's warm-up steps (cosine only).
        schedule_by: `steps` (the schedule spans max_epochs / max_steps; repeats exactly for a seed) or
            `clock` (it spans the `trainer.max_time` guard less `schedule_margin_s` when that comes first,
            and the run stops at its end: a budgeted run ends its schedule on any machine; `schedule.py`).
        schedule_margin_s: seconds of max_time kept for the last validation and checkpoint (clock only).
        schedule_min_steps: the steps the config's figures were measured with: a run whose clock ends
            sooner warns that it trained less (a slower machine); 0: none; clock only (`schedule.py`).
        pretrained_lr_scale: learning-rate factor of the weights loaded from `network.sam_checkpoint`
            (SAM's prompt encoder and decoder, and the encoder where it trains); the new modules keep `lr`.
            Below 1 a pretrained decoder is adapted gently while the new modules learn at full speed.
        inference: how volumes are segmented in validate / test / predict.
        box_teacher_forcing: chance that a training sample's prompts are made from jittered reference boxes
            instead of the box generator's (every slice of its chain; `models/sautomed/teacher.py`). 0 (the
            paper): always the generator's. Inference always uses the generator's boxes.
        box_teacher_jitter: how far each side of a forced box moves, as a fraction of the box's size.
        dense_pretrain_steps: with `network.dense_head`, a frozen encoder and fixed augmented copies: every
            copy's slices are encoded into the feature cache and the dense head trains this many steps on
            them before the chain (`models/sautomed/dense.py`); 0: it trains with the chain only.
        dense_pretrain_share: with `schedule_by: clock`, the pretraining also ends once it has used this
            share of the time budget left after the encoding; the chain has the rest.

    Refuses `network.encoder_finetune: lora` without `network.sam_checkpoint` (`guards.py`), unless the
    weights come from a trained checkpoint (`from_checkpoint_dict`, `--ckpt_path`).
    """

    def __init__(
        self,
        network: NetworkConfig = NetworkConfig(),
        loss: LossWeights = LossWeights(),
        lr: float = 1e-4,
        weight_decay: float = 1e-4,
        scheduler: Literal["none", "cosine"] = "none",
        warmup_fraction: float = 0.05,
        warmup_max_steps: int = 100,
        schedule_by: ScheduleBy = "steps",
        schedule_margin_s: float = 60.0,
        schedule_min_steps: int = 0,
        pretrained_lr_scale: float = 1.0,
        inference: InferenceSettings = InferenceSettings(),
        box_teacher_forcing: float = 0.0,
        box_teacher_jitter: float = 0.1,
        dense_pretrain_steps: int = 0,
        dense_pretrain_share: float = 0.4,
    ) -> None:
        super().__init__()
        if not 0.0 <= box_teacher_forcing <= 1.0 or box_teacher_jitter < 0:
            bad = f"{box_teacher_forcing} and {box_teacher_jitter}"
            raise ValueError(f"model.box_teacher_forcing must be in [0, 1], box_teacher_jitter >= 0: {bad}")
        if box_teacher_forcing > 0 and not network.box_prompts:
            raise ValueError("model.box_teacher_forcing needs network.box_prompts on")
        self.box_teacher_forcing, self.box_teacher_jitter = box_teacher_forcing, box_teacher_jitter
        if dense_pretrain_steps < 0 or (dense_pretrain_steps and not network.dense_head):
            raise ValueError("model.dense_pretrain_steps needs network.dense_head and must be >= 0")
        if not 0.0 < dense_pretrain_share <= 1.0:
            raise ValueError(f"model.dense_pretrain_share must be in (0, 1], got {dense_pretrain_share}")
        if inference.source == "dense" and not network.dense_head:
            raise ValueError("model.inference.source: dense needs network.dense_head")
        self.dense_pretrain_steps, self.dense_pretrain_share = dense_pretrain_steps, dense_pretrain_share
        check_encoder_finetune(network.encoder_finetune, network.sam_checkpoint)
        check_sam_decoder_finetune(network.sam_decoder_finetune, network.sam_checkpoint)
        if not 0.0 <= warmup_fraction <= 1.0 or warmup_max_steps < 1:
            bad = f"{warmup_fraction} and {warmup_max_steps}"
            raise ValueError(f"model.warmup_fraction in [0, 1], model.warmup_max_steps >= 1: got {bad}")
        self.warmup_fraction, self.warmup_max_steps = warmup_fraction, warmup_max_steps
        check_schedule(scheduler, schedule_by, schedule_min_steps)
        self.schedule_by, self.schedule_margin_s = schedule_by, schedule_margin_s
        self.schedule_min_steps = schedule_min_steps
        if pretrained_lr_scale <= 0:
            raise ValueError(f"model.pretrained_lr_scale must be > 0, got {pretrained_lr_scale}")
        self.pretrained_lr_scale = pretrained_lr_scale
        self.schedule: Schedule | None = None
        self._feature_cache: dict[int, Tensor] = {}  # frozen encoder: slice_key -> features (window.py)
        self.network_cfg = network
        self.loss_weights = loss
        self.lr, self.weight_decay, self.scheduler = lr, weight_decay, scheduler
        self.inference = inference
        if inference.sam_refine and network.backbone != "litemedsam":
            raise ValueError("inference.sam_refine needs network.backbone: litemedsam")
        self.refine_source = network.sam_checkpoint  # LiteMedSAM's weights for inference.sam_refine
        self._refiner: PretrainedBoxRefiner | None = None
        self.net = SAutoMedNet(network)
        self.criterion = SAutoMedLoss(loss, network.num_classes)
        self.class_names: tuple[str, ...] = tuple(f"class_{i}" for i in range(1, network.num_classes + 1))
        self.preprocessing: dict[str, Any] | None = None
        self.fit_split: FitRecord | None = None  # the loaded checkpoint's fit (data.splits)
        self._rows: list[ClassResult] = []

    # -- construction from a checkpoint (predict, bench) ---------------------------------------------------
    @classmethod
    def from_checkpoint_dict(cls, ckpt: dict[str, Any]) -> SAutoMedModule:
        """Rebuild the module from a sautomed checkpoint alone (its config travels inside)."""
        cfg = ckpt["sautomed"]
        net = NetworkConfig(**{**cfg["network"], "sam_checkpoint": None})
        with weights_from_elsewhere():
            module = cls(
                network=net,
                loss=LossWeights(**cfg["loss"]),
                inference=InferenceSettings(**cfg["inference"]),
            )
        module.load_state_dict(ckpt["state_dict"])
        module.refine_source = cfg["network"].get("sam_checkpoint")
        module.class_names = tuple(cfg["class_names"])
        module.preprocessing = dict(cfg["preprocessing"])
        return module

    def box_refiner(self) -> PretrainedBoxRefiner:
        """LiteMedSAM as published, loaded on first use from the weights the network started from."""
        if self._refiner is None:
            if self.network_cfg.backbone != "litemedsam":
                raise ValueError("inference.sam_refine needs network.backbone: litemedsam")
            if not self.refine_source:  # a refiner of random weights would only look right
                raise ValueError("inference.sam_refine needs network.sam_checkpoint (LiteMedSAM)")
            size, margin = self.network_cfg.image_size, self.inference.sam_refine_margin
            self._refiner = PretrainedBoxRefiner(self.refine_source, size, margin)
        return self._refiner

    def engine(self, mode: Mode | None = None, bf16: bool | None = None) -> InferenceEngine:
        s, half = self.inference, torch.bfloat16
        dtype, enc = (half if on else None for on in (s.bf16 if bf16 is None else bf16, s.encoder_bf16))
        return InferenceEngine(self.net, mode or s.mode, s.encode_chunk, dtype, enc)

    # -- training -----------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        image, index, label = batch["image"], batch["index"], batch["label"]  # (B,n+3,S,S), (B,n+3), (B,S,S)
        direction = batch["direction"]  # (B,): +1 or -1
        n = image.shape[1] - 3
        keys = batch.get("slice_key")  # (B, n+3) stable slice identities (data.windows.augmented_copies)
        if keys is not None and not any(p.requires_grad for p in self.net.image_encoder.parameters()):
            feats = encode_window_cached(self.net, image, keys, self._feature_cache)  # frozen: cached
        else:
            feats = encode_window(self.net, image, index, n)  # (B, n+3, D, h, w)

        # Warm-ups: their slices were encoded without gradients; their (cheap) decoder steps keep gradients,
        # otherwise the initial history tokens and the history filter would never receive one.
        state = self.net.initial_state(image.shape[0], image.device)
        seed = int(self.global_step) * 7919 + self.global_rank
        C = self.network_cfg.num_classes
        forced = forced_boxes(batch, n, self.box_teacher_forcing, self.box_teacher_jitter, seed, C)
        warmup_outs = []
        for k in range(1, n + 1):
            prev, nxt = neighbours(feats, direction, k)
            step = self.net.step(prev, feats[:, k], nxt, state, forced[k - 1])
            warmup_outs.append(step)
            state = step.state
        prev, nxt = neighbours(feats, direction, n + 1)
        out = self.net.step(prev, feats[:, n + 1], nxt, state, forced[n])
        terms = self.criterion(out, label)
        bs = image.shape[0]
        w = self.loss_weights.warmup
        if w > 0:  # optional deep supervision of the warm-up steps (LossWeights.warmup)
            if batch.get("warmup_label") is None:
                raise ValueError("loss.warmup > 0 needs the warm-up slices' labels (batch['warmup_label'])")
            wl = batch["warmup_label"]  # (B, n, S, S)
            warm = torch.stack(
                [self.criterion(o, wl[:, k])["loss"] for k, o in enumerate(warmup_outs)]
            ).mean()
            terms["warmup_loss"] = warm
            terms["loss"] = terms["loss"] + w * warm
        self.log("train/loss", terms["loss"], prog_bar=True, batch_size=bs)
        for name, value in terms.items():
            if name != "loss":
                self.log(f"train/{name}", value, batch_size=bs)
        dsc = hard_dice_per_class(out.logits, label, self.network_cfg.num_classes)  # the target slices
        for name, value in zip(self.class_names, dsc.tolist(), strict=True):
            if value == value:  # not NaN: the class is in the batch's targets or predictions
                self.log(f"train/dsc/{name}", value, batch_size=bs)
        return terms["loss"]

    def configure_optimizers(self) -> Any:
        loaded = set(self.net.load_report.loaded) if self.net.load_report is not None else set()
        groups: dict[bool, list[torch.nn.Parameter]] = {False: [], True: []}
        for name, p in self.net.named_parameters():
            if p.requires_grad:
                groups[name in loaded and self.pretrained_lr_scale != 1.0].append(p)
        param_groups = [{"params": groups[False], "lr": self.lr}]
        if groups[True]:
            param_groups.append({"params": groups[True], "lr": self.lr * self.pretrained_lr_scale})
        opt = torch.optim.AdamW(param_groups, lr=self.lr, weight_decay=self.weight_decay)
        if self.scheduler == "none":
            return opt
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total) or total <= 0:
            raise ValueError("scheduler 'cosine' needs trainer.max_epochs or trainer.max_steps")
        total = int(total)
        # a short linear warm-up, then cosine to zero (over the steps, or the clock: schedule.py)
        warmup = max(1, min(self.warmup_max_steps, int(total * self.warmup_fraction)))
        by, margin = self.schedule_by, self.schedule_margin_s
        self.schedule = Schedule(self.trainer, total, warmup, by, margin, self.schedule_min_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.schedule.factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- evaluation on whole volumes -------------------------------------------------------------------------
    def segment_volume(self, image: Tensor, out_hw: tuple[int, int], mode: Mode | None = None) -> np.ndarray:
        """(Z, S, S) preprocessed volume -> (Z, H, W) uint8 canonical labels at the original in-plane size."""
        s, engine = self.inference, self.engine(mode)
        feats = engine.encode_volume(image)
        if s.source == "dense":  # the dense proposals alone, without the chain (dense.py)
            logits = dense_volume_logits(self.net.dense_head, feats)
        else:
            logits = engine.propagate(feats)
        if s.sam_refine:  # their boxes through LiteMedSAM as published (refine.py)
            shared = None if s.bf16 else (self.net.image_encoder, feats)  # fp32 features may serve it too
            logits = self.box_refiner().scores(image, logits, self.network_cfg.num_classes, shared=shared)
        labels = logits_to_labels(logits, out_hw).cpu().numpy()
        if s.largest_component:
            labels = keep_largest_component(labels, self.network_cfg.num_classes)
        return labels

    def _evaluate(self, batch: dict[str, Any]) -> None:
        if batch["label"] is None:
            raise ValueError(f"case {batch['case_id']} has no label: it cannot be evaluated")
        ref = batch["label"].cpu().numpy()
        pred = self.segment_volume(batch["image"], tuple(ref.shape[1:]))
        rows = evaluate_case(batch["case_id"], pred, ref, batch["geom"].spacing_zyx, self.class_names)
        self._rows.extend(rows)
        write_run_thumbnail(self._trainer, batch["case_id"], batch["image"], ref, pred)

    def on_validation_epoch_start(self) -> None:
        self._sync_from_datamodule()
        self._rows = []

    on_test_epoch_start = on_validation_epoch_start

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch)

    def _finish_evaluation(self, prefix: str) -> None:
        rows, self._rows = gather_rows(self._rows), []
        summary = summarize(rows, self.class_names)
        mean = summary["mean_dsc"]
        self.log(
            f"{prefix}/mean_dsc", 0.0 if math.isnan(mean) else mean, sync_dist=False, rank_zero_only=False
        )
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
                    "%s: %d of the %d cases are training cases of the checkpoint (%s): not held-out scores",
                    prefix,
                    len(cases),
                    summary["num_cases"],
                    ", ".join(cases),
                )
            summary["config"] = self.sautomed_config()
            write_metrics(rows, summary, Path(self.trainer.default_root_dir))
            self.print(
                f"{prefix}: mean DSC {mean:.4f}, mean HD95 {summary['mean_hd95_mm']:.2f} mm "
                f"over {summary['num_cases']} cases -> {self.trainer.default_root_dir}"
            )
        elif self.trainer.is_global_zero and not self.trainer.sanity_checking:
            log.info(
                "epoch %d: validation mean DSC %.4f over %d cases",
                self.current_epoch,
                mean,
                summary["num_cases"],
            )
        self.last_summary = summary

    def on_validation_epoch_end(self) -> None:
        self._finish_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._finish_evaluation("test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        return prediction_item(
            batch, lambda image, geom: self.segment_volume(image, tuple(geom.shape_zyx[1:]))
        )

    # -- the checkpoint carries its config ------------------------------------------------------------------
    def _datamodule(self) -> Any:
        return getattr(self.trainer, "datamodule", None) if self._trainer is not None else None

    def _sync_from_datamodule(self) -> None:
        dm = self._datamodule()
        if dm is None or not hasattr(dm, "class_names"):
            return
        names = tuple(dm.class_names)
        if len(names) != self.network_cfg.num_classes:
            raise ValueError(
                f"the data has {len(names)} classes ({', '.join(names)}) but model.network.num_classes is "
                f"{self.network_cfg.num_classes}"
            )
        self.class_names = names
        self.preprocessing = asdict(dm.preprocessing)

    def on_fit_start(self) -> None:
        self._sync_from_datamodule()

    def on_train_start(self) -> None:  # after the Timer starts: the clock schedule counts this time too
        if self.dense_pretrain_steps:
            data = getattr(self.trainer.train_dataloader, "dataset", None)
            if getattr(data, "augmented_copies", 0) < 1 or self.network_cfg.encoder_finetune != "frozen":
                raise ValueError("dense_pretrain_steps needs data.windows.augmented_copies, a frozen encoder")
            steps, seed = self.dense_pretrain_steps, int(torch.initial_seed()) % 2**31 + self.global_rank
            left = self.schedule.seconds_left if self.schedule is not None else None
            cache, share = self._feature_cache, self.dense_pretrain_share
            pretrain_dense_head(self.net, data.copies, data.key_offset, cache, steps, seed, left, share)

    def sautomed_config(self) -> dict[str, Any]:
        return {
            "family": FAMILY,
            "network": asdict(self.network_cfg),
            "loss": asdict(self.loss_weights),
            "inference": asdict(self.inference),
            "class_names": list(self.class_names),
            "preprocessing": self.preprocessing,
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["sautomed"] = self.sautomed_config()
        dm = self._datamodule()
        split = fit_split_record(dm, self._trainer)  # the fit's cases: evaluations name training cases
        if split is not None:
            checkpoint["sautomed"]["split"] = split

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        cfg = checkpoint.get("sautomed")
        check_checkpoint_config(
            cfg, FAMILY, asdict(self.network_cfg), _NON_STRUCTURAL, asdict(NetworkConfig())
        )
        self.class_names = tuple(cfg["class_names"])
        self.preprocessing = cfg.get("preprocessing")
        self.fit_split = fit_record(checkpoint)
