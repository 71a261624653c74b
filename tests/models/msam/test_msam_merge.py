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


class _GlobalNet:
    """A stand-in network that answers clicks globally: a ball at the click takes the click's sign, and from
    the second click on a far corner blob (never lesion) switches on as well, as the trained network's
    masks grew on unseen cases."""

    low_res_size = (16, 16, 16)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        return image

    def upscale(self, low: torch.Tensor, size=None) -> torch.Tensor:
        return low

    def decode(self, emb, points, prev, clicks=None) -> torch.Tensor:
        out = torch.full((1, 1, 16, 16, 16), -1.0) if prev is None else prev.clone()
        p, lab = points[0][0, -1].tolist(), int(points[1][0, -1])
        z, y, x = torch.meshgrid(*[torch.arange(16)] * 3, indexing="ij")
        ball = (z - p[0]) ** 2 + (y - p[1]) ** 2 + (x - p[2]) ** 2 <= 4
        out[0, 0][ball] = 1.0 if lab else -1.0
        if prev is not None:
            out[0, 0, 13:, 13:, 13:] = 1.0  # the global side effect
        return out


def test_with_merge_each_click_changes_only_the_component_holding_it():
    from scipy import ndimage

    from sautomed.models.msam.refinement import refine_with_clicks

    target = torch.zeros(1, 1, 16, 16, 16)
    target[0, 0, 3:10, 3:10, 3:10] = 1
    image = torch.zeros_like(target)
    net = _GlobalNet()
    res = refine_with_clicks(net, image, target, 6, torch.Generator().manual_seed(0), merge=True)
    plain = refine_with_clicks(net, image, target, 6, torch.Generator().manual_seed(0))
    assert torch.equal(res.logits[0], plain.logits[0])  # the first click takes the whole prediction
    corner = (slice(13, None),) * 3
    assert all((lg[0, 0][corner] > 0).all() for lg in plain.logits[1:])  # unmerged: the side effect
    masks = [(lg[0, 0] > 0).numpy() for lg in res.logits]
    assert not any(m[corner].any() for m in masks)  # merged: never, no click asked for it
    changes = 0
    for t in range(1, len(masks)):
        changed = masks[t] ^ masks[t - 1]
        point = tuple(int(v) for v in res.points[0, t])
        if changed.any():
            changes += 1
            _, n = ndimage.label(changed, structure=np.ones((3, 3, 3), bool))
            assert n == 1 and changed[point]  # one region, the one holding the newest click
            assert masks[t][point] == bool(res.labels[0, t])  # and it now agrees with the click
    assert changes >= 2


def test_a_users_click_takes_the_regions_the_network_changed_near_it_even_off_its_voxel():
    from sautomed.models.msam.merge import merge_near

    old = np.zeros((20, 20, 20), bool)
    new = old.copy()
    new[5:9, 5:9, 5:9] = True  # grown 2 voxels from the click, not on it
    new[15:18, 15:18, 15:18] = True  # grown far away
    region = merge_near(old, new, (3, 3, 3), positive=True, radius=4)
    assert region[5:9, 5:9, 5:9].all() and not region[15:18, 15:18, 15:18].any()
    assert not merge_near(old, new, (3, 3, 3), positive=True, radius=2).any()  # nothing that close
    assert not merge_near(old, new, (3, 3, 3), positive=False, radius=4).any()  # nothing removed
    removed = merge_near(new, old, (12, 12, 12), positive=False, radius=7)  # a negative click between them
    assert removed[5:9, 5:9, 5:9].all() and removed[15:18, 15:18, 15:18].all()


def test_near_merge_in_the_oracle_refinement_keeps_far_side_effects_out():
    from sautomed.models.msam.refinement import refine_with_clicks

    target = torch.zeros(1, 1, 16, 16, 16)
    target[0, 0, 3:10, 3:10, 3:10] = 1
    image = torch.zeros_like(target)
    res = refine_with_clicks(_GlobalNet(), image, target, 6, torch.Generator().manual_seed(0), merge="near")
    corner = (slice(13, None),) * 3
    masks = [(lg[0, 0] > 0).numpy() for lg in res.logits]
    assert not any(m[corner].any() for m in masks)  # 2 voxels of a 16^3 crop: the corner is far
    assert any((masks[t] ^ masks[t - 1]).any() for t in range(1, len(masks)))  # the clicks still act
