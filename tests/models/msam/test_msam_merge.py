"""Progressive merge of the click refinement at inference (``evaluation.merge``, our addition)."""

from __future__ import annotations

import numpy as np
import torch

from sautomed.models.msam.merge import merge_region, progressive_merge


def _masks() -> tuple[np.ndarray, np.ndarray]:
    old = np.zeros((12, 12, 12), bool)
    old[2:6, 2:6, 2:6] = True  # right before the click
    new = old.copy()
    new[2:6, 2:6, 7:10] = True  # the network adds a blob at the click ...
    new[8:11, 8:11, 8:11] = True  # ... and another one far away
    new[2:4, 2:6, 2:6] = False  # ... and removes part of what was right
    return old, new


def test_a_positive_click_adds_only_the_added_component_holding_it():
    old, new = _masks()
    region = merge_region(old, new, (3, 3, 8), positive=True)
    assert region.sum() == 4 * 4 * 3 and region[3, 3, 8] and not region[9, 9, 9]
    assert not merge_region(old, new, (3, 3, 3), positive=True).any()  # the click's voxel did not change


def test_a_negative_click_removes_only_the_removed_component_holding_it():
    old, new = _masks()
    region = merge_region(old, new, (2, 3, 3), positive=False)
    assert region.sum() == 2 * 4 * 4 and not merge_region(old, new, (9, 9, 9), positive=False).any()


def test_merged_logits_keep_the_previous_ones_outside_the_region():
    old, new = _masks()
    old_logits = torch.from_numpy(np.where(old, 3.0, -3.0)).float()[None, None]
    new_logits = torch.from_numpy(np.where(new, 2.0, -2.0)).float()[None, None]
    old_low, new_low = torch.full((1, 1, 3, 3, 3), -1.0), torch.full((1, 1, 3, 3, 3), 1.0)
    logits, low = progressive_merge(
        old_logits, new_logits, old_low, new_low, torch.tensor([[3, 3, 8]]), torch.tensor([1])
    )
    mask = logits[0, 0] > 0
    assert torch.equal(mask, torch.from_numpy(old | merge_region(old, new, (3, 3, 8), True)))
    assert logits[0, 0, 3, 3, 8] == 2.0 and logits[0, 0, 3, 3, 3] == 3.0  # new inside, old outside
    assert low[0, 0, 0, 0, 2] == 1.0 and low[0, 0, 2, 2, 0] == -1.0  # the low-res cells alike


def test_with_merge_each_click_changes_at_most_one_component_holding_it():
    from msam_helpers import blob_batch, tiny_config
    from scipy import ndimage

    from sautomed.models.msam.network import MSAMNet
    from sautomed.models.msam.refinement import refine_with_clicks

    torch.manual_seed(0)
    net = MSAMNet(tiny_config()).eval()
    image, target = blob_batch(1)
    with torch.no_grad():
        res = refine_with_clicks(net, image, target, 5, torch.Generator().manual_seed(0), merge=True)
        plain = refine_with_clicks(net, image, target, 5, torch.Generator().manual_seed(0))
    assert torch.equal(res.logits[0], plain.logits[0])  # the first click takes the whole prediction
    assert torch.equal(res.points[:, :2], plain.points[:, :2])
    assert not all(torch.equal(a > 0, b > 0) for a, b in zip(res.logits[1:], plain.logits[1:]))  # merged
    masks = [(lg[0, 0] > 0).numpy() for lg in res.logits]
    for t in range(1, len(masks)):
        changed = masks[t] ^ masks[t - 1]
        point = tuple(int(v) for v in res.points[0, t])
        if changed.any():
            labels, n = ndimage.label(changed, structure=np.ones((3, 3, 3), bool))
            assert n == 1 and changed[point]  # one region, the one holding the newest click
            assert masks[t][point] == bool(res.labels[0, t])  # and it now agrees with the click
