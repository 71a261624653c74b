"""3D-SAutoMed's training loss: segmentation (CE + soft Dice), boxes (L1 + GIoU), presence (BCE).

All terms are named; ``loss`` is their weighted sum. Logits (S/4) are upsampled bilinearly to the label size.
Box terms use the classes present in each target slice; presence is BCE against "class present in the slice".
When the network has no box prompt generator, the box and presence terms are 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sautomed.models.sautomed.boxes import box_cxcywh_to_xyxy, boxes_from_labels, generalized_box_iou


class _StepOutputLike(Protocol):  # sautomed.models.sautomed.network.StepOutput
    logits: Tensor
    boxes: Tensor
    presence: Tensor
    dense: Tensor | None


@dataclass
class LossWeights:
    """Weights of the loss terms.

    Attributes:
        ce: cross-entropy over background + C classes.
        dice: soft Dice over the foreground classes.
        box_l1: L1 distance of the generated boxes (cxcywh) to the target boxes.
        box_giou: 1 - generalised IoU of the generated boxes and the target boxes.
        presence: binary cross-entropy of the presence logits.
        warmup: weight of the same loss on the warm-up slices' outputs (their mean), added to the target
            slice's. 0 (the paper): only the target slice is supervised. > 0 supervises every step of the
            chain, the first one from the initial state included (what inference's first slice runs from).
        dense: cross-entropy + soft Dice of the dense proposals at the feature grid (``network.dense_head``).
    """

    ce: float = 0.5
    dice: float = 0.5
    box_l1: float = 5.0
    box_giou: float = 2.0
    presence: float = 1.0
    warmup: float = 0.0
    dense: float = 1.0


def soft_dice_loss(probs: Tensor, onehot: Tensor, smooth: float = 1.0) -> Tensor:
    """1 - mean over classes of the batch soft Dice. probs, onehot: (B, K, H, W) -> scalar."""
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    return 1 - ((2 * inter + smooth) / (denom + smooth)).mean()


def dense_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy + soft Dice (foreground classes) of (B, C+1, h, w) logits against (B, H, W) labels,
    nearest-downsampled to the logits' grid (the dense proposals' loss, ``models/sautomed/dense.py``)."""
    if target.shape[-2:] != logits.shape[-2:]:
        target = F.interpolate(target[:, None].float(), size=logits.shape[-2:], mode="nearest")[:, 0]
    target, logits = target.long(), logits.float()
    probs = logits.softmax(dim=1)[:, 1:]
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].to(probs.dtype)
    return F.cross_entropy(logits, target) + soft_dice_loss(probs, onehot)


@torch.no_grad()
def hard_dice_per_class(logits: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """Dice of the argmax labels over a batch, per foreground class: (C,), NaN where the class is in neither.

    logits (B, C+1, h, w) are upsampled to the label size (B, H, W) first. A training-time monitor (logged
    per class as ``train/dsc/<class>``): a class the model does not learn shows here long before validation.
    """
    if logits.shape[-2:] != target.shape[-2:]:
        logits = F.interpolate(logits.float(), size=target.shape[-2:], mode="bilinear", align_corners=False)
    pred = logits.argmax(dim=1)
    classes = torch.arange(1, num_classes + 1, device=target.device).view(-1, 1, 1, 1)  # (C, 1, 1, 1)
    p, t = pred.unsqueeze(0) == classes, target.long().unsqueeze(0) == classes  # (C, B, H, W)
    inter = (p & t).sum(dim=(1, 2, 3)).float()
    denom = (p.sum(dim=(1, 2, 3)) + t.sum(dim=(1, 2, 3))).float()
    return torch.where(denom > 0, 2 * inter / denom.clamp_min(1), torch.full_like(denom, float("nan")))


class SAutoMedLoss(nn.Module):
    """Weighted sum of named loss terms for one step's output.

    Args:
        weights: weights of the terms.
        num_classes: C, number of foreground classes.
        box_terms: compute box/presence terms; None = whenever the output holds boxes (a network without box
            prompt generator returns all-zero boxes, which a sigmoid box head never produces).
        dice_smooth: additive smoothing of the soft Dice.
    """

    def __init__(
        self, weights: LossWeights, num_classes: int, box_terms: bool | None = None, dice_smooth: float = 1.0
    ) -> None:
        super().__init__()
        self.weights = weights
        self.num_classes = num_classes
        self.box_terms = box_terms
        self.dice_smooth = dice_smooth

    def forward(self, out: _StepOutputLike, target: Tensor) -> dict[str, Tensor]:
        """out: a ``StepOutput`` (logits (B, C+1, h, w), boxes (B, C, 4), presence (B, C));
        target: (B, H, W) long labels in 0..C.
        Returns {"loss", "ce", "dice", "box_l1", "box_giou", "presence"}, and "dense" when the output holds
        dense proposals (``dense.py``).
        """
        C = self.num_classes
        logits = out.logits.float()
        if logits.shape[-2:] != target.shape[-2:]:
            logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
        target = target.long()
        ce = F.cross_entropy(logits, target)  # (B, C+1, H, W) vs (B, H, W)
        probs = logits.softmax(dim=1)[:, 1:]  # (B, C, H, W) foreground
        onehot = F.one_hot(target, C + 1).permute(0, 3, 1, 2)[:, 1:].to(probs.dtype)  # (B, C, H, W)
        dice = soft_dice_loss(probs, onehot, self.dice_smooth)

        zero = logits.new_zeros(())
        use_boxes = self.box_terms if self.box_terms is not None else bool((out.boxes != 0).any())
        if use_boxes:
            gt_boxes, present = boxes_from_labels(target, C)  # (B, C, 4), (B, C)
            presence = F.binary_cross_entropy_with_logits(out.presence.float(), present.float())
            # means over the present (case, class) pairs as masked sums: no host sync on the step's path, the
            # graph connected (DDP-friendly) and exact zeros when no class is present
            pred, w = out.boxes.float(), present.float()  # (B, C, 4), (B, C)
            n = w.sum().clamp_min(1.0)
            box_l1 = ((pred - gt_boxes).abs().sum(-1) * w).sum() / n
            giou = generalized_box_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(gt_boxes))  # (B, C)
            box_giou = ((1 - giou) * w).sum() / n
        else:
            presence = box_l1 = box_giou = zero

        w = self.weights
        total = w.ce * ce + w.dice * dice + w.box_l1 * box_l1 + w.box_giou * box_giou + w.presence * presence
        terms = {"ce": ce, "dice": dice, "box_l1": box_l1, "box_giou": box_giou, "presence": presence}
        if getattr(out, "dense", None) is not None:
            terms["dense"] = dense_loss(out.dense, target)
            total = total + w.dense * terms["dense"]
        return {"loss": total, **terms}
