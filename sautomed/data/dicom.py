"""DICOM series: the files of a series in slice order, header tags, and the slice-spacing check."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import VolumeError


def is_dicom_file(path: Path) -> bool:
    """True for a .dcm / .dicom / .ima file or one with the DICM preamble."""
    if path.suffix.lower() in (".dcm", ".dicom", ".ima"):
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def dicom_series_files(folder: str | Path) -> list[str]:
    """Files of the DICOM series in ``folder``, in slice-position order (SimpleITK/GDCM's order).

    With several series the one with the most files is taken, with a warning naming the choice.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise VolumeError(f"{folder}: DICOM folder does not exist")
    try:
        ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError as e:
        raise VolumeError(f"{folder}: cannot scan for DICOM series: {e}") from e
    if not ids:
        raise VolumeError(f"{folder}: folder holds no readable DICOM series")
    series = {sid: list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid)) for sid in ids}
    chosen = max(ids, key=lambda sid: (len(series[sid]), sid))
    if len(ids) > 1:
        counts = ", ".join(f"{sid} ({len(series[sid])} files)" for sid in ids)
        warnings.warn(
            f"{folder}: {len(ids)} DICOM series ({counts}); using {chosen}, the one with most files",
            stacklevel=2,
        )
    return series[chosen]


def dicom_tags(file: str | Path, tags: tuple[str, ...]) -> dict[str, str]:
    """Header values (stripped strings) of one DICOM file, e.g. ``("0020|0013", "0020|0032")``."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(file))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise VolumeError(f"{file}: unreadable DICOM header: {e}") from e
    return {t: reader.GetMetaData(t).strip() for t in tags if reader.HasMetaDataKey(t)}


def check_slice_spacing(folder: Path, files: list[str]) -> None:
    """Warn when the slice positions of a series are unevenly spaced (a missing slice?)."""
    if len(files) < 3:
        return
    positions = []
    for f in files:
        tags = dicom_tags(f, ("0020|0032", "0020|0037"))
        if "0020|0032" not in tags or "0020|0037" not in tags:
            return
        pos = np.array([float(v) for v in tags["0020|0032"].split("\\")])
        cosines = np.array([float(v) for v in tags["0020|0037"].split("\\")])
        normal = np.cross(cosines[:3], cosines[3:])
        positions.append(float(pos @ normal))
    gaps = np.abs(np.diff(positions))
    step = float(np.median(gaps))
    if step > 0 and np.max(np.abs(gaps - step)) > 0.01 * step + 1e-3:
        worst = int(np.argmax(np.abs(gaps - step)))
        warnings.warn(
            f"{folder}: uneven DICOM slice spacing (gaps {gaps.min():.3g}..{gaps.max():.3g} mm, "
            f"typical {step:.3g} mm, e.g. between slices {worst} and {worst + 1}): a missing slice? "
            "The volume is read with the typical spacing, which is then wrong near the gap",
            stacklevel=3,
        )
