"""Teacher-forced box prompts (``model.box_teacher_forcing``, ``models/sautomed/teacher.py``)."""

from __future__ import annotations

import pytest
import torch
from model_helpers import C, S, make_net, phantom_images, phantom_labels

from sautomed.models.sautomed.boxes import box_cxcywh_to_xyxy, boxes_from_labels
from sautomed.models.sautomed.loss import LossWeights
from sautomed.models.sautomed.module import SAutoMedModule
from sautomed.models.sautomed.network import NetworkConfig
from sautomed.models.sautomed.teacher import teacher_boxes


def test_teacher_boxes_are_the_reference_boxes_moved_by_at_most_the_jitter():
    labels = phantom_labels(3)
    ref, present = boxes_from_labels(labels, C)
    same, same_present = teacher_boxes(labels, C, 0.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(same, ref)
    assert torch.equal(same_present, present) and present[:, :4].all() and not present[:, 4:].any()
    moved, _ = teacher_boxes(labels, C, 0.2, torch.Generator().manual_seed(0))
    a, b = box_cxcywh_to_xyxy(ref)[present], box_cxcywh_to_xyxy(moved)[present]
    wh = ref[present][:, 2:].repeat(1, 2)
    shift = (a - b).abs()
    assert (shift <= 0.2 * wh + 1e-6).all() and (shift > 0).any()
    again, _ = teacher_boxes(labels, C, 0.2, torch.Generator().manual_seed(0))
    assert torch.equal(moved, again)  # a seed repeats the draws


def test_forced_boxes_replace_the_prompt_of_the_chosen_classes_only():
    net = make_net(decoder="per_class", encoder_finetune="full", lora_rank=0).eval()
    labels = phantom_labels(2)
    f = net.encode(phantom_images(labels))  # (2, D, h, w)
    state = net.initial_state(2)
    boxes, _ = boxes_from_labels(labels, C)
    none = torch.zeros(2, C, dtype=torch.bool)
    use = none.clone()
    use[1, 2] = True  # sample 1, class 3
    with torch.no_grad():
        free = net.step(f, f, f, state)
        unforced = net.step(f, f, f, state, (boxes, none))
        forced = net.step(f, f, f, state, (boxes, use))
    torch.testing.assert_close(unforced.logits, free.logits)
    torch.testing.assert_close(forced.boxes, free.boxes)  # the generator's boxes, for its losses
    changed = (forced.logits - free.logits).abs().amax(dim=(2, 3))  # (B, C+1)
    assert changed[1, 3] > 1e-4
    changed[1, 3] = 0
    assert changed.max() < 1e-5  # per-class decoder: no other class or sample moves


def _module(forcing: float) -> SAutoMedModule:
    torch.manual_seed(0)
    cfg = NetworkConfig(
        backbone="tiny", image_size=S, num_classes=C, encoder_finetune="full", decoder="per_class"
    )
    m = SAutoMedModule(network=cfg, loss=LossWeights(warmup=1.0), box_teacher_forcing=forcing)
    m.log = lambda *a, **k: None  # no trainer
    return m


def _batch() -> dict[str, torch.Tensor]:
    labels = torch.stack([phantom_labels(2, shift=z) for z in range(4)], dim=1)  # (2, 4, S, S)
    return {
        "image": phantom_images(labels[:, [0, 0, 1, 2, 3]]),  # (B, n+3 = 5, S, S), n = 2
        "index": torch.tensor([[0, 0, 1, 2, 3], [0, 0, 1, 2, 3]]),
        "label": labels[:, 2],
        "warmup_label": labels[:, :2],
        "direction": torch.tensor([1, 1]),
    }


def test_teacher_forcing_changes_the_training_loss_and_still_trains_the_generator():
    batch = _batch()
    base = _module(0.0).training_step(batch, 0)
    m = _module(1.0)
    forced = m.training_step(batch, 0)
    assert not torch.isclose(forced.detach(), base.detach())
    forced.backward()
    last = m.net.box_prompt.bbox_head.layers[-1]  # zero-initialised: the layer that gets the first gradient
    assert last.weight.grad is not None and last.weight.grad.abs().sum() > 0  # box losses reach it
    del batch["warmup_label"]
    with pytest.raises(ValueError, match="warm-up slices' labels"):
        m.training_step(batch, 0)


def test_teacher_forcing_is_refused_without_box_prompts_or_out_of_range():
    cfg = NetworkConfig(backbone="tiny", image_size=S, encoder_finetune="full", box_prompts=False)
    with pytest.raises(ValueError, match="needs network.box_prompts"):
        SAutoMedModule(network=cfg, box_teacher_forcing=0.5)
    with pytest.raises(ValueError, match="box_teacher_forcing must be in"):
        SAutoMedModule(network=NetworkConfig(backbone="tiny", encoder_finetune="full"), box_teacher_forcing=2)
