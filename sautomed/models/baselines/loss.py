"""MONAI's Dice + cross-entropy loss, summed over deep-supervision heads with nnU-Net's weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from monai.losses import DiceCELoss
from torch import Tensor, nn


@dataclass(frozen=True)
class BaselineLoss:
    """Loss settings.

    Args:
        dice: weight of the soft Dice term (foreground classes, Dice over the whole batch as nnU-Net does).
        ce: weight of the cross-entropy term (all classes).
    """

    dice: float = 1.0
    ce: float = 1.0


class DeepSupervisionDiceCE(nn.Module):
    """DiceCE on the full-resolution output and each supervision head, weighted 1, 1/2, 1/4, ... (normalised).

    forward(logits, labels): logits (B, C+1, *spatial) or, with deep supervision, (B, 1 + heads, C+1,
    *spatial); labels (B, *spatial) long. Returns {"loss", "dice_ce_full"}: the weighted sum and the
    full-resolution term alone.
    """

    def __init__(self, weights: BaselineLoss) -> None:
        super().__init__()
        self.loss = DiceCELoss(
            include_background=False,
            to_onehot_y=True,
            softmax=True,
            batch=True,
            lambda_dice=weights.dice,
            lambda_ce=weights.ce,
        )

    def forward(self, logits: Tensor, labels: Tensor) -> dict[str, Tensor]:
        target = labels[:, None]  # (B, 1, *spatial), class indices as DiceCELoss takes them
        heads = logits.unbind(1) if logits.ndim == labels.ndim + 2 else (logits,)
        w = torch.tensor([0.5**k for k in range(len(heads))])
        w = w / w.sum()
        terms = [self.loss(h.float(), target) for h in heads]
        return {"loss": sum(wk * t for wk, t in zip(w.tolist(), terms)), "dice_ce_full": terms[0].detach()}
