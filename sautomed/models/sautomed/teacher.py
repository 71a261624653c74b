"""Teacher-forced box prompts in training: the decoder sometimes gets a jittered reference box.

With a pretrained SAM decoder and a few training cases, a decoder that only ever sees the generator's
(early on, poor) boxes learns to distrust its box and to segment from the new modules' context instead,
and that is what overfits the training cases (docs/results.md: the trained decoder given the reference
boxes of a held-out case scores 0.77 where LiteMedSAM as published scores 0.93). Forcing keeps SAM's box
skill in use: for a chosen sample, each class present in the slice's reference gets the reference box with
MedSAM-style jitter (each side moved by up to ``jitter`` of the box size) as its prompt, in place of the
generator's box. The generator is still trained by its own box and presence losses, and inference always
uses the generator's boxes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sautomed.errors import UserError
from sautomed.models.sautomed.boxes import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, boxes_from_labels


def teacher_boxes(
    label: Tensor, num_classes: int, jitter: float, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Jittered reference boxes of the classes in a slice.

    Args:
        label: (B, H, W) reference labels of the slice (0..C).
        num_classes: C.
        jitter: each box side moves by a uniform amount in [-jitter, jitter] times the box's width / height.
        generator: randomness (CPU generator; a seed repeats the draws).

    Returns:
        boxes (B, C, 4) cxcywh in [0, 1], present (B, C) bool (where the class is in the slice).
    """
    boxes, present = boxes_from_labels(label, num_classes)  # (B, C, 4), (B, C)
    B = label.shape[0]
    noise = (torch.rand(B, num_classes, 4, generator=generator) * 2 - 1) * jitter  # (B, C, 4)
    xyxy = box_cxcywh_to_xyxy(boxes)
    wh = boxes[..., 2:].repeat(1, 1, 2)  # (B, C, 4): w, h, w, h
    xyxy = (xyxy + noise.to(boxes.device) * wh).clamp(0.0, 1.0)
    lo, hi = torch.minimum(xyxy[..., :2], xyxy[..., 2:]), torch.maximum(xyxy[..., :2], xyxy[..., 2:])
    jittered = box_xyxy_to_cxcywh(torch.cat([lo, hi], dim=-1))
    return jittered, present


def forced_boxes(
    batch: dict[str, Tensor], n: int, chance: float, jitter: float, seed: int, num_classes: int
) -> list[tuple[Tensor, Tensor] | None]:
    """Teacher-forced prompts of a training chain's n warm-ups and its target (None where not forced).

    ``chance``: the share of the batch's samples forced (the same samples along the chain); ``seed``: the
    draws' seed (the module passes one per step and rank, so a run repeats)."""
    if chance <= 0:
        return [None] * (n + 1)
    labels = [batch["label"]]
    if n:
        if batch.get("warmup_label") is None:
            raise UserError("model.box_teacher_forcing needs the warm-up slices' labels")
        labels = [*batch["warmup_label"].unbind(1), batch["label"]]  # n x (B, S, S), then the target
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.rand(batch["label"].shape[0], generator=gen) < chance
    out: list[tuple[Tensor, Tensor] | None] = []
    for lab in labels:
        boxes, use = teacher_boxes(lab, num_classes, jitter, gen)
        out.append((boxes, use & chosen.to(use.device).unsqueeze(1)))
    return out
