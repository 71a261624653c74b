"""M-SAM on the shared BraTS cases: 3D lesion crops and the volume path (skipped when the data is absent)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sautomed.data.preprocess import Preprocessing
from sautomed.models.msam.patches import CropSettings, MSAMDataModule

BRATS = Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "brats-tumour"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (BRATS / "dataset.json").is_file(), reason="no BraTS cases in ../shared/data"),
]


def test_brats_crops_hold_the_tumour_and_volumes_keep_their_grid(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dm = MSAMDataModule(
        crops=CropSettings(size=128, samples_per_epoch=2, foreground_fraction=1.0),
        layout="nnunet",
        root=str(BRATS),
        folds=2,
        preprocessing=Preprocessing(image_size=240, normalization="percentile"),
        batch_size=2,
        cache_dir=str(tmp_path / "cache"),
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 1, 128, 128, 128)
    assert bool((batch["label"].flatten(1).sum(1) > 1000).all())  # whole-tumour crops: thousands of voxels
    vol = next(iter(dm.val_dataloader()))
    assert vol["image"].shape == (155, 240, 240) and vol["label"].shape == (155, 240, 240)
    assert set(np.unique(vol["label"].numpy())) <= {0, 1, 2, 3, 4}
    assert vol["geom"].spacing_zyx == pytest.approx((1.0, 1.0, 1.0))
    assert torch.isfinite(batch["image"]).all()
