"""An ensemble of trained models, as nnU-Net ensembles its folds and configurations: every member's class
probabilities on the input's grid are averaged before the argmax.

Members may be folds of one config or configs of different families, provided they predict the same classes
in the same order from the same preprocessed input (normalisation, window, image size, channels); anything
else is refused in one line that names the difference. Each member segments with its own inference settings
(a LiteMedSAM refinement included); the ensemble's own largest-component step is ``predict --keep-largest``
with the classes ``sautomed crossval`` chose on the folds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor

from sautomed.errors import UserError
from sautomed.evaluation.base import SegmentationModule, input_mismatch
from sautomed.evaluation.tta import tta_probabilities
from sautomed.writers import prediction_item


class Ensemble(L.LightningModule):
    """Averages its members' ``case_probabilities``; ``names`` label the members in messages."""

    def __init__(self, members: Sequence[SegmentationModule], names: Sequence[str]) -> None:
        super().__init__()
        if len(members) < 2:
            raise UserError("an ensemble needs at least two checkpoints")
        first = members[0]
        if first.preprocessing is None:
            raise UserError(f"{names[0]}: the checkpoint carries no preprocessing settings")
        for member, name in zip(members[1:], names[1:], strict=True):
            pre = member.preprocessing or {}
            problem = input_mismatch(
                first.class_names, first.preprocessing, member.class_names, pre, name, names[0]
            )
            if problem is not None:
                raise UserError(f"an ensemble needs one input and one class list: {problem}")
            if getattr(member, "input_channels", 1) != getattr(first, "input_channels", 1):
                raise UserError(f"{name} reads another number of input channels than {names[0]}")
        self.members = torch.nn.ModuleList(members)
        self.class_names: tuple[str, ...] = tuple(first.class_names)
        self.preprocessing: dict[str, Any] = dict(first.preprocessing)
        self.input_channels = int(getattr(first, "input_channels", 1))
        self.tta = False  # each member's probabilities under test-time augmentation (evaluation/tta.py)
        self.save_probabilities = False  # predict --save-probabilities: the mean is written beside the labels
        self.keep_largest: tuple[int, ...] = ()  # predict --keep-largest (chosen by crossval on the folds)
        self.supports_tta = all(m.supports_tta for m in members)

    def case_probabilities(self, image: Tensor, geom: Any) -> Tensor:
        """The members' mean (Z, C+1, Y, X) class probabilities on the original grid."""
        total = None
        for member in self.members:
            p = tta_probabilities(member, image, geom) if self.tta else member.case_probabilities(image, geom)
            total = p if total is None else total + p
        return total / len(self.members)

    def segment_case(self, image: Tensor, geom: Any) -> np.ndarray:
        return self.case_probabilities(image, geom).argmax(1).to(torch.uint8).cpu().numpy()

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        if not self.save_probabilities:
            return prediction_item(batch, self.segment_case, False, self.keep_largest)

        def segment(image: Tensor, geom: Any) -> tuple[np.ndarray, Tensor]:  # the labels: the mean's argmax
            mean = self.case_probabilities(image, geom)
            return mean.argmax(1).to(torch.uint8).cpu().numpy(), mean

        return prediction_item(batch, segment, True, self.keep_largest)
