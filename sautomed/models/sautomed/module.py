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
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor

from sautomed.evaluation.base import SegmentationModule, class_names_of
from sautomed.evaluation.postprocess import keep_largest_component, logits_to_labels
from sautomed.guards import check_encoder_finetune, check_sam_decoder_finetune, weights_from_elsewhere
from sautomed.models.sam.refine import PretrainedBoxRefiner
from sautomed.models.sautomed.dense import dense_volume_logits, pretrain_dense_head
from sautomed.models.sautomed.feature_cache import GIB, FeatureCache
from sautomed.models.sautomed.inference import InferenceEngine, InferenceSettings, Mode
from sautomed.models.sautomed.loss import LossWeights, SAutoMedLoss, hard_dice_per_class
from sautomed.models.sautomed.network import NetworkConfig, SAutoMedNet
from sautomed.models.sautomed.teacher import forced_boxes
from sautomed.models.sautomed.window import encode_window, encode_window_cached, neighbours
from sautomed.run_folder import CheckpointMismatchError, UserError, check_checkpoint_config
from sautomed.schedule import Schedule, ScheduleBy, check_schedule, time_remaining

__all__ = ["FAMILY", "CheckpointMismatchError", "InferenceSettings", "SAutoMedModule"]

log = logging.getLogger(__name__)

FAMILY = "sautomed"
FROZEN_PREFIX = "net.image_encoder."  # a compact checkpoint leaves these out (compact_checkpoint)
# settings that may differ between a checkpoint and the model it is loaded into
_NON_STRUCTURAL = {
    "sam_checkpoint",
    "grad_checkpointing",
    "state_presence_gate",  # how the chain hands on its state: an inference choice, no weights
    "state_min_area",
    "state_largest_component",
    "presence_gate",
}


class SAutoMedModule(SegmentationModule):
    """3D-SAutoMed training (evaluation, prediction and checkpoints: ``SegmentationModule``).

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
        feature_cache_limit_gb: the frozen encoder's feature cache (float16, every slice of every augmented
            copy) is kept in memory up to this size (None: half the machine's memory); a larger one is
            memory-mapped in `<default_root_dir>/feature_cache/` (deleted at the fit's end). Its size is
            logged before the encoding (`models/sautomed/feature_cache.py`).

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
        feature_cache_limit_gb: float | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= box_teacher_forcing <= 1.0 or box_teacher_jitter < 0:
            bad = f"{box_teacher_forcing} and {box_teacher_jitter}"
            raise UserError(f"model.box_teacher_forcing must be in [0, 1], box_teacher_jitter >= 0: {bad}")
        if box_teacher_forcing > 0 and not network.box_prompts:
            raise UserError("model.box_teacher_forcing needs network.box_prompts on")
        self.box_teacher_forcing, self.box_teacher_jitter = box_teacher_forcing, box_teacher_jitter
        if dense_pretrain_steps < 0 or (dense_pretrain_steps and not network.dense_head):
            raise UserError("model.dense_pretrain_steps needs network.dense_head and must be >= 0")
        if not 0.0 < dense_pretrain_share <= 1.0:
            raise UserError(f"model.dense_pretrain_share must be in (0, 1], got {dense_pretrain_share}")
        if inference.source == "dense" and not network.dense_head:
            raise UserError("model.inference.source: dense needs network.dense_head")
        self.dense_pretrain_steps, self.dense_pretrain_share = dense_pretrain_steps, dense_pretrain_share
        check_encoder_finetune(network.encoder_finetune, network.sam_checkpoint)
        check_sam_decoder_finetune(network.sam_decoder_finetune, network.sam_checkpoint)
        if not 0.0 <= warmup_fraction <= 1.0 or warmup_max_steps < 1:
            bad = f"{warmup_fraction} and {warmup_max_steps}"
            raise UserError(f"model.warmup_fraction in [0, 1], model.warmup_max_steps >= 1: got {bad}")
        self.warmup_fraction, self.warmup_max_steps = warmup_fraction, warmup_max_steps
        check_schedule(scheduler, schedule_by, schedule_min_steps)
        self.schedule_by, self.schedule_margin_s = schedule_by, schedule_margin_s
        self.schedule_min_steps = schedule_min_steps
        if pretrained_lr_scale <= 0:
            raise UserError(f"model.pretrained_lr_scale must be > 0, got {pretrained_lr_scale}")
        self.pretrained_lr_scale = pretrained_lr_scale
        self.schedule: Schedule | None = None
        if feature_cache_limit_gb is not None and feature_cache_limit_gb < 0:
            raise UserError(f"model.feature_cache_limit_gb must be >= 0, got {feature_cache_limit_gb}")
        limit = None if feature_cache_limit_gb is None else int(feature_cache_limit_gb * GIB)
        self._feature_cache = FeatureCache(limit)  # frozen encoder: slice_key -> features (window.py)
        self.network_cfg = network
        self.loss_weights = loss
        self.lr, self.weight_decay, self.scheduler = lr, weight_decay, scheduler
        self.inference = inference
        if inference.sam_refine and network.backbone != "litemedsam":
            raise UserError("inference.sam_refine needs network.backbone: litemedsam")
        self.refine_source = network.sam_checkpoint  # LiteMedSAM's weights for inference.sam_refine
        self._refiner: PretrainedBoxRefiner | None = None
        self.net = SAutoMedNet(network)
        self.criterion = SAutoMedLoss(loss, network.num_classes, box_terms=network.box_prompts)
        self.class_names = tuple(f"class_{i}" for i in range(1, network.num_classes + 1))

    # -- construction from a checkpoint (predict, bench) ---------------------------------------------------
    @classmethod
    def from_checkpoint_dict(cls, ckpt: dict[str, Any]) -> SAutoMedModule:
        """Rebuild the module from a sautomed checkpoint alone (its config travels inside)."""
        cfg = ckpt["sautomed"]
        frozen = ckpt.get("frozen_from")  # a compact checkpoint: the frozen encoder comes from these weights
        net = NetworkConfig(**{**cfg["network"], "sam_checkpoint": frozen})
        with weights_from_elsewhere():
            module = cls(
                network=net,
                loss=LossWeights(**cfg["loss"]),
                inference=InferenceSettings(**cfg["inference"]),
            )
        if frozen:  # every tensor but the frozen encoder's (float16 tensors are cast on loading)
            missing, unexpected = module.load_state_dict(ckpt["state_dict"], strict=False)
            wrong = [k for k in missing if not k.startswith(FROZEN_PREFIX)] + list(unexpected)
            if wrong:
                raise CheckpointMismatchError(
                    f"a compact checkpoint that does not fit its network: {wrong[:3]}"
                )
        else:
            module.load_state_dict(ckpt["state_dict"])
        module.refine_source = cfg["network"].get("sam_checkpoint")
        module.adopt_checkpoint_config(cfg)
        return module

    @staticmethod
    def compact_checkpoint(ckpt: dict[str, Any], half: bool = True) -> dict[str, Any]:
        """A checkpoint of only what the fit trained: the frozen encoder's tensors (loaded again from
        ``network.sam_checkpoint``, e.g. ``litemedsam``) left out, the rest in float16 when ``half``.
        ``from_checkpoint_dict`` rebuilds the module from it (the weights must then be at hand)."""
        cfg = ckpt["sautomed"]
        source = cfg["network"].get("sam_checkpoint")
        if cfg["network"].get("encoder_finetune") != "frozen" or not source:
            raise UserError(
                "only a fit with a frozen encoder from network.sam_checkpoint can be made compact"
            )
        state = {
            k: (v.half() if half and v.is_floating_point() else v)
            for k, v in ckpt["state_dict"].items()
            if not k.startswith(FROZEN_PREFIX)
        }
        return {"sautomed": cfg, "state_dict": state, "frozen_from": source, "compact_half": half}

    def box_refiner(self) -> PretrainedBoxRefiner:
        """LiteMedSAM as published, loaded on first use from the weights the network started from."""
        if self._refiner is None:
            if self.network_cfg.backbone != "litemedsam":
                raise UserError("inference.sam_refine needs network.backbone: litemedsam")
            if not self.refine_source:  # a refiner of random weights would only look right
                raise UserError("inference.sam_refine needs network.sam_checkpoint (LiteMedSAM)")
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
                raise UserError("loss.warmup > 0 needs the warm-up slices' labels (batch['warmup_label'])")
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
            raise UserError("scheduler 'cosine' needs trainer.max_epochs or trainer.max_steps")
        total = int(total)
        # a short linear warm-up, then cosine to zero (over the steps, or the clock: schedule.py)
        warmup = max(1, min(self.warmup_max_steps, int(total * self.warmup_fraction)))
        by, margin = self.schedule_by, self.schedule_margin_s
        self.schedule = Schedule(self.trainer, total, warmup, by, margin, self.schedule_min_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.schedule.factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- evaluation on whole volumes -------------------------------------------------------------------------
    def volume_scores(self, image: Tensor, mode: Mode | None = None) -> tuple[Tensor, bool]:
        """(Z, S, S) preprocessed volume -> (Z, C+1, h, w) chain logits, or the refiner's probabilities."""
        s, engine = self.inference, self.engine(mode)
        feats = engine.encode_volume(image)
        if s.source == "dense":  # the dense proposals alone, without the chain (dense.py)
            logits = dense_volume_logits(self.net.dense_head, feats)
        else:
            logits = engine.propagate(feats)
        if not s.sam_refine:
            return logits, False
        # their boxes through LiteMedSAM as published (models/sam/refine.py)
        fp32 = not (s.bf16 or s.encoder_bf16)  # only fp32 features may serve the refiner too
        shared = (self.net.image_encoder, feats) if fp32 else None
        return self.box_refiner().scores(image, logits, self.network_cfg.num_classes, shared=shared), True

    def segment_volume(self, image: Tensor, out_hw: tuple[int, int], mode: Mode | None = None) -> np.ndarray:
        """(Z, S, S) preprocessed volume -> (Z, H, W) uint8 canonical labels at the original in-plane size."""
        logits, _ = self.volume_scores(image, mode)
        labels = logits_to_labels(logits, out_hw).cpu().numpy()
        if self.inference.largest_component:
            labels = keep_largest_component(labels, self.network_cfg.num_classes)
        return labels

    def segment_case(self, image: Tensor, geom: Any) -> np.ndarray:
        return self.segment_volume(image, tuple(geom.shape_zyx[1:]))

    # -- the data and the checkpoint's config -------------------------------------------------------------
    def data_class_names(self, dm: Any) -> tuple[str, ...]:
        return class_names_of(dm, self.network_cfg.num_classes, "model.network.num_classes")

    def on_train_end(self) -> None:
        super().on_train_end()
        self._feature_cache.clear()  # the memory, or the memory-mapped file

    def on_train_start(self) -> None:  # after the Timer starts: the clock schedule counts this time too
        data = getattr(self.trainer.train_dataloader, "dataset", None)
        copies = getattr(data, "copies", None) or []
        self._feature_cache.folder = Path(self.trainer.default_root_dir) / "feature_cache"
        self._feature_cache.expect(sum(image.shape[0] for vol in copies for image, _ in vol))
        if self.dense_pretrain_steps:
            if getattr(data, "augmented_copies", 0) < 1 or self.network_cfg.encoder_finetune != "frozen":
                raise UserError("dense_pretrain_steps needs data.windows.augmented_copies, a frozen encoder")
            steps, seed = self.dense_pretrain_steps, int(torch.initial_seed()) % 2**31 + self.global_rank
            left = self.schedule.seconds_left if self.schedule is not None else None
            cache, share, check = self._feature_cache, self.dense_pretrain_share, self._check_encoding
            pretrain_dense_head(
                self.net, data.copies, data.key_offset, cache, steps, seed, left, share, check
            )

    def _check_encoding(self, encoded: int, total: int) -> None:
        """Between chunks of the feature encoding (which no training step interrupts): stop on SIGTERM (a
        scheduler's preemption) within seconds, and stop early with the figures when the encoding alone
        would outlast trainer.max_time."""
        trainer = self.trainer
        if trainer.received_sigterm:
            raise SIGTERMException
        started = getattr(self, "_encoding_started", None)
        if started is None:  # timed from the end of the first chunk (its first call pays for set-up)
            self._encoding_started = (time.monotonic(), encoded)
            log.info("encoding the frozen encoder's features: %d of %d slices", encoded, total)
            return
        timed = encoded - started[1]
        rate = (time.monotonic() - started[0]) / max(1, timed)  # seconds per slice
        need = rate * (total - encoded)
        if (
            encoded >= getattr(self, "_encoding_said", 0) + total / 10 or encoded == total
        ):  # about every tenth
            self._encoding_said = encoded
            log.info(
                "encoding the frozen encoder's features: %d of %d slices, about %.0f s left",
                encoded,
                total,
                need,
            )
        left = time_remaining(trainer)
        if left is None or timed < min(32, total - started[1]):  # an estimate from a few chunks
            return
        if need > left:
            raise UserError(
                f"encoding the frozen encoder's features of {total} slices needs about "
                f"{need + rate * encoded:.0f} s at {rate:.2f} s a slice on this machine, but "
                f"trainer.max_time leaves {left:.0f} s: "
                "fewer data.windows.augmented_copies or a longer trainer.max_time"
            )

    def family_config(self) -> dict[str, Any]:
        return {
            "family": FAMILY,
            "network": asdict(self.network_cfg),
            "loss": asdict(self.loss_weights),
            "inference": asdict(self.inference),
            "class_names": list(self.class_names),
            "preprocessing": self.preprocessing,
        }

    def check_loaded_config(self, cfg: dict[str, Any] | None) -> None:
        check_checkpoint_config(
            cfg, FAMILY, asdict(self.network_cfg), _NON_STRUCTURAL, asdict(NetworkConfig())
        )
