"""A user's clicks (models/msam/session.py): where a click in mm or in voxels lands, the session's window,
merge and output grid, and the clicks file's refusals. The network here is a transparent double (a ball of
lesion grows at a positive click, is cut at a negative one), so what is tested is the session, not training;
tests/test_msam_accuracy.py runs a trained tiny M-SAM."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from torch import nn

from sautomed.data.io import from_canonical, read_volume, to_canonical, write_label_volume
from sautomed.errors import UserError
from sautomed.models.msam.session import Click, ClickSession, click_index, read_clicks_file


class BallNet(nn.Module):
    """M-SAM's interface (encode / decode / upscale) answering a click with a ball of radius ``r`` voxels
    around it, added to (positive) or cut from (negative) the previous mask; counts its encoder calls."""

    def __init__(self, size: int = 16, r: float = 3.0, spurious: bool = False) -> None:
        super().__init__()
        self.config = type("Cfg", (), {"image_size": size})()
        self.low_res_size = (size, size, size)
        self.r, self.spurious, self.encoded = r, spurious, 0

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        self.encoded += 1
        return image

    def decode(self, embedding, points, prev_low_res, clicks=None) -> torch.Tensor:
        s = self.config.image_size
        prev = prev_low_res if prev_low_res is not None else torch.full((1, 1, s, s, s), -1.0)
        if points is None:
            return prev
        (p,), (lab,) = points[0][0], points[1][0]
        grid = torch.stack(torch.meshgrid(*(torch.arange(s),) * 3, indexing="ij"), -1).float()
        ball = ((grid - p.float()) ** 2).sum(-1).sqrt() <= self.r
        out = torch.where(ball[None, None], torch.tensor(5.0 if lab else -5.0), prev)
        if self.spurious:  # a change nobody asked for: lesion in the window's corner
            out = out.clone()
            out[..., :3, :3, :3] = 5.0
        return out

    def upscale(self, low: torch.Tensor, size=None) -> torch.Tensor:
        return F.interpolate(low, size=size or (self.config.image_size,) * 3, mode="trilinear")


def _volume(path, oblique: bool):
    """A 24 x 20 x 18 (x, y, z) volume with 2 x 1.5 x 2.5 mm voxels, oblique or axis-aligned with flips."""
    img = sitk.GetImageFromArray(np.random.default_rng(0).normal(100, 5, (18, 20, 24)).astype(np.float32))
    img.SetSpacing((2.0, 1.5, 2.5))
    if oblique:
        t = np.deg2rad(25.0)
        d = np.array([[np.cos(t), 0.0, np.sin(t)], [0.0, -1.0, 0.0], [-np.sin(t), 0.0, np.cos(t)]])
    else:
        d = np.diag([-1.0, 1.0, -1.0])
    img.SetDirection(tuple(float(v) for v in d.ravel()))
    img.SetOrigin((5.0, -7.0, 12.0))
    sitk.WriteImage(img, str(path))
    return img


@pytest.mark.parametrize("oblique", [True, False])
def test_a_click_in_mm_and_in_voxels_lands_on_the_same_canonical_voxel(tmp_path, oblique):
    img = _volume(tmp_path / "v.nii.gz", oblique)
    stored, geom = read_volume(tmp_path / "v.nii.gz")
    canonical = to_canonical(sitk.GetArrayFromImage(img), geom)
    for ijk in [(0, 0, 0), (23, 19, 17), (5, 11, 9)]:
        mm = img.TransformIndexToPhysicalPoint(ijk)
        ras = (-mm[0], -mm[1], mm[2])
        at_voxel = click_index(Click(ijk, space="voxel"), geom)
        for click in (Click(mm, space="mm"), Click(ras, space="mm", coordinate_system="RAS")):
            np.testing.assert_allclose(click_index(click, geom), at_voxel, atol=1e-6)
        z, y, x = (int(round(v)) for v in at_voxel)
        assert canonical[z, y, x] == sitk.GetArrayFromImage(img)[ijk[2], ijk[1], ijk[0]]


def test_a_click_outside_the_volume_names_the_file_and_the_point(tmp_path):
    _volume(tmp_path / "v.nii.gz", True)
    _, geom = read_volume(tmp_path / "v.nii.gz")
    with pytest.raises(UserError, match=r"v\.nii\.gz: the click at \[30, 2, 3\] voxel lies outside"):
        click_index(Click((30, 2, 3)), geom)


def _session(tmp_path, start="empty", local=True, net=None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    _volume(tmp_path / "v.nii.gz", True)
    stored, geom = read_volume(tmp_path / "v.nii.gz")
    image = torch.from_numpy(to_canonical(stored, geom)).float()  # the preprocessed grid = the input's
    image = image / image.max()
    return ClickSession(net or BallNet(), image, geom, start=start, local=local), geom


def test_clicks_add_and_remove_where_they_land_and_the_written_mask_is_on_the_input_grid(tmp_path):
    session, geom = _session(tmp_path)
    assert not session.labels().any()  # an empty start
    session.click(Click((12, 10, 9), positive=True))
    session.click(Click((3, 4, 2), positive=True))  # near a corner: the window is clamped inside the volume
    out = write_label_volume(session.labels(), geom, tmp_path / "mask.nii.gz")
    written = sitk.ReadImage(str(out))
    src = sitk.ReadImage(str(tmp_path / "v.nii.gz"))
    assert written.GetOrigin() == src.GetOrigin() and written.GetDirection() == src.GetDirection()
    assert written.GetSpacing() == src.GetSpacing()
    stored = sitk.GetArrayFromImage(written)  # (k, j, i)
    assert stored[9, 10, 12] == 1 and stored[2, 4, 3] == 1 and stored[17, 19, 23] == 0
    before = int(stored.sum())
    session.click(Click((12, 10, 9), positive=False))  # the first ball removed, the second kept
    after = from_canonical(session.labels(), geom)
    assert after[9, 10, 12] == 0 and after[2, 4, 3] == 1 and 0 < after.sum() < before
    assert len(session.clicks) == 3


def test_a_local_click_keeps_what_it_did_not_ask_for(tmp_path):
    """A network that also paints a corner of the window when clicked: a local click takes only the region
    near it; without ``local`` the network's whole answer in the window enters the mask."""
    corner = []
    for local in (True, False):
        session, geom = _session(tmp_path / str(local), local=local, net=BallNet(spurious=True))
        session.click(Click((12, 10, 9), positive=True))
        labels = session.labels()
        z, y, x = (int(round(v)) for v in click_index(Click((12, 10, 9)), geom))
        assert labels[z, y, x] == 1
        start = session._windows[next(iter(session._windows))].start
        corner.append(int(labels[start[0], start[1], start[2]]))
    assert corner == [0, 1]


def test_a_window_is_encoded_once_for_the_clicks_inside_it(tmp_path):
    net = BallNet()
    session, _ = _session(tmp_path, net=net)
    session.click(Click((12, 10, 9)))
    session.click(Click((12, 10, 9), positive=False))
    session.click(Click((13, 11, 8)))  # near the first: inside its window, away from the window's edges
    assert net.encoded == 1 and len(session._windows) == 1
    session.click(Click((0, 0, 0)))  # a corner: a window of its own
    assert net.encoded == 2


def test_the_clicks_file_is_read_and_its_mistakes_are_named(tmp_path):
    good = {
        "coordinate_system": "RAS",
        "start": "empty",
        "cases": {"case_a": [{"point": [1, 2, 3], "space": "mm", "label": "negative"}, {"point": [4, 5, 6]}]},
    }
    (tmp_path / "c.json").write_text(json.dumps(good))
    f = read_clicks_file(tmp_path / "c.json")
    assert f.start == "empty" and f.clicks_for("case_a.nii.gz") == [
        Click((1.0, 2.0, 3.0), False, "mm", "RAS"),
        Click((4.0, 5.0, 6.0), True, "voxel", "RAS"),
    ]
    assert f.clicks_for("case_b.nii.gz") == [] and f.unmatched(["case_b.nii.gz"]) == ["case_a"]
    bad = [
        ({"cases": {"a": [{"point": [1, 2]}]}}, "case 'a', click 1: a click's point is 3 numbers"),
        ({"cases": {"a": [{"point": [1, 2, 3], "label": "maybe"}]}}, "label is 'positive' or 'negative'"),
        ({"cases": {"a": [{"point": [1, 2, 3], "space": "cm"}]}}, "space is 'mm' or 'voxel'"),
        ({"cases": {}, "coordinate_system": "XYZ"}, "coordinate_system is 'LPS' or 'RAS'"),
        ({"clicks": []}, "a clicks file is an object with 'cases'"),
    ]
    for i, (data, message) in enumerate(bad):
        (tmp_path / f"b{i}.json").write_text(json.dumps(data))
        with pytest.raises(UserError, match=rf"b{i}\.json: .*{message}"):
            read_clicks_file(tmp_path / f"b{i}.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(UserError, match=r"broken\.json: not a readable JSON clicks file"):
        read_clicks_file(tmp_path / "broken.json")


def test_with_consistent_answers_the_clicked_voxel_takes_the_clicks_label(tmp_path):
    """The tiny M-SAM with random weights (a live local head) answers nothing on its own; the session's
    click-consistent decoding (``evaluation.consistency_steps``) makes every click hold at its voxel."""
    from msam_helpers import make_net

    from sautomed.models.msam.consistency import Consistency

    net = make_net(0, local_head=True, click_maps=True)
    torch.nn.init.normal_(net.local_head.layers[-1].weight, std=0.5)
    _volume(tmp_path / "v.nii.gz", True)
    stored, geom = read_volume(tmp_path / "v.nii.gz")
    image = torch.from_numpy(to_canonical(stored, geom)).float()
    session = ClickSession(net, image / image.max(), geom, "empty", None, False, Consistency(100, lr=1.0))
    at = click_index(Click((5, 11, 9)), geom)
    z, y, x = (int(round(v)) for v in at)
    assert session.click(Click((5, 11, 9), positive=True))[z, y, x] == 1
    far = click_index(Click((20, 3, 2)), geom)
    mask = session.click(Click((20, 3, 2), positive=False))
    assert mask[tuple(int(round(v)) for v in far)] == 0 and mask[z, y, x] == 1  # both clicks hold
