"""Intensity normalisation, in-plane resizing, and a disk cache of preprocessed volumes.

Plain functions first (:func:`normalize`, :func:`resize_slices`, :func:`preprocess`); :class:`VolumeCache`
wraps them so that each case is read and preprocessed once per set of settings. Nothing is resampled along
z: slices stay the volume's own slices, resized in plane to ``image_size`` x ``image_size``.
"""

from __future__ import annotations

import hashlib
import io as _io
import json
import os
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn.functional as F

from sautomed.errors import UserError

from .io import Geometry, atomic_write

if TYPE_CHECKING:
    from .layouts import Case, Layout

CACHE_VERSION = 2


@dataclass(frozen=True)
class Preprocessing:
    """How volumes become network input.

    Args:
        image_size: in-plane size S of the resized slices (S x S).
        normalization: ``"ct"`` clips to ``window`` (Hounsfield units); ``"percentile"`` clips to the
            volume's own ``percentiles`` (MR and other non-HU data); both then scale to [0, 1].
        window: (low, high) HU window for ``"ct"``.
        percentiles: (low, high) percentiles for ``"percentile"``.
        percentile_region: where ``"percentile"`` takes its percentiles: ``"volume"``, every voxel;
            ``"foreground"``, the voxels above the channel's minimum (the constant background of a
            skull-stripped or masked scan left out, as nnU-Net normalises inside the nonzero mask). With a
            large background the volume's percentiles move with the size of the bright lesion: on BraTS the
            99.5th fell inside the tumour's intensities on the case with the smallest tumour, the brain
            then as bright as the lesion (docs/results.md, 2026-12-08).
    """

    image_size: int = 256
    normalization: Literal["ct", "percentile"] = "ct"
    window: tuple[float, float] = (-125.0, 275.0)
    percentiles: tuple[float, float] = (0.5, 99.5)
    percentile_region: Literal["volume", "foreground"] = "volume"


def normalize(image: np.ndarray, p: Preprocessing) -> np.ndarray:
    """Clip and scale intensities to float32 in [0, 1] (a constant image gives zeros); a (C, z, y, x)
    image is normalised channel by channel (percentiles of each channel)."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 4:
        return np.stack([normalize(channel, p) for channel in image])
    if p.normalization == "ct":
        low, high = p.window
    elif p.normalization == "percentile":
        low, high = (float(v) for v in np.percentile(percentile_voxels(image, p), p.percentiles))
    else:
        raise UserError(f"unknown normalization {p.normalization!r}; use 'ct' or 'percentile'")
    if not high > low:
        return np.zeros(image.shape, np.float32)
    out = (np.clip(image, low, high) - low) / (high - low)
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)  # float rounding can step past 1


def percentile_voxels(image: np.ndarray, p: Preprocessing) -> np.ndarray:
    """The voxels of one channel whose percentiles ``"percentile"`` normalisation takes
    (``p.percentile_region``); the whole channel when its foreground is empty (a constant image)."""
    if p.percentile_region == "volume":
        return image
    if p.percentile_region != "foreground":
        raise UserError(f"unknown percentile_region {p.percentile_region!r}; use 'volume' or 'foreground'")
    inside = image[image > image.min()] if image.size else image
    return inside if inside.size else image


def resize_slices(volume: np.ndarray, size: int | tuple[int, int], nearest: bool) -> np.ndarray:
    """Resize every slice of a (z, y, x) volume to (z, size, size), or to (z, *size) for a pair.

    ``nearest`` for labels (no new values, dtype kept); otherwise bilinear, antialiased when shrinking,
    float32.
    """
    out_hw = (size, size) if isinstance(size, int) else tuple(size)
    if volume.shape[1:] == out_hw:
        return volume.copy() if nearest else volume.astype(np.float32)
    x = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[:, None]  # (z, 1, y, x)
    if nearest:
        y = F.interpolate(x, size=out_hw, mode="nearest-exact")
        return y[:, 0].numpy().astype(volume.dtype)  # (z, S, S)
    shrink = out_hw[0] < volume.shape[1] or out_hw[1] < volume.shape[2]
    y = F.interpolate(x, size=out_hw, mode="bilinear", align_corners=False, antialias=shrink)
    return y[:, 0].numpy()  # (z, S, S)


def preprocess(
    image: np.ndarray, label: np.ndarray | None, p: Preprocessing
) -> tuple[np.ndarray, np.ndarray | None]:
    """Normalised, resized float16 image (z, S, S) in [0, 1] and uint8 label (z, S, S) or None; a
    (C, z, y, x) image gives (C, z, S, S).

    float16 is what the cache stores; fit, validate, test and predict all feed the model these values, so
    `test` and `predict` give the same labels for the same case and checkpoint.
    """
    norm = normalize(image, p)
    if norm.ndim == 4:
        out = np.stack([resize_slices(channel, p.image_size, nearest=False) for channel in norm])
    else:
        out = resize_slices(norm, p.image_size, nearest=False)
    out = np.clip(out, 0.0, 1.0)
    lab = None if label is None else resize_slices(np.asarray(label, np.uint8), p.image_size, nearest=True)
    return out.astype(np.float16), lab


@dataclass(frozen=True)
class Prepared:
    case_id: str
    image: np.ndarray  # (z, S, S) float16 in [0, 1]; (C, z, S, S) when more than one channel is read
    label: np.ndarray | None  # (z, S, S) uint8 class indices
    geom: Geometry  # of the original volume (for writing predictions back)
    label_full: np.ndarray | None = None  # (z, y, x) uint8 class indices on the original canonical grid


# ------------------------------------------------------------------------------------------- hashing

_FILE_HASHES: dict[tuple[str, int, int], str] = {}  # (path, mtime_ns, size) -> sha256, once per process


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, memoised per process by (path, mtime, size)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    if key not in _FILE_HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _FILE_HASHES[key] = h.hexdigest()
    return _FILE_HASHES[key]


def path_sha256(path: Path) -> str:
    """sha256 of a file, or of all files of a folder (sorted by relative name, names included)."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    h = hashlib.sha256()
    for f in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(f.relative_to(path).as_posix().encode() + b"\0" + file_sha256(f).encode())
    return h.hexdigest()


def cache_key(layout: Layout, case: Case, p: Preprocessing) -> str:
    """Content hash of the case's files + preprocessing + layout label map + cache format version."""
    parts = {
        "version": CACHE_VERSION,
        "layout": [
            layout.name,
            list(layout.class_names),
            [list(m) for m in layout.label_map],
            list(layout.declared),
            layout.unmapped,
        ],
        "preprocessing": _key_settings(p),
        "case": case.case_id,
        "image": path_sha256(case.image),
        "label": None if case.label is None else path_sha256(case.label),
    }
    if layout.channels > 1:  # only then: single-channel keys stay what they were
        parts["channels"] = [path_sha256(c) for c in case.channels[: layout.channels - 1]]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _key_settings(p: Preprocessing) -> dict:
    """The settings in a cache key; ``percentile_region`` only when not its default, so that the caches of
    the runs made before it existed keep their keys."""
    settings = asdict(p)
    if settings["percentile_region"] == "volume":
        del settings["percentile_region"]
    return settings


def _array_digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(str((a.shape, a.dtype.str)).encode() + np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------- cache


class VolumeCache:
    """Preprocessed cases on disk, one ``.npz`` per case and settings, keyed by content.

    ``root=None`` disables caching (every ``get`` reads and preprocesses). A stale key is simply another
    file; a cache file that fails to load or whose checksum or shapes do not match is recomputed, never used.
    """

    def __init__(self, root: Path | None):
        self.root = None if root is None else Path(root)

    def path(self, layout: Layout, case: Case, p: Preprocessing) -> Path | None:
        """The cache file for a case and settings (None when caching is off)."""
        if self.root is None:
            return None
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", case.case_id)
        return self.root / f"{safe}-{cache_key(layout, case, p)[:24]}.npz"

    def get(self, layout: Layout, case: Case, p: Preprocessing) -> Prepared:
        """The case preprocessed with ``p``: from the cache when there, else read, preprocess and store."""
        path = self.path(layout, case, p)
        if path is not None and path.exists():
            try:
                return _load(path, case.case_id)
            except Exception as e:  # a corrupt or half-written file: recompute
                warnings.warn(f"{path}: unusable cache file ({e}); recomputing", stacklevel=2)
        loaded = layout.load(case)
        image, label = preprocess(loaded.image, loaded.label, p)
        prepared = Prepared(case.case_id, image, label, loaded.geom, loaded.label)
        if path is not None:
            _save(path, prepared)
        return prepared


def _save(path: Path, prepared: Prepared) -> None:
    arrays = {"image": prepared.image}
    if prepared.label is not None:
        arrays["label"] = prepared.label
    if prepared.label_full is not None:
        arrays["label_full"] = prepared.label_full
    meta = {
        "case_id": prepared.case_id,
        "geom": asdict(prepared.geom),
        "digest": _array_digest(*arrays.values()),
    }
    buffer = _io.BytesIO()
    np.savez_compressed(buffer, meta=np.array(json.dumps(meta)), **arrays)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


def _load(path: Path, case_id: str) -> Prepared:
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        image = data["image"]
        label = data["label"] if "label" in data.files else None
        label_full = data["label_full"] if "label_full" in data.files else None
    arrays = tuple(a for a in (image, label, label_full) if a is not None)
    if meta["digest"] != _array_digest(*arrays) or meta["case_id"] != case_id:
        raise UserError("checksum or case id mismatch")
    if image.ndim not in (3, 4) or (label is not None and label.shape != image.shape[-3:]):
        raise UserError(f"shape mismatch {image.shape} / {None if label is None else label.shape}")
    g = meta["geom"]
    geom = Geometry(
        g["path"],
        tuple(g["size"]),
        tuple(g["spacing"]),
        tuple(g["origin"]),
        tuple(g["direction"]),
        tuple(g["axes"]),
        tuple(g["flips"]),
    )
    if geom.shape_zyx[0] != image.shape[-3] or (
        label_full is not None and label_full.shape != geom.shape_zyx
    ):
        raise UserError(f"cached shapes {image.shape} do not match the geometry {geom.shape_zyx}")
    return Prepared(case_id, image, label, geom, label_full)
