"""M-SAM's segmentation loss: soft Dice + binary cross-entropy on full-size logits, over the iterations.

The public code uses MONAI's ``DiceCELoss(sigmoid=True, squared_pred=True)`` on every iteration's upsampled
logits and sums over the 11 iterations; the rebuttal says the loss is taken after the last iteration only.
Both are settings (``iterations``: ``all`` sums, ``last`` takes the final one); the default follows the code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch.nn.functional as F
from torch import Tensor

from sautomed.errors import UserError


@dataclass(frozen=True)
class LossSettings:
    """Weights and reduction of the loss.

    Attributes:
        dice: weight of the soft Dice term (squared predictions in the denominator, per sample).
        bce: weight of the binary cross-entropy term.
        iterations: ``all`` (sum over refinement iterations; the public code) or ``last`` (the rebuttal).
    """

    dice: float = 1.0
    bce: float = 1.0
    iterations: Literal["all", "last"] = "all"


def soft_dice_loss_3d(logits: Tensor, target: Tensor, smooth: float = 1e-5) -> Tensor:
    """1 - mean over samples of ``(2 sum(p t) + s) / (sum(p^2) + sum(t^2) + s)``; (B, 1, D, H, W) each."""
    p = logits.float().sigmoid().flatten(1)
    t = target.float().flatten(1)
    dice = (2 * (p * t).sum(1) + smooth) / ((p * p).sum(1) + (t * t).sum(1) + smooth)
    return 1 - dice.mean()


def dice_bce(logits: Tensor, target: Tensor, settings: LossSettings = LossSettings()) -> Tensor:  # noqa: B008
    """Weighted soft Dice + BCE of one iteration's logits against a binary target, both (B, 1, D, H, W)."""
    bce = F.binary_cross_entropy_with_logits(logits.float(), target.float())
    return settings.dice * soft_dice_loss_3d(logits, target) + settings.bce * bce


def refinement_loss(
    logits: list[Tensor],
    target: Tensor,
    settings: LossSettings = LossSettings(),  # noqa: B008
) -> Tensor:
    """The loss of a refinement run: each iteration's full-size logits (B, 1, D, H, W) vs the target."""
    if not logits:
        raise UserError("no iterations to take the loss of")
    chosen = logits if settings.iterations == "all" else logits[-1:]
    total = dice_bce(chosen[0], target, settings)
    for out in chosen[1:]:
        total = total + dice_bce(out, target, settings)
    return total
