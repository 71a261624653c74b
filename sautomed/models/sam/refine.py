"""Box refinement by the published decoder (our addition, ``inference.sam_refine``, off by default).

The slice chain finds the organs; LiteMedSAM as published segments them. After the chain has segmented a
volume, each class's largest 3D component gives, on every slice that holds at least ``MIN_PIXELS`` of it, a
box: its bounding box grown by ``margin`` pixels of the network's input size S. LiteMedSAM exactly as its
checkpoint has it (its encoder on MedSAM's per-slice min-max input, its prompt encoder and single-mask
decoder: none of it fine-tuned) segments each box, and the classes' probabilities, against a background
score of 0.5, are the new scores (argmax: a pixel goes to the most probable class above 0.5).

Why: trained on 3 cases, the new modules that feed SAM's decoder (slice attention, history, the box queries)
fit those cases and make the decoder's masks worse on an unseen one (masks from reference boxes through the
trained network: liver 0.77 against 0.93 for LiteMedSAM as published; docs/results.md), while the chain's
boxes are good. The refiner costs one decoder call per slice that holds a box, and, where the network's
encoder is not LiteMedSAM's as published, one more encoder pass of those slices. Where it is (the frozen
start), the network's features of the volume serve the refiner too: the slices then come in the network's
per-volume normalisation, not MedSAM's per-slice min-max, which changed nothing measurable (the 4 shared
CHAOS MR cases out of fold, 2026-12-07: mean DSC 0.8785 against 0.8786, every organ and case within 0.002)
and saves an encoder pass of most slices (a seventh of the case's time on the CPU).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from sautomed.errors import UserError
from sautomed.evaluation.postprocess import keep_largest_component, logits_to_labels
from sautomed.models.sam.litemedsam import LiteMedSAM, box_of

MIN_PIXELS = 3  # a class's pixels on a slice below this: no box, no refinement there


class PretrainedBoxRefiner:
    """LiteMedSAM as published, re-segmenting the chain's boxes.

    Args:
        source: LiteMedSAM's checkpoint (a path, or ``litemedsam``: the weights cache); None: random
            weights (``sautomed bench`` times it; never used to segment).
        image_size: the network's input size S (the boxes are in pixels of S).
        margin: pixels of S added to each side of a component's bounding box.
    """

    def __init__(self, source: str | None, image_size: int, margin: int) -> None:
        if margin < 0:
            raise UserError(f"inference.sam_refine_margin must be >= 0, got {margin}")
        # source None: random weights, for `sautomed bench` (timing only; the module refuses it)
        self.sam = (
            LiteMedSAM(image_size).eval()
            if source is None
            else LiteMedSAM.from_checkpoint(source, image_size)
        )
        self.image_size, self.margin = image_size, margin

    def boxes(self, labels: np.ndarray, num_classes: int) -> list[tuple[int, int, np.ndarray]]:
        """(Z, S, S) labels -> [(slice, class, box x0 y0 x1 y1 grown by the margin, clipped to S)]."""
        S, m = self.image_size, self.margin
        out = []
        for z in range(labels.shape[0]):
            for c in range(1, num_classes + 1):
                mask = labels[z] == c
                if mask.sum() >= MIN_PIXELS:
                    box = np.clip(box_of(mask) + np.array([-m, -m, m, m], np.float32), 0, S - 1)
                    out.append((z, c, box))
        return out

    def same_encoder(self, encoder: torch.nn.Module) -> bool:
        """Whether `encoder` holds exactly the refiner's encoder weights and buffers (a frozen start)."""
        mine, theirs = self.sam.image_encoder.state_dict(), encoder.state_dict()
        return mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k].to(mine[k])) for k in mine)

    @torch.no_grad()
    def scores(
        self,
        volume: Tensor,
        logits: Tensor,
        num_classes: int,
        chunk: int = 8,
        shared: tuple[torch.nn.Module, Tensor] | None = None,
    ) -> Tensor:
        """(Z, S, S) preprocessed volume and the chain's (Z, C+1, h, w) logits -> (Z, C+1, S, S) scores.

        ``shared``: the network's encoder and its (Z, D, h, w) features of the volume as it is. When that
        encoder holds the refiner's weights (``same_encoder``) and h = S/4, they are used instead of a second
        encoder pass (module docstring)."""
        S = self.image_size
        sam = self.sam.to(volume.device)
        labels = keep_largest_component(logits_to_labels(logits, (S, S)).cpu().numpy(), num_classes)
        out = torch.zeros(volume.shape[0], num_classes + 1, S, S, device=volume.device)
        out[:, 0] = 0.5
        found = self.boxes(labels, num_classes)
        slices = sorted({z for z, _, _ in found})
        own: dict[int, Tensor] = {}
        if shared is not None and shared[1].shape[-1] * 4 == S and self.same_encoder(shared[0]):
            own = {z: shared[1][z] for z in slices}
        todo = [z for z in slices if z not in own]
        for start in range(0, len(todo), chunk):  # only the slices that hold a box
            part = todo[start : start + chunk]
            for z, f in zip(part, sam.encode(volume[part].float())):
                own[z] = f
        for z in slices:  # one decoder call per slice, all its classes' boxes at once
            here = [(c, box) for zz, c, box in found if zz == z]
            boxes = torch.from_numpy(np.stack([box for _, box in here])).to(volume.device)
            probs = sam.image_box_probabilities(own[z][None], boxes)  # (k, S, S)
            for (c, _), p in zip(here, probs):
                out[z, c] = p
        return out


def worst_case_logits(slices: int, num_classes: int, size: int) -> Tensor:
    """(slices, C+1, size, size) chain logits with every class on every slice, side by side in stripes:
    the refiner's most expensive input (one box per class and slice), for ``sautomed bench``."""
    logits = torch.zeros(slices, num_classes + 1, size, size)
    width = size // (num_classes + 1)
    for c in range(1, num_classes + 1):
        logits[:, c, size // 4 : 3 * size // 4, c * width : (c + 1) * width] = 1.0
    return logits
