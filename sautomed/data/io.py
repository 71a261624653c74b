"""Read and write volumes with SimpleITK: arrays in canonical (z, y, x) order plus their geometry.

This is the only module that knows about axes. Every array handed to the rest of sautomed is in
*canonical orientation*: array axes (z, y, x) with x increasing towards the patient's Left, y towards
Posterior and z towards Superior (LPS, the DICOM/ITK physical frame), so slices along axis 0 are always
axial, whatever voxel order the file stores. Getting there only permutes and flips axes (never resamples);
the permutation is the one of the six that maximises the sum of |cosines| between index axes and physical
axes, so oblique directions work too. :func:`from_canonical` undoes it exactly, and writers copy size,
spacing, origin and direction from the stored :class:`Geometry`, so written labels overlay the input.
"""

from __future__ import annotations

import glob
import itertools
import os
import re
import secrets
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .dicom import check_slice_spacing, dicom_series_files, dicom_tags, is_dicom_file
from .errors import VolumeError
from .nifti import inspect_nifti

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


__all__ = ["VolumeError", "dicom_series_files", "dicom_tags"]  # kept importable from here


@dataclass(frozen=True)
class Geometry:
    """Where the voxels of a volume lie, as stored, plus how the stored order maps to canonical (z, y, x)."""

    path: str
    size: tuple[int, int, int]  # SimpleITK GetSize() as stored (x, y, z)
    spacing: tuple[float, float, float]  # as stored (x, y, z), mm
    origin: tuple[float, float, float]
    direction: tuple[float, ...]  # 9 values, row-major, as SimpleITK GetDirection
    axes: tuple[int, int, int]  # canonical array axis k (of z, y, x) comes from stored numpy axis axes[k]
    flips: tuple[bool, bool, bool]  # per canonical axis, flipped after the permutation

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        """Canonical array shape (z, y, x)."""
        return tuple(self.size[2 - a] for a in self.axes)  # stored numpy axis a is index axis 2 - a

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        """Canonical voxel spacing (z, y, x) in mm."""
        return tuple(float(self.spacing[2 - a]) for a in self.axes)


# ----------------------------------------------------------------------------------------------- axes


ANISOTROPY = 3.0  # largest spacing / the next: slices then follow the acquisition (nnU-Net's threshold)


def orientation(
    direction: tuple[float, ...] | np.ndarray,
    spacing: tuple[float, float, float] | None = None,
) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """(axes, flips) taking a stored numpy (k, j, i) array to canonical (z, y, x) for a direction matrix.

    Each index axis goes to the patient axis it lies closest to, so canonical z is the superior-inferior axis
    (x towards the patient's left, y posterior). With ``spacing`` (stored x, y, z order), an anisotropic
    acquisition is sliced along its own out-of-plane axis instead: when the largest spacing is at least
    ``ANISOTROPY`` times the others, that index axis becomes canonical z (nnU-Net's ``transpose_forward``),
    whatever patient axis it lies along (an oblique cardiac short-axis stack: z is the stack, not the body's
    long axis), and the index axis that was z takes its place."""
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)  # d[p, c]: physical axis p of index axis c
    best = list(
        max(itertools.permutations(range(3)), key=lambda perm: sum(abs(d[perm[c], c]) for c in range(3)))
    )
    if spacing is not None:
        s = np.asarray(spacing, dtype=np.float64)
        stack = int(np.argmax(s))
        if s[stack] >= ANISOTROPY * float(np.delete(s, stack).max()) and best[stack] != 2:
            on_z = best.index(2)  # the index axis on the patient's z: it takes the stack's patient axis
            best[stack], best[on_z] = 2, best[stack]
    axes, flips = [0, 0, 0], [False, False, False]
    for c, p in enumerate(best):  # index axis c lies along physical axis p
        k = 2 - p  # canonical array axis of physical axis p (z, y, x) = physical (2, 1, 0)
        axes[k] = 2 - c  # numpy axis of index axis c
        flips[k] = bool(d[p, c] < 0)
    return tuple(axes), tuple(flips)


def to_canonical(stored_zyx: np.ndarray, geom: Geometry) -> np.ndarray:
    """Stored numpy order (as ``sitk.GetArrayFromImage``) -> canonical (z, y, x); permutes and flips only."""
    out = np.transpose(stored_zyx, geom.axes)
    flip_axes = tuple(k for k in range(3) if geom.flips[k])
    if flip_axes:
        out = np.flip(out, flip_axes)
    return np.ascontiguousarray(out)


def from_canonical(canonical: np.ndarray, geom: Geometry) -> np.ndarray:
    """Canonical (z, y, x) -> stored numpy order; the exact inverse of :func:`to_canonical`."""
    flip_axes = tuple(k for k in range(3) if geom.flips[k])
    out = np.flip(canonical, flip_axes) if flip_axes else canonical
    return np.ascontiguousarray(np.transpose(out, np.argsort(geom.axes)))


def geometry_of(image: sitk.Image, path: str | Path) -> Geometry:
    """The :class:`Geometry` of a 3D SimpleITK image."""
    direction = tuple(float(v) for v in image.GetDirection())
    spacing = tuple(float(v) for v in image.GetSpacing())
    axes, flips = orientation(direction, spacing)
    return Geometry(
        path=str(path),
        size=tuple(int(v) for v in image.GetSize()),
        spacing=tuple(float(v) for v in image.GetSpacing()),
        origin=tuple(float(v) for v in image.GetOrigin()),
        direction=direction,
        axes=axes,
        flips=flips,
    )


def grid_mismatches(
    geom: Geometry, reference: Geometry, rtol: float = 1e-3, dir_atol: float = 1e-4
) -> list[str]:
    """Names and values of the grid properties (size, spacing, origin, direction) that differ."""
    out = []
    if tuple(geom.size) != tuple(reference.size):
        out.append(f"size {geom.size} != {reference.size}")
    if not np.allclose(geom.spacing, reference.spacing, rtol=rtol, atol=1e-6):
        out.append(f"spacing {geom.spacing} != {reference.spacing}")
    scale = max(1.0, float(np.max(np.abs(reference.spacing))) * max(reference.size))
    if not np.allclose(geom.origin, reference.origin, rtol=rtol, atol=rtol * scale):
        out.append(f"origin {geom.origin} != {reference.origin}")
    if not np.allclose(geom.direction, reference.direction, rtol=0.0, atol=dir_atol):
        out.append(
            f"direction {tuple(round(v, 6) for v in geom.direction)} != "
            f"{tuple(round(v, 6) for v in reference.direction)}"
        )
    return out


# ---------------------------------------------------------------------------------------- file kinds


def is_volume_file(path: Path) -> bool:
    """True for a file named .nii, .nii.gz, .nrrd, .mha or .mhd (case-insensitive)."""
    path = Path(path)
    return path.is_file() and path.name.lower().endswith(VOLUME_SUFFIXES)


def is_dicom_dir(path: Path) -> bool:
    """True for a folder that directly holds DICOM files (by extension or the DICM preamble)."""
    path = Path(path)
    if not path.is_dir():
        return False
    return any(p.is_file() and not p.name.startswith(".") and is_dicom_file(p) for p in path.iterdir())


def volume_stem(path: Path) -> str:
    """File name without its volume extension (``img0001.nii.gz`` -> ``img0001``); folders keep their name."""
    name = Path(path).name
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


# ------------------------------------------------------------------------------------------- reading


def _read_image(path: Path) -> sitk.Image:
    if not path.exists():
        raise VolumeError(f"{path}: file does not exist")
    try:
        if path.is_dir():
            files = dicom_series_files(path)
            check_slice_spacing(path, files)
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(files)
            return reader.Execute()
        if path.stat().st_size == 0:
            raise VolumeError(f"{path}: file is empty")
        return sitk.ReadImage(str(path))
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise VolumeError(f"{path}: unreadable or corrupt volume ({first[-1] if first else e})") from e


def read_array(path: str | Path) -> tuple[np.ndarray, Geometry]:
    """Canonical (z, y, x) array with the stored pixel type and values untouched, plus its geometry.

    For checking data; :func:`read_volume` is the reader for use. Raises :class:`VolumeError` for missing,
    empty or corrupt files, DICOM folders without a series, and images that are not 3D scalar volumes.
    """
    path = Path(path)
    nonfinite = None
    if path.is_file() and path.name.lower().endswith((".nii", ".nii.gz")) and path.stat().st_size > 0:
        nonfinite = inspect_nifti(path)
    image = _read_image(path)
    if image.GetDimension() != 3:
        raise VolumeError(
            f"{path}: a {image.GetDimension()}D image (size {image.GetSize()}); a 3D volume is expected"
        )
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise VolumeError(
            f"{path}: a vector image with {image.GetNumberOfComponentsPerPixel()} components per "
            "voxel; a scalar 3D volume is expected"
        )
    geom = geometry_of(image, path)
    stored = sitk.GetArrayFromImage(image)
    if (
        nonfinite is not None
        and np.issubdtype(stored.dtype, np.floating)
        and nonfinite[0].shape == stored.shape
    ):
        stored[nonfinite[0]] = nonfinite[1][nonfinite[0]]
    return to_canonical(stored, geom), geom


def replace_nonfinite(array: np.ndarray, name: str) -> np.ndarray:
    """NaN -> finite min, +inf -> finite max, -inf -> finite min (all non-finite -> 0), with a warning."""
    bad = ~np.isfinite(array)
    count = int(bad.sum())
    if count == 0:
        return array
    finite = array[~bad]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    n_nan, n_pos = int(np.isnan(array).sum()), int(np.isposinf(array).sum())
    warnings.warn(
        f"{name}: replaced {count} non-finite voxels ({n_nan} NaN, {n_pos} +inf, "
        f"{count - n_nan - n_pos} -inf) by the finite min/max",
        stacklevel=3,
    )
    out = array.copy()
    out[np.isnan(out) | np.isneginf(out)] = low
    out[np.isposinf(out)] = high
    return out


def read_volume(path: str | Path) -> tuple[np.ndarray, Geometry]:
    """A file (NIfTI, NRRD, MHA/MHD) or DICOM series folder as float32 canonical (z, y, x) + geometry."""
    array, geom = read_array(path)
    if np.issubdtype(array.dtype, np.floating):
        array = replace_nonfinite(array, str(path))
    return array.astype(np.float32, copy=False), geom


def integral_labels(array: np.ndarray, name: str) -> np.ndarray:
    """Labels as int16 (int32 when needed); float labels must hold integer values only."""
    if np.issubdtype(array.dtype, np.floating):
        bad = ~np.isfinite(array) | (array != np.round(array))
        if bad.any():
            examples = np.unique(array[bad])[:5].tolist()
            raise VolumeError(
                f"{name}: label map holds {int(bad.sum())} non-integer values (e.g. {examples})"
            )
    elif not np.issubdtype(array.dtype, np.integer) and array.dtype != bool:
        raise VolumeError(f"{name}: unsupported label pixel type {array.dtype}")
    if array.size == 0:
        return array.astype(np.int16)
    low, high = float(array.min()), float(array.max())
    if low >= np.iinfo(np.int16).min and high <= np.iinfo(np.int16).max:
        return array.astype(np.int16)
    if low >= np.iinfo(np.int32).min and high <= np.iinfo(np.int32).max:
        return array.astype(np.int32)
    raise VolumeError(f"{name}: label values {low}..{high} do not fit int32")


def read_label_volume(path: str | Path, reference: Geometry | None = None) -> np.ndarray:
    """A label map as a canonical (z, y, x) int16/int32 array, checked against the image's grid."""
    array, geom = read_array(path)
    if reference is not None:
        problems = grid_mismatches(geom, reference)
        if problems:
            raise VolumeError(
                f"{path}: label grid differs from image {reference.path}: " + "; ".join(problems)
            )
    return integral_labels(array, str(path))


# ------------------------------------------------------------------------------------------- writing


def _volume_suffix(name: str) -> str:
    lower = name.lower()
    for suffix in VOLUME_SUFFIXES:
        if lower.endswith(suffix):
            return name[-len(suffix) :]
    return Path(name).suffix


def split_suffix(out: Path) -> tuple[str, str]:
    suffix = _volume_suffix(out.name)
    return (out.name[: len(out.name) - len(suffix)] if suffix else out.name), suffix


def pid_alive(pid: int) -> bool:
    """True while process ``pid`` exists on this machine (a zombie counts as alive until it is reaped)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's), or cannot tell: keep its files
    return True


def stale_temporaries(out: str | Path) -> list[Path]:
    """Temporary files of :func:`atomic_write` for ``out`` whose writing process is gone (killed mid-write).

    Their names carry the writer's pid (``.<name>.tmp-<pid>-<hex><ext>``); files of running processes are
    never listed, so a concurrent writer is left alone.
    """
    out = Path(out)
    base, suffix = split_suffix(out)
    pattern = re.compile(rf"\.{re.escape(base)}\.tmp-(\d+)-[0-9a-f]{{8}}{re.escape(suffix)}")
    if not out.parent.is_dir():
        return []
    found = []
    for p in out.parent.glob(f".{glob.escape(base)}.tmp-*"):
        match = pattern.fullmatch(p.name)
        if match and not pid_alive(int(match.group(1))):
            found.append(p)
    return sorted(found)


def atomic_write(out: Path, write: Callable[[Path], None], overwrite: bool = True) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``out`` (same extension), then ``os.replace`` it.

    Nothing appears at ``out`` unless ``write`` succeeded; on failure the temporary file is removed and the
    error propagates. ``FileExistsError`` when ``out`` exists and ``overwrite`` is False. The temporary file
    is hidden and named after ``out`` and this process (see :func:`stale_temporaries`).
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: output exists (pass overwrite=True to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    base, suffix = split_suffix(out)
    tmp = out.with_name(f".{base}.tmp-{os.getpid()}-{secrets.token_hex(4)}{suffix}")
    try:
        write(tmp)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def write_volume(array: np.ndarray, geom: Geometry, out: str | Path, overwrite: bool = False) -> Path:
    """Write a canonical (z, y, x) array with the exact stored size, spacing, origin, direction of ``geom``.

    The pixel type is the array's dtype. Atomic (see :func:`atomic_write`).
    """
    out = Path(out)
    array = np.asarray(array)
    if array.shape != geom.shape_zyx:
        raise VolumeError(
            f"{out}: array shape {array.shape} does not match the geometry's canonical shape "
            f"{geom.shape_zyx} (from {geom.path})"
        )
    image = sitk.GetImageFromArray(from_canonical(array, geom))
    image.SetSpacing(geom.spacing)
    image.SetOrigin(geom.origin)
    image.SetDirection(geom.direction)

    def write(tmp: Path) -> None:
        try:
            sitk.WriteImage(image, str(tmp), True)
        except RuntimeError as e:
            raise VolumeError(f"{out}: writing failed: {e}") from e

    return atomic_write(out, write, overwrite=overwrite)


def write_label_volume(labels: np.ndarray, geom: Geometry, out: str | Path, overwrite: bool = False) -> Path:
    """Write canonical labels (values 0..255) as uint8 on the input's exact grid, atomically."""
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise VolumeError(f"{out}: label values {labels.min()}..{labels.max()} do not fit uint8")
    return write_volume(labels.astype(np.uint8), geom, out, overwrite=overwrite)
