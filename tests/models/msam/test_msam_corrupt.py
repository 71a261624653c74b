"""Corrupted previous masks in training (``RefinementSettings.corrupt_probability``, our addition)."""

from __future__ import annotations

import torch
from msam_helpers import blob_batch, tiny_config

from sautomed.models.msam import refinement as refinement_mod
from sautomed.models.msam.corrupt import corrupt_masks, mask_to_low_res
from sautomed.models.msam.module import MSAMModule, RefinementSettings


def test_every_crop_gets_lesion_removed_and_background_added_and_a_seed_repeats_it():
    _, target = blob_batch(3)
    target[2] = 0  # a crop without lesion still gets a false positive to click
    out = corrupt_masks(target, (0.1, 0.2), torch.Generator().manual_seed(0))
    assert out.shape == target.shape and out.dtype == torch.bool
    lesion = target > 0
    for b in range(2):
        assert (lesion[b] & ~out[b]).any() and (out[b] & ~lesion[b]).any()  # a miss and a false alarm
        assert (out[b] & lesion[b]).any()  # not all of it: the rest stays right
    assert out[2].any() and not lesion[2].any()
    again = corrupt_masks(target, (0.1, 0.2), torch.Generator().manual_seed(0))
    assert torch.equal(again, out)


def test_low_res_logits_of_a_mask_have_its_sign():
    mask = torch.zeros(1, 1, 16, 16, 16, dtype=torch.bool)
    mask[..., :8, :, :] = True
    low = mask_to_low_res(mask, (4, 4, 4), magnitude=6.0)
    assert low.shape == (1, 1, 4, 4, 4)
    assert torch.all(low[..., :2, :, :] == 6.0) and torch.all(low[..., 2:, :, :] == -6.0)


def test_the_refinement_starts_from_the_corrupted_mask_and_clicks_its_error(monkeypatch):
    torch.manual_seed(0)
    settings = RefinementSettings(iterations=2, corrupt_probability=1.0)
    m = MSAMModule(network=tiny_config(), refinement=settings)
    m.log = lambda *a, **k: None
    seen = []
    original = refinement_mod.sample_clicks

    def spy(pred, target, generator=None, mode="random"):
        seen.append((pred.clone(), target.clone()))
        return original(pred, target, generator, mode)

    monkeypatch.setattr(refinement_mod, "sample_clicks", spy)
    image, target = blob_batch(2)
    loss = m.training_step({"image": image, "label": target}, 0)
    first_pred, first_target = seen[0]
    assert first_pred.any() and not torch.equal(first_pred, first_target)  # a corrupted mask, not empty
    assert torch.isfinite(loss)
    loss.backward()  # the corrupted start keeps the graph trainable
    seen.clear()
    plain = MSAMModule(network=tiny_config(), refinement=RefinementSettings(iterations=2))
    plain.log = lambda *a, **k: None
    plain.training_step({"image": image, "label": target}, 0)
    assert not seen[0][0].any()  # off: the first click comes from an empty prediction
