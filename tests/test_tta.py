"""Test-time augmentation (predict --tta): zooms that map back, flips only where no class is sided."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import SimpleITK as sitk
import torch

from sautomed.cli import main
from sautomed.evaluation.tta import sided, tta_probabilities, zoom
from sautomed.writers import output_name


def test_a_zoom_maps_back_in_the_middle():
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    x = torch.exp(-((yy - 30) ** 2 + (xx - 36) ** 2) / 200)[None].repeat(3, 1, 1)  # a smooth blob
    back = zoom(zoom(x, 1.1), 1 / 1.1)
    torch.testing.assert_close(back[:, 16:48, 16:48], x[:, 16:48, 16:48], atol=0.02, rtol=0)
    assert (zoom(x, 1.1)[0, 30, 36] - 1.0).abs() < 0.01  # near the middle it barely moves
    assert zoom(x, 0.9).shape == x.shape and zoom(torch.rand(2, 3, 64, 64), 1.1).shape == (2, 3, 64, 64)


def test_sided_names():
    assert sided(["liver", "left_kidney", "kidney_R", "r_lung", "aorta", "lesion"]) == [
        "left_kidney",
        "kidney_R",
        "r_lung",
    ]


class _Scorer:
    """volume_scores: class 1's logit is the image's intensity, a left-right asymmetric pattern."""

    def __init__(self, names):
        self.class_names, self.calls = tuple(names), []

    def volume_scores(self, image):
        self.calls.append(image.clone())
        return torch.stack([torch.full_like(image, 0.5), image], 1), False  # (Z, 2, S, S)

    def case_probabilities(self, image, geom):
        from sautomed.evaluation.postprocess import class_probabilities

        scores, probs = self.volume_scores(image)
        return class_probabilities(scores, tuple(geom.shape_zyx[1:]), probs)


def test_tta_averages_the_transforms_and_flips_only_without_sided_classes():
    image = torch.zeros(2, 64, 64)
    image[:, 20:44, 10:30] = 1.0  # an organ left of the middle
    geom = SimpleNamespace(shape_zyx=(2, 64, 64))
    plain = _Scorer(["liver"])
    p = tta_probabilities(plain, image, geom)
    assert len(plain.calls) == 4 and torch.equal(
        plain.calls[-1], torch.flip(image, (-1,))
    )  # id, 2 zooms, flip
    labels = p.argmax(1)
    assert labels[:, 32, 20].all() and not labels[:, 32, 50].any()  # the flip mapped back: still on the left
    side = _Scorer(["left_kidney"])
    tta_probabilities(side, image, geom)
    assert len(side.calls) == 3  # no flip for a sided class


def test_predict_tta_writes_on_the_input_grid(trained_run, tiny_phantoms, tmp_path, monkeypatch):
    from sautomed.models.sautomed.module import SAutoMedModule

    _, run = trained_run
    calls = []
    original = SAutoMedModule.volume_scores
    monkeypatch.setattr(
        SAutoMedModule, "volume_scores", lambda self, x, mode=None: calls.append(1) or original(self, x, mode)
    )
    src = next((tiny_phantoms / "test" / "imagesTr").iterdir())
    out = tmp_path / "out"
    assert (
        main(
            [
                "predict",
                "--ckpt_path",
                str(run / "best.ckpt"),
                "-i",
                str(src),
                "-o",
                str(out),
                "--tta",
                "--no-progress",
            ]
        )
        == 0
    )
    assert len(calls) == 3  # the phantom's kidneys are sided: identity and two zooms, no flip
    a, b = sitk.ReadImage(str(src)), sitk.ReadImage(str(out / output_name(src)))
    assert (
        a.GetSize() == b.GetSize() and a.GetDirection() == b.GetDirection() and a.GetOrigin() == b.GetOrigin()
    )
    assert np.isin(sitk.GetArrayFromImage(b), range(6)).all()


def test_saved_probabilities_come_from_the_same_single_pass_as_the_labels(
    trained_run, tiny_phantoms, tmp_path, monkeypatch
):
    """predict --save-probabilities runs the network once a case, and writes the labels a plain predict
    writes (with the largest-component step on, so the labels are not merely the npz's argmax)."""
    from sautomed.evaluation.probabilities import read_probabilities
    from sautomed.models.sautomed.module import SAutoMedModule

    _, run = trained_run
    src = next((tiny_phantoms / "test" / "imagesTr").iterdir())
    plain, saved = tmp_path / "plain", tmp_path / "saved"
    common = ["predict", "--ckpt_path", str(run / "best.ckpt"), "-i", str(src), "--no-progress"]
    original_settings = SAutoMedModule.engine

    def with_largest_component(self, *args, **kwargs):
        self.inference = dataclasses.replace(self.inference, largest_component=True)
        return original_settings(self, *args, **kwargs)

    monkeypatch.setattr(SAutoMedModule, "engine", with_largest_component)
    assert main([*common, "-o", str(plain)]) == 0
    calls = []
    original = SAutoMedModule.volume_scores
    monkeypatch.setattr(
        SAutoMedModule, "volume_scores", lambda self, x, mode=None: calls.append(1) or original(self, x, mode)
    )
    assert main([*common, "-o", str(saved), "--save-probabilities"]) == 0
    assert len(calls) == 1
    name = output_name(src)
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(plain / name)))
    b = sitk.GetArrayFromImage(sitk.ReadImage(str(saved / name)))
    assert np.array_equal(a, b)
    probs = read_probabilities(saved / name.replace(".nii.gz", ".npz")).probabilities.astype(np.float32)
    assert probs.shape[1:] == b.shape and (probs.argmax(0) == b).mean() > 0.99
