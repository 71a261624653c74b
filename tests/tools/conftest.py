"""Fixtures for the tool tests: shared real data, small phantoms, a checkpoint made without training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sautomed.data.phantom import make_phantoms

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


@pytest.fixture(scope="session")
def shared() -> Path:
    """The shared real test data (``../shared/data`` beside the project root); a clear failure when absent."""
    if not SHARED.is_dir():
        pytest.fail(f"shared test data not found at {SHARED}: the tests expect ../shared beside the project")
    return SHARED


@pytest.fixture(scope="session")
def small_phantoms(tmp_path_factory) -> Path:
    """3 small phantom cases in nnU-Net layout (differently stored orientations)."""
    return make_phantoms(tmp_path_factory.mktemp("tool_phantoms"), 3, seed=5, size=(10, 40, 40))


@pytest.fixture(scope="session")
def untrained_ckpt(tmp_path_factory) -> Path:
    """A sautomed checkpoint of the tiny network (random weights), as `fit` would save it: config inside."""
    from sautomed.models.sautomed.module import SAutoMedModule
    from sautomed.models.sautomed.network import NetworkConfig

    torch.manual_seed(0)
    module = SAutoMedModule(
        network=NetworkConfig(
            backbone="tiny", image_size=32, num_classes=5, box_decoder_ffn_dim=64, encoder_finetune="full"
        )
    )
    module.class_names = ("liver", "right_kidney", "left_kidney", "spleen", "aorta")
    module.preprocessing = {
        "image_size": 32,
        "normalization": "ct",
        "window": [-125.0, 275.0],
        "percentiles": [0.5, 99.5],
    }
    ckpt = {
        "state_dict": module.state_dict(),
        "epoch": 3,
        "global_step": 40,
        "pytorch-lightning_version": "2.4.0",
        "callbacks": {
            "ModelCheckpoint{'monitor': 'val/mean_dsc', 'mode': 'max'}": {
                "monitor": "val/mean_dsc",
                "best_model_score": torch.tensor(0.8125),
                "best_model_path": "/runs/x/best.ckpt",
            }
        },
        "sautomed": module.family_config(),
    }
    path = tmp_path_factory.mktemp("ckpt") / "best.ckpt"
    torch.save(ckpt, path)
    return path
