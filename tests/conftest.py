"""Fixtures shared by the end-to-end tests: tiny phantoms, a tiny config and a briefly trained checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from sautomed.cli import main
from sautomed.data.phantom import make_phantoms

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def pytest_sessionstart(session: pytest.Session) -> None:
    """Without ../shared (the real labelled volumes and the LiteMedSAM weights beside the project, which CI
    has) the real-data tests cannot run: say so in one line instead of dozens of failures."""
    if not SHARED.is_dir():
        pytest.exit(
            f"the test data is missing: {SHARED.resolve()} (the project's ../shared beside its root)",
            returncode=4,
        )


@pytest.fixture(scope="session")
def tiny_phantoms(tmp_path_factory) -> Path:
    """4 small phantom cases (nnU-Net layout) and 2 held-out ones under `<root>/train` and `<root>/test`."""
    root = tmp_path_factory.mktemp("phantoms")
    make_phantoms(root / "train", 4, seed=0, size=(12, 64, 64))
    make_phantoms(root / "test", 2, seed=7, size=(10, 64, 64))
    return root


def cpu_trainer(run_dir: Path) -> dict:
    """The trainer section of the tiny test configs: one CPU epoch, quiet, logging every step."""
    return {
        "default_root_dir": str(run_dir),
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "log_every_n_steps": 1,
    }


def tiny_config(path: Path, phantoms: Path, run_dir: Path, **data: object) -> Path:
    """A complete config for the tiny network at S = 64 on the tiny phantoms."""
    cfg = {
        "seed_everything": 0,
        "trainer": cpu_trainer(run_dir),
        "model": {
            "network": {
                "backbone": "tiny",
                "image_size": 64,
                "num_classes": 5,
                "encoder_finetune": "full",
                "box_decoder_ffn_dim": 128,
            },
            "lr": 1e-3,
        },
        "data": {
            "layout": "nnunet",
            "root": str(phantoms / "train"),
            "test_root": str(phantoms / "test"),
            "folds": 2,
            "preprocessing": {"image_size": 64, "normalization": "ct"},
            "windows": {"samples_per_epoch": 8},
            "batch_size": 4,
            "cache_dir": str(path.parent / "cache"),
            **data,
        },
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


UNET_CLASS_PATH = "sautomed.models.baselines.module.BaselineModule"


def unet_config(path: Path, root: Path, run_dir: Path, kind: str, **data: object) -> Path:
    """A tiny unet2d (2.5D) or unet3d at S = 32 on the phantoms at ``root``, one epoch of 2 steps."""
    unet: dict = {"num_classes": 5, "base_filters": 4, "max_filters": 16}
    cfg_data: dict = {
        "layout": "nnunet",
        "root": str(root),
        "folds": 1,
        "preprocessing": {"image_size": 32, "normalization": "ct"},
        "windows": {"samples_per_epoch": 4, "warmup_min": 1, "warmup_max": 1},
        "batch_size": 2,
        "cache_dir": str(path.parent / "cache"),
    }
    if kind == "unet2d":
        unet.update(patch_size=[32, 32], spacing=[2.0, 2.0], context_slices=1)
    else:
        unet.update(patch_size=[8, 32, 32], spacing=[4.0, 2.0, 2.0])
        cfg_data["patches"] = {"size": [8, 32, 32], "samples_per_epoch": 4}
    cfg = {
        "seed_everything": 0,
        "trainer": cpu_trainer(run_dir),
        "model": {"class_path": UNET_CLASS_PATH, "init_args": {"network": kind, "unet": unet}},
        "data": {**cfg_data, **data},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="session")
def make_unet_config():
    """The `unet_config` function (conftest modules are not importable by name across folders)."""
    return unet_config


@pytest.fixture(scope="session")
def make_config():
    """The `tiny_config` function, for tests that write their own variant."""
    return tiny_config


@pytest.fixture(scope="session")
def trained_run(tiny_phantoms, tmp_path_factory) -> tuple[Path, Path]:
    """(config, run folder) of a one-epoch fit of the tiny network, made once per session."""
    base = tmp_path_factory.mktemp("trained")
    run = base / "run"
    cfg = tiny_config(base / "tiny.yaml", tiny_phantoms, run)
    assert main(["fit", "--config", str(cfg)]) == 0
    return cfg, run


def write_tiny_sam_checkpoint(path: Path, image_size: int = 64) -> Path:
    """A SAM-layout state dict of the tiny backbone (random weights, seed 0): a pretrained start for tests
    of frozen-encoder paths, which refuse a random encoder with no checkpoint (guards.py)."""
    import torch

    from sautomed.models.sautomed.network import NetworkConfig, build_network

    torch.manual_seed(0)
    cfg = NetworkConfig(  # the per-class decoder is SAM's own: its state dict has SAM's layout
        backbone="tiny",
        image_size=image_size,
        num_classes=1,
        encoder_finetune="full",
        lora_rank=0,
        decoder="per_class",
    )
    sam = ("image_encoder", "prompt_encoder", "mask_decoder")
    state = build_network(cfg).state_dict()
    torch.save({k: v for k, v in state.items() if k.split(".")[0] in sam and "class_embed" not in k}, path)
    return path


@pytest.fixture(scope="session")
def tiny_sam_checkpoint(tmp_path_factory) -> Path:
    """The tiny backbone's SAM-layout checkpoint at S = 64 (`write_tiny_sam_checkpoint`)."""
    return write_tiny_sam_checkpoint(tmp_path_factory.mktemp("tiny_sam") / "tiny_sam.pth")


def _frozen_tiny(checkpoint: Path, **settings: object):
    """The tiny backbone at S = 64, its encoder frozen from ``checkpoint`` (write_tiny_sam_checkpoint)."""
    from sautomed.models.sautomed.network import NetworkConfig

    base = {
        "backbone": "tiny",
        "image_size": 64,
        "num_classes": 1,
        "encoder_finetune": "frozen",
        "lora_rank": 0,
    }
    return NetworkConfig(**{**base, "sam_checkpoint": str(checkpoint), **settings})


@pytest.fixture
def frozen_tiny():
    """_frozen_tiny as a fixture (conftest modules are not importable by name across folders)."""
    return _frozen_tiny


def _oblique_stack(path, rng_seed: int = 0):
    """A cardiac-MR-like short-axis stack: 12 slices of 8 mm, 64 x 64 of 1.25 mm, the stack axis (stored
    index k) lying in the patient's left-right / front-back plane, 20 degrees off left-right; index i runs
    along the patient's long axis. Returns (image, labels) as stored numpy arrays (k, j, i)."""
    import SimpleITK as sitk

    t = np.deg2rad(20.0)
    # columns: index axes i, j, k in physical (x, y, z)
    cols = np.array([[0.0, 0.0, 1.0], [-np.sin(t), np.cos(t), 0.0], [np.cos(t), np.sin(t), 0.0]]).T
    rng = np.random.default_rng(rng_seed)
    stored = rng.normal(100, 10, (12, 64, 64)).astype(np.int16)  # (k, j, i)
    labels = np.zeros((12, 64, 64), np.uint8)
    labels[3:9, 20:40, 10:30] = 1
    for array, out in ((stored, path / "oblique_0000.nii.gz"), (labels, path / "oblique_labels.nii.gz")):
        img = sitk.GetImageFromArray(array)
        img.SetSpacing((1.25, 1.25, 8.0))
        img.SetDirection(tuple(float(v) for v in cols.ravel()))
        img.SetOrigin((10.0, -20.0, 30.0))
        sitk.WriteImage(img, str(out))
    return stored, labels


@pytest.fixture
def oblique_stack():
    """_oblique_stack as a fixture."""
    return _oblique_stack
