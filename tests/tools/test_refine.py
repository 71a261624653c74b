"""LiteMedSAM as published redrawing other models' label maps: `sautomed refine` on any tool's maps (real MR
and the real weights, slow) and `--sam-refine` on a U-Net checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from sautomed.cli import main
from sautomed.data.io import read_label_volume, read_volume, write_label_volume

ROOT = Path(__file__).resolve().parents[2] / ".." / "shared"
MR = ROOT / "data" / "chaos-mr"
WEIGHTS = ROOT / "weights" / "lite_medsam.pth"


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


@pytest.mark.slow
def test_refine_redraws_another_tools_sloppy_label_maps(tmp_path):
    image = MR / "imagesTr" / "chaosmr_002_0000.nii.gz"
    reference = MR / "labelsTr" / "chaosmr_002.nii.gz"
    images, segs = tmp_path / "images", tmp_path / "segs"
    images.mkdir(), segs.mkdir()
    shutil.copy(image, images / image.name)
    _, geom = read_volume(image)
    ref = read_label_volume(reference, reference=geom)
    sloppy = np.zeros_like(ref)  # another tool's map: every organ grown by 4 voxels in-plane
    for v in range(1, int(ref.max()) + 1):
        grown = ndimage.binary_dilation(ref == v, structure=np.ones((1, 9, 9), bool))
        sloppy[grown & (sloppy == 0)] = v
    write_label_volume(sloppy, geom, segs / "chaosmr_002.nii.gz")
    out = tmp_path / "out"
    argv = ["refine", "-i", str(images), "-s", str(segs), "-o", str(out), "--weights", str(WEIGHTS)]
    assert main([*argv, "--image-size", "128"]) == 0
    refined = read_label_volume(out / "chaosmr_002.nii.gz", reference=geom)  # on the input's exact grid
    before = np.mean([_dice(sloppy == v, ref == v) for v in range(1, int(ref.max()) + 1)])
    after = np.mean([_dice(refined == v, ref == v) for v in range(1, int(ref.max()) + 1)])
    assert after > before + 0.05 and after > 0.85, (before, after)
    table = json.loads((out / "labels.json").read_text())
    assert table["family"] == "sam_refine" and set(table["labels"]) == {"0", "1", "2", "3", "4"}
    assert main(argv) == 0  # again: the existing output is kept, not replaced


def test_refine_names_a_folder_that_is_not_there(tmp_path, capsys):
    argv = ["refine", "-i", str(tmp_path / "no"), "-s", str(tmp_path), "-o", str(tmp_path / "o")]
    assert main(argv) == 1
    assert "no: not a folder" in capsys.readouterr().err


def test_a_unet_checkpoint_predicts_with_sam_refine(tmp_path, monkeypatch, tiny_phantoms):
    """`predict --sam-refine` on a U-Net checkpoint sends the U-Net's logits through the refiner."""
    import lightning
    import torch

    from sautomed.models.baselines.module import BaselineModule
    from sautomed.models.baselines.network import UNetSettings
    from sautomed.models.sam.refine import PretrainedBoxRefiner

    unet = UNetSettings(
        num_classes=5, patch_size=(64, 64), spacing=(2.0, 2.0), base_filters=4, max_filters=16
    )
    module = BaselineModule(network="unet2d", unet=unet)
    module.class_names = ("liver", "right_kidney", "left_kidney", "spleen", "aorta")
    module.preprocessing = {"image_size": 64, "normalization": "ct", "window": [-125.0, 275.0]}
    ckpt = {"state_dict": module.state_dict(), "epoch": 0, "global_step": 0}
    ckpt["pytorch-lightning_version"] = lightning.__version__
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "unet.ckpt")
    seen = []

    def scores(self, volume, logits, num_classes, **kw):
        seen.append((tuple(volume.shape), tuple(logits.shape), num_classes, self.image_size))
        out = torch.zeros(logits.shape[0], num_classes + 1, *volume.shape[-2:])
        out[:, 1] = 1.0  # the refiner's say: liver everywhere
        return out

    monkeypatch.setattr(
        PretrainedBoxRefiner, "__init__", lambda self, src, size, margin: setattr(self, "image_size", size)
    )
    monkeypatch.setattr(PretrainedBoxRefiner, "scores", scores)
    src = next((tiny_phantoms / "test" / "imagesTr").iterdir())
    out = tmp_path / "out"
    argv = ["predict", "--ckpt_path", str(tmp_path / "unet.ckpt"), "-i", str(src), "-o", str(out)]
    assert main([*argv, "--no-progress", "--sam-refine"]) == 0
    (written,) = out.glob("*.nii.gz")
    assert seen and seen[0][2] == 5 and seen[0][3] == 64
    assert (read_label_volume(written) == 1).all()  # what the refiner said was written
