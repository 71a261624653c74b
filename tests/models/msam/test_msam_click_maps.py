"""Click maps (``MSAMConfig.click_maps``, our addition): the clicks as dense maps in the mask branch."""

from __future__ import annotations

import pytest
import torch
from msam_helpers import blob_batch, make_net

from sautomed.models.msam.checkpoint import export_sam_med3d, load_sam_med3d
from sautomed.models.msam.prompt3d import click_maps
from sautomed.models.msam.refinement import refine_with_clicks


def test_click_maps_put_each_click_in_its_channel_at_its_place():
    points = torch.tensor([[[10, 20, 30], [2, 3, 4], [0, 0, 0]]])
    labels = torch.tensor([[1, 0, -1]])  # positive, negative, padding (ignored)
    maps = click_maps(points, labels, (16, 16, 16), (32, 32, 32), sigma=1.0)
    assert maps.shape == (1, 2, 16, 16, 16)
    pos, neg = maps[0, 0], maps[0, 1]
    assert tuple(torch.nonzero(pos == pos.max())[0].tolist()) == (5, 10, 15)  # voxel // 2
    assert tuple(torch.nonzero(neg == neg.max())[0].tolist()) == (1, 1, 2)
    assert pos.max() > 0.5 and pos[1, 1, 2] < 1e-6 and neg[5, 10, 15] < 1e-6  # each click in its own map
    assert neg[0, 0, 0] < neg[1, 1, 2]  # the padding point at the origin made no blob there
    empty = click_maps(points[:, :0], labels[:, :0], (16, 16, 16), (32, 32, 32), 1.0)
    assert torch.equal(empty, torch.zeros(1, 2, 16, 16, 16))


def test_the_maps_change_the_output_and_take_every_click_so_far(monkeypatch):
    net = make_net(click_maps=True).eval()
    image, target = blob_batch(1)
    emb = net.encode(image)
    newest = (torch.tensor([[[16, 16, 16]]]), torch.tensor([[1]]))
    older = (torch.tensor([[[16, 16, 16], [4, 4, 4]]]), torch.tensor([[1, 0]]))
    with torch.no_grad():
        one = net.decode(emb, newest, None)  # the maps default to the given points
        two = net.decode(emb, newest, None, older)  # the same token, a second click in the maps
    assert not torch.allclose(one, two)
    seen = []
    original = type(net).decode
    monkeypatch.setattr(
        type(net), "decode", lambda self, e, p, prev, c=None: seen.append(c) or original(self, e, p, prev, c)
    )
    refine_with_clicks(net, image, target, 4, torch.Generator().manual_seed(0), prompt_free=1)
    assert seen[0] is None and [c[0].shape[1] for c in seen[1:]] == [1, 2, 3]


def test_a_sam_med3d_checkpoint_loads_with_the_map_inputs_at_zero_and_export_refuses():
    plain = make_net(seed=0, fusion="sum").eval()
    maps = make_net(seed=1, fusion="sum", click_maps=True).eval()
    report = load_sam_med3d(maps, export_sam_med3d(plain))
    assert "prompt_encoder.mask_downscaling.0.weight" in report.interpolated
    image, _ = blob_batch(1)
    points = (torch.tensor([[[9, 10, 11]]]), torch.tensor([[1]]))
    with torch.no_grad():  # the maps' weights are zero: the network is SAM-Med3D's, clicks or not
        torch.testing.assert_close(maps(image, points), plain(image, points), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="no SAM-Med3D equivalent"):
        export_sam_med3d(maps)
