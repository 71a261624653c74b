"""Shipped models: a fit's checkpoint made compact (only what it trained, float16) rebuilds the same model;
`sautomed models` lists what ships; `predict --model NAME` runs one before any training."""

from __future__ import annotations

from pathlib import Path

import lightning
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from sautomed.cli import main
from sautomed.families import module_from_checkpoint
from sautomed.models.sautomed.module import FROZEN_PREFIX, SAutoMedModule
from sautomed.zoo import registry

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"


def _fitted(tiny_sam_checkpoint, frozen_tiny) -> dict:
    module = SAutoMedModule(network=frozen_tiny(tiny_sam_checkpoint, num_classes=2, decoder="per_class"))
    torch.manual_seed(1)
    with torch.no_grad():  # what a fit changes: everything but the frozen encoder
        for name, p in module.named_parameters():
            if not name.startswith(FROZEN_PREFIX):
                p.add_(0.01 * torch.randn_like(p))
    module.class_names, module.preprocessing = ("a", "b"), {"image_size": 64, "normalization": "percentile"}
    ckpt = {"state_dict": module.state_dict(), "epoch": 0, "global_step": 0}
    ckpt["pytorch-lightning_version"] = lightning.__version__
    module.on_save_checkpoint(ckpt)
    return ckpt


def test_a_compact_checkpoint_rebuilds_the_same_model(tiny_sam_checkpoint, frozen_tiny, tmp_path, capsys):
    ckpt = _fitted(tiny_sam_checkpoint, frozen_tiny)
    torch.save(ckpt, tmp_path / "fit.ckpt")
    assert main(["models", "pack", str(tmp_path / "fit.ckpt"), str(tmp_path / "compact.pt")]) == 0
    compact = torch.load(tmp_path / "compact.pt", map_location="cpu", weights_only=True)
    assert not any(k.startswith(FROZEN_PREFIX) for k in compact["state_dict"])
    assert all(v.dtype == torch.float16 for v in compact["state_dict"].values() if v.is_floating_point())
    assert (tmp_path / "compact.pt").stat().st_size < 0.6 * (tmp_path / "fit.ckpt").stat().st_size
    full, small = module_from_checkpoint(ckpt), module_from_checkpoint(compact)
    for k, v in full.state_dict().items():  # the encoder from its weights, the rest to float16 precision
        torch.testing.assert_close(small.state_dict()[k], v, atol=2e-3, rtol=2e-3)
    volume = torch.rand(6, 64, 64)
    a, b = full.segment_volume(volume, (64, 64)), small.segment_volume(volume, (64, 64))
    assert (a != b).mean() < 0.01  # a few voxels at most
    assert small.class_names == ("a", "b") and small.fit_split is None


def test_a_random_encoder_fit_cannot_be_made_compact(tmp_path, trained_run, capsys):
    _, run = trained_run  # the tiny network trained whole: nothing to leave out
    assert main(["models", "pack", str(run / "best.ckpt"), str(tmp_path / "x.pt")]) == 1
    assert "frozen encoder" in capsys.readouterr().err


def test_models_lists_what_ships(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name, m in registry().items():
        assert name in out and m["licence"] in out and (Path(__file__).parents[1] / m["card"]).is_file()


def test_predict_needs_a_checkpoint_or_a_model(tmp_path, capsys):
    assert main(["predict", "-i", str(tmp_path), "-o", str(tmp_path / "o")]) == 1
    assert "--ckpt_path CKPT [CKPT ...] or --model NAME" in capsys.readouterr().err
    assert main(["predict", "--model", "no-such-model", "-i", str(tmp_path), "-o", str(tmp_path / "o")]) == 1
    assert "no such shipped model" in capsys.readouterr().err


@pytest.mark.slow
def test_the_shipped_chaos_mr_model_segments_a_case_before_any_training(tmp_path, monkeypatch):
    assert "chaos-mr-organs" in registry()
    weights = tmp_path / "weights"  # `sautomed weights litemedsam` would put the file here
    weights.mkdir()
    (weights / "lite_medsam.pth").symlink_to((SHARED / "weights" / "lite_medsam.pth").resolve())
    monkeypatch.setenv("SAUTOMED_WEIGHTS", str(weights))
    image = SHARED / "data" / "chaos-mr" / "imagesTr" / "chaosmr_002_0000.nii.gz"
    out = tmp_path / "out"
    assert (
        main(["predict", "--model", "chaos-mr-organs", "-i", str(image), "-o", str(out), "--no-progress"])
        == 0
    )
    a, b = sitk.ReadImage(str(image)), sitk.ReadImage(str(out / "chaosmr_002.nii.gz"))
    assert a.GetSize() == b.GetSize() and a.GetSpacing() == b.GetSpacing()
    assert a.GetOrigin() == b.GetOrigin() and a.GetDirection() == b.GetDirection()
    labels = sitk.GetArrayFromImage(b)
    ref = sitk.GetArrayFromImage(
        sitk.ReadImage(str(SHARED / "data" / "chaos-mr" / "labelsTr" / "chaosmr_002.nii.gz"))
    )
    dsc = [
        2 * ((labels == v) & (ref == v)).sum() / ((labels == v).sum() + (ref == v).sum()) for v in range(1, 5)
    ]
    assert min(dsc) > 0.7, dsc  # a training case of the model: a check that it works, not a held-out figure
    assert np.unique(labels).tolist() == [0, 1, 2, 3, 4]
