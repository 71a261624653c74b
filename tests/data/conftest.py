"""Shared fixtures for the data tests: the shared real data, synthetic volume writers, a phantom dataset."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from sautomed.data.phantom import make_phantoms

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


@pytest.fixture(scope="session")
def shared() -> Path:
    """The shared real test data (``../shared/data`` beside the project root); a clear failure when absent."""
    if not SHARED.is_dir():
        pytest.fail(f"shared test data not found at {SHARED}: the tests expect ../shared beside the project")
    return SHARED


def write_stored(
    path: Path,
    stored: np.ndarray,
    spacing=(1.0, 1.0, 1.0),
    origin=(0.0, 0.0, 0.0),
    direction=(1, 0, 0, 0, 1, 0, 0, 0, 1),
) -> Path:
    """Write a numpy array in stored order (as GetArrayFromImage) with a given grid."""
    image = sitk.GetImageFromArray(stored)
    image.SetSpacing([float(v) for v in spacing])
    image.SetOrigin([float(v) for v in origin])
    image.SetDirection([float(v) for v in direction])
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def write_dicom_series(
    folder: Path,
    volume: np.ndarray,  # (z, y, x) int16, z increasing towards superior
    spacing: tuple[float, float, float] = (2.0, 0.8, 0.8),  # (z, y, x)
    series_uid: str = "1.2.826.0.1.3680043.2.1125.1",
    instance_numbers: Sequence[int] | None = None,
    z_positions: Sequence[float] | None = None,
    names: Sequence[str] | None = None,
) -> list[Path]:
    """Write one DICOM file per slice (axial, identity orientation); returns the files in slice order."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    files = []
    for k in range(volume.shape[0]):
        sl = sitk.GetImageFromArray(volume[k].astype(np.int16))
        sl.SetSpacing((spacing[2], spacing[1]))
        z = z_positions[k] if z_positions is not None else 100.0 + k * spacing[0]
        number = instance_numbers[k] if instance_numbers is not None else k + 1
        tags = {
            "0008|0060": "CT",
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0008|0018": f"{series_uid}.{k + 1}",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.9",
            "0020|000e": series_uid,
            "0020|0013": str(number),
            "0020|0032": f"-50\\-60\\{z}",
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0028|0030": f"{spacing[1]}\\{spacing[2]}",
            "0018|0050": str(spacing[0]),
        }
        for key, value in tags.items():
            sl.SetMetaData(key, value)
        path = folder / (names[k] if names is not None else f"slice{k:03d}.dcm")
        writer.SetFileName(str(path))
        writer.Execute(sl)
        files.append(path)
    return files


@pytest.fixture
def stored_writer():
    return write_stored


@pytest.fixture
def dicom_writer():
    return write_dicom_series


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory) -> Path:
    """A small phantom dataset (4 cases, one per stored voxel order), made once per session; do not modify."""
    return make_phantoms(tmp_path_factory.mktemp("phantoms") / "ds", cases=4, seed=7, size=(20, 64, 64))
