"""Previews: physical aspect for anisotropic voxels, the patient's orientation, colours where labels are."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from PIL import Image

from sautomed.data.io import geometry_of
from sautomed.tools.labels import colour
from sautomed.tools.preview import views, write_preview


def _geometry(shape_zyx, spacing_zyx):
    image = sitk.Image([shape_zyx[2], shape_zyx[1], shape_zyx[0]], sitk.sitkUInt8)
    image.SetSpacing(tuple(reversed(spacing_zyx)))
    return geometry_of(image, "synthetic.nii.gz")


def _has(rgb: np.ndarray, value: int) -> np.ndarray:
    return np.all(rgb == np.asarray(colour(value), np.uint8), axis=-1)  # outline pixels carry the pure colour


def test_views_keep_physical_aspect_and_orientation(tmp_path):
    shape, spacing = (10, 20, 40), (4.0, 1.0, 0.5)  # z, y, x: axial 20 x 20 mm, coronal 40 mm tall
    geom = _geometry(shape, spacing)
    image = np.random.default_rng(0).normal(0, 1, shape).astype(np.float32)
    labels = np.zeros(shape, np.uint8)
    labels[6:9, 2:8, 30:38] = 1  # patient's left (high x), anterior (low y), superior (high z)
    labels[1:3, 12:18, 2:10] = 2  # patient's right, posterior, inferior
    got = {v.name.split()[0]: v for v in views(image, labels, geom, tile=200)}
    axial, coronal, sagittal = got["axial"], got["coronal"], got["sagittal"]
    assert axial.rgb.shape[:2] == (200, 200)  # 20 x 20 mm
    assert coronal.rgb.shape[:2] == (400, 200)  # 40 mm (z) tall, 20 mm (x) wide
    assert sagittal.rgb.shape[:2] == (400, 200)  # 40 mm tall, 20 mm (y) wide
    assert axial.edges == ("A", "P", "R", "L") and coronal.edges == ("S", "I", "R", "L")
    all_axial = [v for v in views(image, labels, geom, tile=200) if v.name.startswith("axial")]
    one = np.stack([v.rgb for v in all_axial])
    rows, cols = np.nonzero(_has(one, 1).any(axis=0))
    assert cols.min() > 100 and rows.max() < 100  # left of the patient = right of the image; anterior on top
    rows, cols = np.nonzero(_has(one, 2).any(axis=0))
    assert cols.max() < 100 and rows.min() > 100
    only_one = np.where(labels == 1, 1, 0).astype(np.uint8)  # planes through its centre of mass
    got = {v.name.split()[0]: v for v in views(image, only_one, geom, tile=200)}
    rows, cols = np.nonzero(_has(got["coronal"].rgb, 1))
    assert rows.size and rows.max() < 200 and cols.min() > 100  # superior on top, patient's left on the right
    rows, cols = np.nonzero(_has(got["sagittal"].rgb, 1))
    assert rows.size and rows.max() < 200 and cols.max() < 100  # superior on top, anterior on the left
    assert not _has(one, 3).any()


def test_written_png_shows_each_label_colour(tmp_path):
    shape, spacing = (10, 20, 40), (4.0, 1.0, 0.5)
    geom = _geometry(shape, spacing)
    labels = np.zeros(shape, np.uint8)
    labels[3:7, 5:15, 10:30] = 1
    labels[4:6, 8:12, 15:25] = 3
    out = write_preview(np.ones(shape, np.float32), labels, geom, ["a", "b", "c"], tmp_path / "x.png")
    rgb = np.asarray(Image.open(out).convert("RGB"))
    body = rgb[: rgb.shape[0] - 40]  # the views, without the legend's colour squares
    assert _has(body, 1).sum() > 50 and _has(body, 3).sum() > 50
    assert not _has(body, 2).any()  # class 2 is absent
    assert _has(rgb[-40:], 2).sum() > 100  # ... but in the legend
    assert not list(tmp_path.glob(".x*"))  # no temporary left


def test_real_mr_liver_on_the_image_left_and_spleen_on_the_right(shared, tmp_path, capsys):
    from sautomed.cli import main
    from sautomed.data.layouts import get_layout

    root = shared / "chaos-mr"
    layout = get_layout("nnunet", root)
    case = layout.load(layout.cases()[0])  # the reference label stands in for a prediction
    axial = np.stack([v.rgb for v in views(case.image, case.label, case.geom) if v.name.startswith("axial")])
    width = axial.shape[2]
    liver_cols = np.nonzero(_has(axial, 1))[2]
    spleen_cols = np.nonzero(_has(axial, 4))[2]
    assert np.mean(liver_cols < width / 2) > 0.9  # the patient's right is the image's left (radiological)
    assert np.mean(spleen_cols > width / 2) > 0.9
    out = tmp_path / "mr.png"
    image = root / "imagesTr" / f"{case.case_id}_0000.nii.gz"
    labels = root / "labelsTr" / f"{case.case_id}.nii.gz"
    argv = ["preview", "--image", str(image), "--labels", str(labels), "--out", str(out)]
    assert main([*argv, "--table", str(root / "dataset.json")]) == 0
    assert Image.open(out).format == "PNG"
    assert main(argv) == 1 and "exists" in capsys.readouterr().err  # never replaced silently
