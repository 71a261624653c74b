"""Iterative refinement: the crop encoded once, then N iterations of (newest click + previous logits).

Per crop (the authors' clarification and the public ``interaction`` loop)::

    E_I = net.encode(image)                                   once
    low_0 = zeros (B, 1, 4g^3);  pred_0 = empty
    for t in 1..N:
        click_t = None (the first ``prompt_free`` iterations: only the padding point)
                  else a random voxel of the error region of pred_{t-1} vs the target (clicks.py)
        low_t  = net.decode(E_I, click_t (or all clicks so far), low_{t-1})
        logits_t = upscale(low_t) (B, 1, S^3);  pred_t = logits_t > 0

The oracle clicks need the ground truth: this is the paper's (oracle-prompted) protocol. The automatic mode
(automatic.py) replaces the oracle by self-prompting. ``iterations`` is 11 in the public code and 10 in the
rebuttal; the caller chooses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from sautomed.errors import UserError
from sautomed.models.msam.clicks import ClickMode, sample_clicks
from sautomed.models.msam.consistency import Consistency, consistent_decode
from sautomed.models.msam.corrupt import mask_to_low_res
from sautomed.models.msam.merge import progressive_merge
from sautomed.models.msam.network import MSAMNet

MergeMode = bool | Literal["near"]  # False: none; True: the clicked component (FocalClick); near: S/8 of it


@dataclass(frozen=True)
class RefinementSettings:
    """Click refinement in training.

    Attributes:
        iterations: decoder iterations per crop (11 in the public code, 10 in the rebuttal).
        prompt_free_probability: chance that a crop's first iteration gets no click (only the padding
            point), so the network learns the automatic mode's prompt-free first pass.
        accumulate_clicks: every click so far instead of only the newest (the public default).
        detach_between: cut gradients between iterations (the public code keeps them).
        click_mode: ``random`` error voxel (the public code) or ``center`` of the largest error; used by the
            oracle evaluation too.
        seed: seed of the simulated clicks (combined with the step / the case).
        cutout_probability: chance that a crop of a clicked batch has a box of its lesion painted over, the
            target unchanged (``cutout.py``; our addition, 0 = off): the clicks then carry what the image
            does not, so a network trained from scratch learns to follow them.
        cutout_size: the painted box's side, as a range of fractions of the crop side.
        cutout_fill: the painted level, ``median`` outside the lesion or ``random`` (``cutout.py``).
        cutout_fake_probability: chance of a fake-lesion box outside the lesion, for negative clicks.
        corrupt_probability: chance that a clicked batch starts its refinement from corrupted copies of
            the references instead of an empty mask (``corrupt.py``; our addition, 0 = off): balls of
            lesion removed and of background added, mistakes the clicks must correct locally.
        corrupt_radius: the balls' radius, as a range of fractions of the crop side.
    """

    iterations: int = 11
    prompt_free_probability: float = 0.0
    accumulate_clicks: bool = False
    detach_between: bool = False
    click_mode: ClickMode = "random"
    seed: int = 0
    cutout_probability: float = 0.0
    cutout_size: tuple[float, float] = (0.2, 0.4)
    cutout_fill: Literal["median", "random"] = "median"
    cutout_fake_probability: float = 0.0
    corrupt_probability: float = 0.0
    corrupt_radius: tuple[float, float] = (0.06, 0.2)


@dataclass
class RefinementResult:
    """What one refinement run produced.

    Attributes:
        logits: full-size logits (B, 1, S, S, S) after each iteration.
        low_res: the last low-res logits (B, 1, 4g, 4g, 4g).
        points: (B, K, 3) all clicks given (K = iterations - prompt-free ones).
        labels: (B, K) their labels (1 positive, 0 negative).
    """

    logits: list[Tensor] = field(default_factory=list)
    low_res: Tensor | None = None
    points: Tensor | None = None
    labels: Tensor | None = None


def refine_with_clicks(
    net: MSAMNet,
    image: Tensor,
    target: Tensor,
    iterations: int,
    generator: torch.Generator | None = None,
    prompt_free: int = 0,
    accumulate_clicks: bool = False,
    detach_between: bool = False,
    click_mode: ClickMode = "random",
    merge: MergeMode = False,
    initial: Tensor | None = None,
    consistency: Consistency | None = None,
) -> RefinementResult:
    """Oracle-click refinement of a batch of crops.

    Args:
        net: the network.
        image: (B, 1, S, S, S) crops.
        target: (B, 1, S, S, S) binary reference (clicks are drawn from its error regions).
        iterations: number of decoder iterations N.
        generator: randomness of the clicks.
        prompt_free: how many leading iterations get no click (only the padding point).
        accumulate_clicks: give every click so far (SAM-Med3D's ``multi_click``) instead of only the newest
            (the public M-SAM default).
        detach_between: cut the gradient between iterations (the public code keeps it).
        click_mode: ``random`` error voxel (the public code) or ``center`` of the largest error (clicks.py).
        merge: progressive merge at inference (merge.py): from the second click on, only the change that
            the newest click asked for enters the mask: ``True`` the changed component holding the click,
            ``"near"`` every changed component within S/8 of it (the rule of a user's clicks, session.py).
        initial: (B, 1, S, S, S) bool masks to start from instead of an empty prediction (training with
            corrupted masks, corrupt.py): the first click comes from their error region, and the network
            gets them as its previous logits.
        consistency: inference only: each click's answer made to agree with every click so far
            (consistency.py); None or 0 steps: the network's answer as it is.
    """
    if iterations < 1:
        raise UserError(f"iterations must be >= 1, got {iterations}")
    emb = net.encode(image)  # (B, C, g, g, g): the only encoder call
    result = RefinementResult()
    low = None
    pred = torch.zeros_like(target, dtype=torch.bool)
    if initial is not None:
        pred = initial.bool()
        low = mask_to_low_res(pred, net.low_res_size).to(emb.dtype)
    all_points: list[Tensor] = []
    all_labels: list[Tensor] = []
    for t in range(iterations):
        if t < prompt_free:
            points = None
        else:
            p, lab = sample_clicks(pred, target > 0, generator, click_mode)  # (B, 1, 3), (B, 1)
            all_points.append(p)
            all_labels.append(lab)
            points = (torch.cat(all_points, 1), torch.cat(all_labels, 1)) if accumulate_clicks else (p, lab)
        prev = None if low is None else (low.detach() if detach_between else low)
        so_far = (torch.cat(all_points, 1), torch.cat(all_labels, 1)) if all_points else None
        size = tuple(target.shape[-3:])
        if consistency is not None and consistency.steps > 0 and so_far is not None:
            low, _ = consistent_decode(net, emb, points, prev, so_far, size, consistency)
        else:
            low = net.decode(emb, points, prev, so_far)  # (B, 1, 4g, 4g, 4g); so_far: the click maps' clicks
        logits = net.upscale(low, size)  # (B, 1, S, S, S)
        if merge and points is not None and len(all_points) > 1:  # not the first click: merge its change
            radius = max(1.0, target.shape[-1] / 8) if merge == "near" else None
            logits, low = progressive_merge(result.logits[-1], logits, prev, low, p[:, 0], lab[:, 0], radius)
        result.logits.append(logits)
        pred = logits.detach() > 0
    result.low_res = low
    if all_points:
        result.points, result.labels = torch.cat(all_points, 1), torch.cat(all_labels, 1)
    return result
