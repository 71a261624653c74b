"""The baselines' LightningModule: a MONAI U-Net (2D over slices or 3D over patches), DiceCE, the shared
metrics and writers. It wires network, loss and inference; the math lives in the files beside it.

Training: unet2d on the shared slice windows (the target slice, 2.5D with its neighbours), unet3d on 3D
patches (`BaselineDataModule(patches=...)`); DiceCE with deep supervision; SGD with Nesterov momentum and
nnU-Net's poly schedule, or AdamW with cosine. Evaluation: whole volumes, slice by slice (2D) or by sliding
window with Gaussian blending (3D), logits resized to the original in-plane size, optional largest component.
"""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from sautomed.evaluation.base import SegmentationModule, class_names_of
from sautomed.evaluation.postprocess import keep_largest_component, logits_to_labels
from sautomed.models.baselines.loss import BaselineLoss, DeepSupervisionDiceCE
from sautomed.models.baselines.network import NetworkKind, UNetSettings, build_unet
from sautomed.models.baselines.unet2d import segment_slices, window_slices
from sautomed.models.baselines.unet3d import segment_patches
from sautomed.models.sam.refine import PretrainedBoxRefiner
from sautomed.run_folder import UserError, check_checkpoint_config
from sautomed.schedule import Schedule, ScheduleBy, check_schedule

log = logging.getLogger(__name__)

FAMILY = "baseline"


@dataclass(frozen=True)
class BaselineInference:
    """How volumes are segmented in validate / test / predict.

    Args:
        largest_component: keep only the largest 3D connected component of each class.
        bf16: run the network under bfloat16 autocast.
        slice_batch: unet2d: slices per forward.
        overlap: unet3d: overlap of neighbouring sliding windows (nnU-Net: 0.5).
        window_batch: unet3d: sliding windows per forward.
        blend: unet3d: how overlapping windows are combined: gaussian (nnU-Net) or constant (a plain mean).
        sam_refine: LiteMedSAM as published re-segments the box of each class's largest 3D component on every
            slice (``models/sam/refine.py``): the U-Net finds the organs, SAM draws them.
        sam_refine_margin: pixels of S added to each side of those boxes.
        sam_refine_weights: LiteMedSAM's checkpoint for the refinement (a path, or ``litemedsam``: the file
            ``sautomed weights litemedsam`` fetched).
    """

    largest_component: bool = False
    bf16: bool = False
    slice_batch: int = 16
    overlap: float = 0.5
    window_batch: int = 2
    blend: Literal["gaussian", "constant"] = "gaussian"
    sam_refine: bool = False
    sam_refine_margin: int = 6
    sam_refine_weights: str = "litemedsam"


class BaselineModule(SegmentationModule):
    """A U-Net baseline.

    Args:
        network: unet2d (slices, optionally 2.5D) or unet3d (patches).
        unet: the U-Net's settings (classes, patch size and spacing for the plan, filters, deep supervision).
        loss: Dice and cross-entropy weights.
        optimizer: sgd (Nesterov momentum, nnU-Net's choice) or adamw.
        lr: initial learning rate (nnU-Net: 1e-2 with SGD).
        weight_decay: weight decay (nnU-Net: 3e-5).
        momentum: SGD momentum (nnU-Net: 0.99).
        scheduler: learning-rate schedule over `trainer.max_epochs` / `max_steps`: poly (lr (1 - t/T)^0.9,
            nnU-Net's), cosine (after a linear warm-up over 5% of the steps, at most 100), or none.
        inference: how volumes are segmented in validate / test / predict.
        schedule_by: ``steps`` (the schedule spans max_epochs / max_steps; a seed repeats exactly) or
            ``clock`` (cosine only: it spans the ``trainer.max_time`` guard less ``schedule_margin_s`` when
            that comes first, and the run stops at its end, so a budgeted run ends its schedule on a slow
            machine too; ``sautomed/schedule.py``, as the other families).
        schedule_margin_s: seconds of max_time kept for the last checkpoint (clock only).
        schedule_min_steps: the optimiser steps the config's figures were measured with: a run whose clock
            ends sooner warns that it trained less (a slower machine); 0: none; clock only (schedule.py).
    """

    def __init__(
        self,
        network: NetworkKind = "unet3d",
        unet: UNetSettings = UNetSettings(),
        loss: BaselineLoss = BaselineLoss(),
        optimizer: Literal["sgd", "adamw"] = "sgd",
        lr: float = 1e-2,
        weight_decay: float = 3e-5,
        momentum: float = 0.99,
        scheduler: Literal["poly", "cosine", "none"] = "poly",
        inference: BaselineInference = BaselineInference(),
        schedule_by: ScheduleBy = "steps",
        schedule_margin_s: float = 60.0,
        schedule_min_steps: int = 0,
    ) -> None:
        super().__init__()
        check_schedule(scheduler, schedule_by, schedule_min_steps)
        self.schedule_by, self.schedule_margin_s, self.schedule_min_steps = (
            schedule_by,
            schedule_margin_s,
            schedule_min_steps,
        )
        self.schedule: Schedule | None = None
        self.network_kind, self.unet_cfg, self.loss_weights = network, unet, loss
        self.optimizer_name, self.lr, self.weight_decay, self.momentum = optimizer, lr, weight_decay, momentum
        self.scheduler = scheduler
        self.inference = inference
        self.net = build_unet(network, unet)
        self.criterion = DeepSupervisionDiceCE(loss)
        self.class_names = tuple(f"class_{i}" for i in range(1, unet.num_classes + 1))
        self._refiner: PretrainedBoxRefiner | None = None

    @property
    def input_channels(self) -> int:
        """Input channels the network reads (``predict`` reads a case's ``_0000`` .. files if more than 1)."""
        return int(self.unet_cfg.in_channels)

    # -- construction from a checkpoint (predict) -------------------------------------------------------
    @classmethod
    def from_checkpoint_dict(cls, ckpt: dict[str, Any]) -> BaselineModule:
        """Rebuild the module from a baseline checkpoint alone (its config travels inside)."""
        cfg = ckpt.get("sautomed")
        check_checkpoint_config(cfg, FAMILY, (cfg or {}).get("network") or {}, set())  # the family alone
        settings = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg["network"].items()}
        kind = settings.pop("kind")
        module = cls(
            network=kind,
            unet=UNetSettings(**settings),
            loss=BaselineLoss(**cfg["loss"]),
            inference=BaselineInference(**cfg["inference"]),
        )
        module.load_state_dict(ckpt["state_dict"])
        module.adopt_checkpoint_config(cfg)
        return module

    # -- training ---------------------------------------------------------------------------------------
    def _inputs(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        if self.network_kind == "unet2d":
            if "direction" not in batch:
                raise UserError("unet2d trains on slice windows: set data.patches to null")
            x = window_slices(batch["image"], batch["direction"], self.unet_cfg.context_slices)
            return x, batch["label"]  # (B, 1 + 2c, S, S), (B, S, S)
        if batch["image"].ndim != 5:
            raise UserError("unet3d trains on 3D patches: set data.patches (size = model.unet.patch_size)")
        return batch["image"], batch["label"]  # (B, C_in, pz, py, px), (B, pz, py, px)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        x, y = self._inputs(batch)
        terms = self.criterion(self.net(x), y)
        bs = x.shape[0]
        self.log("train/loss", terms["loss"], prog_bar=True, batch_size=bs)
        self.log("train/dice_ce_full", terms["dice_ce_full"], batch_size=bs)
        return terms["loss"]

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_name == "sgd":
            opt = torch.optim.SGD(
                params, lr=self.lr, momentum=self.momentum, nesterov=True, weight_decay=self.weight_decay
            )
        else:
            opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        if self.scheduler == "none":
            return opt
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total) or total <= 0:
            raise UserError(f"scheduler {self.scheduler!r} needs trainer.max_epochs or trainer.max_steps")
        total = int(total)
        if self.scheduler == "cosine":  # linear warm-up, cosine to zero (over the steps or the clock)
            warmup = max(1, min(100, total // 20))
            self.schedule = Schedule(
                self.trainer, total, warmup, self.schedule_by, self.schedule_margin_s, self.schedule_min_steps
            )
            factor = self.schedule.factor
        else:

            def factor(step: int) -> float:  # nnU-Net's poly
                return (1.0 - min(step, total) / total) ** 0.9

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- whole volumes ----------------------------------------------------------------------------------
    def segment_volume(self, image: Tensor, out_hw: tuple[int, int]) -> np.ndarray:
        """(Z, S, S) (or (C, Z, S, S) for C input channels) preprocessed volume -> (Z, H, W) uint8 canonical
        labels at the original in-plane size."""
        logits, _ = self.volume_scores(image)
        labels = logits_to_labels(logits, out_hw).cpu().numpy()  # (Z, H, W) uint8
        if self.inference.largest_component:
            labels = keep_largest_component(labels, self.unet_cfg.num_classes)
        return labels

    def volume_scores(self, image: Tensor) -> tuple[Tensor, bool]:
        """(Z, S, S) (or (C_in, Z, S, S)) preprocessed volume -> (Z, C+1, S, S) U-Net logits, or the
        refiner's probabilities."""
        s = self.inference
        was_training = self.net.training
        self.net.eval()  # DynUNet returns the deep-supervision stack only in training mode
        device = image.device
        bf16 = torch.autocast(device.type, dtype=torch.bfloat16) if s.bf16 else nullcontext()
        try:
            with bf16:
                if self.network_kind == "unet2d":
                    logits = segment_slices(self.net, image, self.unet_cfg.context_slices, s.slice_batch)
                else:
                    logits = segment_patches(
                        self.net, image, self.unet_cfg.patch_size, s.overlap, s.window_batch, s.blend
                    )  # (Z, C+1, S, S)
        finally:
            self.net.train(was_training)
        if not s.sam_refine:
            return logits, False
        if image.dim() == 4:
            raise UserError("--sam-refine reads one channel: not for a U-Net of several input channels")
        # the U-Net's boxes through LiteMedSAM as published (models/sam/refine.py)
        return self.box_refiner(image.shape[-1]).scores(image, logits, self.unet_cfg.num_classes), True

    def box_refiner(self, image_size: int) -> PretrainedBoxRefiner:
        """LiteMedSAM as published at the data's slice size S, loaded on first use."""
        s = self.inference
        if self._refiner is None or self._refiner.image_size != image_size:
            self._refiner = PretrainedBoxRefiner(s.sam_refine_weights, image_size, s.sam_refine_margin)
        return self._refiner

    def segment_case(self, image: Tensor, geom: Any) -> np.ndarray:
        if image.dim() == 4 and self.network_kind == "unet3d" and self.unet_cfg.in_channels == 1:
            image = image[0]  # (1, Z, S, S) -> (Z, S, S)
        return self.segment_volume(image, tuple(geom.shape_zyx[1:]))

    # -- the data and the checkpoint's config -----------------------------------------------------------
    def data_class_names(self, dm: Any) -> tuple[str, ...]:
        names = class_names_of(dm, self.unet_cfg.num_classes, "model.unet.num_classes")
        check_data_fits(self.network_kind, self.unet_cfg, dm)
        return names

    def family_config(self) -> dict[str, Any]:
        return {
            "family": FAMILY,
            "network": self._network_record(),
            "loss": asdict(self.loss_weights),
            "inference": asdict(self.inference),
            "class_names": list(self.class_names),
            "preprocessing": self.preprocessing,
        }

    def _network_record(self) -> dict[str, Any]:
        """The network as the checkpoint records it: its kind and every U-Net setting (tuples as lists)."""
        return {"kind": self.network_kind, **_unet_record(self.unet_cfg)}

    def check_loaded_config(self, cfg: dict[str, Any] | None) -> None:
        check_checkpoint_config(cfg, FAMILY, self._network_record(), set(), _unet_record(UNetSettings()))


def _unet_record(unet: UNetSettings) -> dict[str, Any]:
    """U-Net settings as a checkpoint records them (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(unet).items()}


def check_data_fits(kind: NetworkKind, unet: UNetSettings, dm: Any) -> None:
    """ValueError when the data module's training input does not match the network (one line, the fix)."""
    patches = getattr(dm, "patches", None)
    channels = int(getattr(dm, "channels", 1))
    if channels != unet.in_channels:
        raise UserError(
            f"data.channels {channels} must equal model.unet.in_channels {unet.in_channels} "
            "(the case_0000, case_0001 ... files the network reads)"
        )
    if kind == "unet3d":
        if patches is None:
            raise UserError(f"unet3d trains on 3D patches: set data.patches.size to {list(unet.patch_size)}")
        if tuple(patches.size) != tuple(unet.patch_size):
            raise UserError(
                f"data.patches.size {list(patches.size)} must equal "
                f"model.unet.patch_size {list(unet.patch_size)}"
            )
    else:
        if patches is not None:
            raise UserError("unet2d trains on slice windows: set data.patches to null")
        s = dm.preprocessing.image_size
        if tuple(unet.patch_size) != (s, s):
            raise UserError(
                f"unet2d: model.unet.patch_size {list(unet.patch_size)} must be the slice size [{s}, {s}] "
                "(data.preprocessing.image_size)"
            )
