"""Boxes of label maps, GIoU, and the named loss terms."""

from __future__ import annotations

import pytest
import torch

from sautomed.models.sautomed.boxes import (
    box_cxcywh_to_xyxy,
    box_xyxy_to_cxcywh,
    boxes_from_labels,
    generalized_box_iou,
)
from sautomed.models.sautomed.loss import LossWeights, SAutoMedLoss
from sautomed.models.sautomed.network import State, StepOutput


def test_boxes_from_labels_hand_computed():
    labels = torch.zeros(2, 8, 10, dtype=torch.long)  # H = 8, W = 10
    labels[0, 2:5, 3:7] = 1  # rows 2..4, cols 3..6
    labels[0, 7, 9] = 2  # a single pixel in the corner
    labels[1, 0:8, 0:10] = 3  # everything
    boxes, present = boxes_from_labels(labels, num_classes=3)
    assert present.tolist() == [[True, True, False], [False, False, True]]
    # class 1: x0 = 3/10, x1 = 7/10, y0 = 2/8, y1 = 5/8
    assert torch.allclose(boxes[0, 0], torch.tensor([0.5, 0.4375, 0.4, 0.375]))
    assert torch.allclose(boxes[0, 1], torch.tensor([0.95, 0.9375, 0.1, 0.125]))
    assert torch.allclose(boxes[1, 2], torch.tensor([0.5, 0.5, 1.0, 1.0]))
    assert not boxes[0, 2].any() and not boxes[1, :2].any()  # absent: zeros
    # a disconnected class spans both parts
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    labels[0, 0, 0] = labels[0, 3, 2] = 1
    boxes, _ = boxes_from_labels(labels, 1)
    assert torch.allclose(box_cxcywh_to_xyxy(boxes[0, 0]), torch.tensor([0.0, 0.0, 0.75, 1.0]))


def test_box_formats_and_giou():
    b = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.3, 0.6, 0.1, 0.1]])
    assert torch.allclose(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(b)), b)
    xyxy = box_cxcywh_to_xyxy(b)
    assert torch.allclose(generalized_box_iou(xyxy, xyxy), torch.ones(2), atol=1e-4)
    a = torch.tensor([0.0, 0.0, 0.2, 0.2])
    c = torch.tensor([0.4, 0.0, 0.6, 0.2])  # disjoint: IoU 0, hull 0.6 x 0.2, union 0.08
    assert generalized_box_iou(a, c).item() == pytest.approx(-(0.12 - 0.08) / 0.12, abs=1e-5)
    d = torch.tensor([0.1, 0.0, 0.3, 0.2])  # half overlap: IoU = 0.02 / 0.06
    assert generalized_box_iou(a, d).item() == pytest.approx(1 / 3, abs=1e-5)


def _perfect_output(target: torch.Tensor, num_classes: int, boxes: bool = True) -> StepOutput:
    onehot = torch.nn.functional.one_hot(target, num_classes + 1).permute(0, 3, 1, 2).float()
    logits = (onehot * 40 - 20)[..., ::4, ::4]  # at S/4, like the network
    logits = torch.nn.functional.interpolate(logits, scale_factor=4, mode="nearest")
    gt_boxes, present = boxes_from_labels(target, num_classes)
    B = target.shape[0]
    box_out = gt_boxes if boxes else torch.zeros(B, num_classes, 4)
    presence = (present.float() * 40 - 20) if boxes else torch.zeros(B, num_classes)
    state = State(None, gt_boxes, present)
    return StepOutput(logits, box_out, presence, state)


def _target() -> torch.Tensor:
    t = torch.zeros(2, 32, 32, dtype=torch.long)
    t[0, 4:12, 8:20] = 1
    t[0, 16:28, 16:28] = 2
    t[1, 0:8, 0:8] = 3
    return t


def test_perfect_prediction_has_near_zero_loss():
    target = _target()
    terms = SAutoMedLoss(LossWeights(), num_classes=3)(_perfect_output(target, 3), target)
    assert set(terms) == {"loss", "ce", "dice", "box_l1", "box_giou", "presence"}
    for name, value in terms.items():
        assert value.item() == pytest.approx(0.0, abs=1e-4), name


def test_loss_terms_and_weights():
    target = _target()
    out = _perfect_output(target, 3)
    bad = out._replace(
        logits=torch.zeros_like(out.logits).requires_grad_(),
        boxes=(out.boxes + 0.05).requires_grad_(),
        presence=torch.zeros_like(out.presence).requires_grad_(),
    )
    w = LossWeights(ce=1.0, dice=2.0, box_l1=3.0, box_giou=4.0, presence=5.0)
    terms = SAutoMedLoss(w, 3)(bad, target)
    assert terms["ce"].item() == pytest.approx(torch.log(torch.tensor(4.0)).item(), abs=1e-5)
    assert terms["box_l1"].item() == pytest.approx(0.2, abs=1e-5)  # 4 coords x 0.05, present boxes only
    assert terms["presence"].item() == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-5)
    assert 0 < terms["dice"].item() < 1 and 0 < terms["box_giou"].item() < 1
    total = sum(getattr(w, k) * terms[k] for k in ("ce", "dice", "box_l1", "box_giou", "presence"))
    assert torch.allclose(terms["loss"], total)
    terms["loss"].backward()
    assert bad.boxes.grad is not None and bad.presence.grad is not None


def test_box_terms_are_zero_without_box_prompts():
    target = _target()
    out = _perfect_output(target, 3, boxes=False)
    terms = SAutoMedLoss(LossWeights(), 3)(out, target)  # auto: all-zero boxes = no box head
    assert terms["box_l1"] == 0 and terms["box_giou"] == 0 and terms["presence"] == 0
    terms = SAutoMedLoss(LossWeights(), 3, box_terms=False)(_perfect_output(target, 3), target)
    assert terms["box_l1"] == 0 and terms["presence"] == 0


def test_empty_slice_gives_finite_box_terms():
    target = torch.zeros(2, 16, 16, dtype=torch.long)
    out = _perfect_output(target, 3)
    out = out._replace(boxes=torch.rand(2, 3, 4, requires_grad=True))
    terms = SAutoMedLoss(LossWeights(), 3)(out, target)
    assert terms["box_l1"] == 0 and terms["box_giou"] == 0
    assert all(torch.isfinite(v) for v in terms.values())
    terms["loss"].backward()


def test_hard_dice_per_class_scores_each_class_and_leaves_absent_ones_nan():
    from sautomed.models.sautomed.loss import hard_dice_per_class

    target = torch.zeros(2, 8, 8, dtype=torch.long)
    target[:, :4, :4] = 1  # 16 pixels of class 1 per slice; class 2 nowhere; class 3 only predicted
    logits = torch.zeros(2, 4, 8, 8)
    logits[:, 1, :4, :2] = 5.0  # class 1 predicted on the left half of its square (8 of 16 pixels)
    logits[:, 3, 6:, 6:] = 5.0  # class 3 predicted where nothing is
    dsc = hard_dice_per_class(logits, target, 3)
    assert dsc[0].item() == pytest.approx(2 * 8 / (8 + 16))
    assert torch.isnan(dsc[1]) and dsc[2].item() == 0.0
