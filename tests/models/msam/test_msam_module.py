"""The M-SAM LightningModule end to end on lesion phantoms: fit, validate (oracle + automatic), checkpoint."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from msam_helpers import blob_batch, tiny_config

from sautomed.data.datamodule import PhantomSettings
from sautomed.data.lesion_phantom import make_lesion_phantoms
from sautomed.data.preprocess import Preprocessing
from sautomed.models.msam.automatic import AutoSettings, segment_automatic
from sautomed.models.msam.module import (
    CheckpointFamilyError,
    EvaluationSettings,
    MSAMModule,
    RefinementSettings,
)
from sautomed.models.msam.patches import CropSettings, MSAMDataModule


def _module(**kw) -> MSAMModule:
    torch.manual_seed(0)
    return MSAMModule(
        network=tiny_config(),
        refinement=RefinementSettings(iterations=3, prompt_free_probability=0.5),
        evaluation=EvaluationSettings(oracle_clicks=(1, 3)),
        automatic=AutoSettings(self_prompt_iterations=1, min_component_voxels=5),
        lr=1e-3,
        decoder_lr_scale=1.0,
        **kw,
    )


@pytest.fixture(scope="module")
def lesions(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lesions")
    make_lesion_phantoms(root / "train", 4, seed=0, size=(40, 40, 40))
    return root


def _datamodule(lesions: Path, tmp: Path) -> MSAMDataModule:
    return MSAMDataModule(
        crops=CropSettings(size=32, samples_per_epoch=4),
        layout="nnunet",
        root=str(lesions / "train"),
        folds=2,
        preprocessing=Preprocessing(image_size=40, normalization="percentile"),
        batch_size=2,
        cache_dir=str(tmp / "cache"),
    )


def test_fit_validate_and_checkpoint_round_trip(lesions, tmp_path):
    module = _module()
    trainer = L.Trainer(
        default_root_dir=str(tmp_path / "run"),
        accelerator="cpu",
        max_epochs=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, datamodule=_datamodule(lesions, tmp_path))
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"])
    for k in ("val/oracle_dsc@1", "val/oracle_dsc@3", "val/mean_dsc"):
        assert 0.0 <= float(metrics[k]) <= 1.0, k
    trainer.save_checkpoint(tmp_path / "msam.ckpt")
    ckpt = torch.load(tmp_path / "msam.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["sautomed"]["family"] == "msam"
    assert ckpt["sautomed"]["preprocessing"]["image_size"] == 40
    rebuilt = MSAMModule.from_checkpoint_dict(ckpt)
    image, _ = blob_batch(1)
    with torch.no_grad():
        assert torch.allclose(module.net(image.cpu()), rebuilt.net(image), atol=1e-6)
    ckpt["sautomed"]["family"] = "sautomed"
    with pytest.raises(CheckpointFamilyError):
        MSAMModule.from_checkpoint_dict(ckpt)


def test_training_step_and_binary_target_setting():
    module = _module(foreground_labels=[1, 4])
    image, target = blob_batch(2)
    loss = module.training_step({"image": image, "label": target}, 0)
    assert torch.isfinite(loss) and loss.requires_grad
    assert module.family_config()["foreground_labels"] == [1, 4]


def test_automatic_mode_returns_a_label_map_on_the_volume_grid():
    module = _module()
    vol = torch.rand(20, 45, 38)  # smaller than the crop along z, not a multiple of it in plane
    logits = segment_automatic(module.net, vol, module.automatic)
    assert logits.shape == vol.shape and torch.isfinite(logits).all()
    labels = module.segment_volume(vol, (20, 50, 50))
    assert labels.shape == (20, 50, 50) and labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1}


def test_small_components_go_and_with_largest_component_only_the_largest_stays():
    from sautomed.models.msam.automatic import drop_components

    logits = torch.full((12, 12, 12), -3.0)
    logits[1:5, 1:5, 1:5] = 2.0  # 64 voxels: the lesion
    logits[7:10, 7:10, 7:10] = 1.0  # 27 voxels: a second lesion
    logits[11, 0, 0] = 4.0  # one voxel: noise
    kept = drop_components(logits, min_voxels=5)
    assert int((kept > 0).sum()) == 64 + 27 and float(kept[11, 0, 0]) == -1.0
    assert torch.equal(kept[logits <= 0], logits[logits <= 0])  # background untouched
    one = drop_components(logits, min_voxels=5, largest_only=True)
    assert int((one > 0).sum()) == 64 and bool((one[1:5, 1:5, 1:5] == 2.0).all())
    assert drop_components(torch.full((4, 4, 4), -1.0), 5, True).eq(-1.0).all()  # nothing there: no error


def test_predict_largest_component_reaches_the_automatic_mode(monkeypatch):
    from scipy import ndimage

    from sautomed.families import with_inference_changes
    from sautomed.models.msam import automatic

    two = torch.full((32, 32, 32), -2.0)
    two[2:12, 2:12, 2:12], two[20:25, 20:25, 20:25] = 3.0, 3.0  # what the network sees: two lesions
    monkeypatch.setattr(automatic, "_window", lambda net, crop, points, prev: (None, two.clone()))
    module = _module()
    module.inference = with_inference_changes(module, {"self_prompt_iterations": 0})
    vol = torch.rand(32, 32, 32)
    assert ndimage.label(module.segment_volume(vol, (32, 32, 32)))[1] == 2
    module.inference = with_inference_changes(module, {"largest_component": True})
    labels = module.segment_volume(vol, (32, 32, 32))
    assert ndimage.label(labels)[1] == 1 and int(labels.sum()) == 1000


def test_datamodule_makes_lesion_phantoms_and_crops(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # without a trainer the split is written to the working directory
    dm = MSAMDataModule(
        crops=CropSettings(size=32, samples_per_epoch=6, foreground_fraction=1.0),
        root=str(tmp_path / "p"),
        phantoms=PhantomSettings(cases=2, seed=3),
        folds=2,
        preprocessing=Preprocessing(image_size=64, normalization="percentile"),
        batch_size=3,
        cache_dir=str(tmp_path / "cache"),
    )
    dm.prepare_data()
    assert (tmp_path / "p" / "dataset.json").is_file()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (3, 1, 32, 32, 32) and batch["label"].shape == (3, 1, 32, 32, 32)
    assert bool((batch["label"].flatten(1).sum(1) > 0).all())  # lesion-centred crops hold lesion


def test_predict_step_returns_labels_on_the_input_grid():
    from types import SimpleNamespace

    module = _module()
    geom = SimpleNamespace(shape_zyx=(24, 36, 36))
    batch = {"image": torch.rand(24, 32, 32), "geom": geom, "output": "out.nii.gz", "source": "in.nii.gz"}
    out = module.predict_step(batch, 0)
    assert out["labels"].shape == (24, 36, 36) and out["geom"] is geom
    assert module.predict_step({"error": "broken", "source": "x"}, 0) == {"error": "broken", "source": "x"}


def test_the_oracle_dsc_is_the_mean_over_the_click_seeds(monkeypatch):
    from sautomed.errors import UserError
    from sautomed.models.msam import module as module_py

    seen = []

    def fake(net, image, target, case_id, clicks, size, seed, *args, **kwargs):
        seen.append(seed)
        return [0.1 * seed + k for k in range(clicks)]

    monkeypatch.setattr(module_py, "oracle_dsc", fake)
    module = _module()
    module.refinement = RefinementSettings(seed=2)
    module.evaluation = EvaluationSettings(oracle_clicks=(1, 3), click_seeds=3)
    dscs = module.oracle_dsc(torch.zeros(1, 8, 8, 8), np.ones((8, 8, 8), bool), "case")
    assert seen == [2, 3, 4] and np.allclose(dscs, [0.3, 1.3, 2.3])  # seeds 2, 3, 4: mean 0.3 more
    module.evaluation = EvaluationSettings(click_seeds=0)
    with pytest.raises(UserError, match="click_seeds"):
        module.oracle_dsc(torch.zeros(1, 8, 8, 8), np.ones((8, 8, 8), bool), "case")
