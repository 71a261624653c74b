"""Lesion cut-out in training (``RefinementSettings.cutout_probability``, our addition)."""

from __future__ import annotations

import pytest
import torch
from msam_helpers import blob_batch, tiny_config

from sautomed.models.msam.cutout import cut_out_lesion
from sautomed.models.msam.module import MSAMModule, RefinementSettings


def test_a_box_of_the_lesion_is_painted_with_the_median_outside_it_and_the_target_kept():
    image, target = blob_batch(3)
    target[2] = 0  # a crop without lesion is left alone
    gen = torch.Generator().manual_seed(0)
    out = cut_out_lesion(image, target, 1.0, (0.3, 0.3), gen)
    assert torch.equal(out[2], image[2]) and out.shape == image.shape
    for b in range(2):
        changed = out[b, 0] != image[b, 0]
        assert changed.any() and (changed & (target[b, 0] > 0)).any()  # part of the lesion is hidden
        fill = image[b, 0][(target[b, 0] == 0) & (image[b, 0] != 0)].median()
        assert torch.allclose(out[b, 0][changed], fill)
    assert torch.equal(cut_out_lesion(image, target, 0.0, (0.3, 0.3), gen), image)  # off
    again = cut_out_lesion(image, target, 1.0, (0.3, 0.3), torch.Generator().manual_seed(0))
    assert torch.equal(again, out)  # a seed repeats it


def test_the_training_step_hides_lesion_only_in_clicked_batches(monkeypatch):
    seen = []

    def module(prompt_free: float) -> MSAMModule:
        torch.manual_seed(0)
        refinement = RefinementSettings(
            iterations=2, prompt_free_probability=prompt_free, cutout_probability=1.0
        )
        m = MSAMModule(network=tiny_config(), refinement=refinement)
        m.log = lambda *a, **k: None
        original = m.net.encode
        m.net.encode = lambda x: seen.append(x.clone()) or original(x)
        return m

    image, target = blob_batch(2)
    module(0.0).training_step({"image": image, "label": target}, 0)
    assert not torch.equal(seen[-1], image)  # a clicked batch: the lesion is partly painted over
    module(1.0).training_step({"image": image, "label": target}, 0)
    assert torch.equal(seen[-1], image)  # a prompt-free batch (the automatic mode's pass) never is


def test_random_fill_paints_a_level_within_the_crop_and_fake_lesions_leave_the_lesion_alone():
    image, target = blob_batch(2)
    lesion = target[:, 0] > 0
    gen = torch.Generator().manual_seed(1)
    hidden = cut_out_lesion(image, target, 1.0, (0.3, 0.3), gen, fill="random")
    for b in range(2):
        changed = hidden[b, 0] != image[b, 0]
        levels = hidden[b, 0][changed].unique()
        nonzero = image[b, 0][image[b, 0] != 0]
        assert len(levels) == 1 and nonzero.min() <= levels[0] <= nonzero.max()
    gen = torch.Generator().manual_seed(2)
    fake = cut_out_lesion(image, target, 0.0, (0.3, 0.3), gen, fake_probability=1.0)
    for b in range(2):
        changed = fake[b, 0] != image[b, 0]
        assert changed.any() and not (changed & lesion[b]).any()  # painted outside the lesion only
        assert torch.allclose(fake[b, 0][changed], image[b, 0][lesion[b]].median())
    plain = cut_out_lesion(image, target, 1.0, (0.3, 0.3), torch.Generator().manual_seed(0))
    same = cut_out_lesion(image, target, 1.0, (0.3, 0.3), torch.Generator().manual_seed(0), "median", 0.0)
    assert torch.equal(plain, same)  # the defaults draw as before
    with pytest.raises(ValueError, match="fill"):
        cut_out_lesion(image, target, 1.0, (0.3, 0.3), gen, fill="noise")
