"""Raw NIfTI checks that ITK's reader does not make: truncated voxel data and non-finite float voxels."""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

from .errors import VolumeError

_NIFTI_FLOATS = {16: "f4", 64: "f8"}  # NIfTI datatype code -> numpy float type


def nifti_header(path: Path, opener) -> tuple[str, int, tuple[int, ...], int, int, float, float]:
    """(endianness, vox_offset, dims, datatype, bitpix, scl_slope, scl_inter) of a NIfTI-1/2 file."""
    with opener(path, "rb") as f:
        head = f.read(540)
    if len(head) < 348:
        raise VolumeError(f"{path}: truncated NIfTI header ({len(head)} bytes)")
    for end in "<>":
        size = int(np.frombuffer(head[:4], end + "i4")[0])
        if size == 348:
            dims = np.frombuffer(head[40:56], end + "i2")
            datatype, bitpix = (int(v) for v in np.frombuffer(head[70:74], end + "i2"))
            offset = int(np.frombuffer(head[108:112], end + "f4")[0])
            slope, inter = (float(v) for v in np.frombuffer(head[112:120], end + "f4"))
            break
        if size == 540 and len(head) == 540:
            dims = np.frombuffer(head[16:80], end + "i8")
            datatype, bitpix = (int(v) for v in np.frombuffer(head[12:16], end + "i2"))
            offset = int(np.frombuffer(head[168:176], end + "i8")[0])
            slope, inter = (float(v) for v in np.frombuffer(head[176:192], end + "f8"))
            break
    else:
        raise VolumeError(f"{path}: not a NIfTI file (bad header size field)")
    n = int(dims[0])
    if not 1 <= n <= 7:
        raise VolumeError(f"{path}: corrupt NIfTI header (dim[0] = {n})")
    return end, max(offset, 348), tuple(int(v) for v in dims[1 : n + 1]), datatype, bitpix, slope, inter


def inspect_nifti(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """Check a NIfTI file holds all its voxel bytes; for float data find the non-finite voxels.

    ITK's NIfTI reader neither reports truncated data nor keeps NaN/inf (it reads them as 0), so this reads
    the raw bytes itself. Returns (mask, values) in stored numpy order: where the file holds NaN/inf and
    what (after scl_slope/scl_inter), or None when there is none.
    """
    gz = path.name.lower().endswith(".gz")
    opener = gzip.open if gz else open
    try:
        end, offset, dims, datatype, bitpix, slope, inter = nifti_header(path, opener)
        required = offset + int(np.prod(dims, dtype=np.int64)) * max(bitpix, 8) // 8
        floating = datatype in _NIFTI_FLOATS
        if not gz:
            have = path.stat().st_size
        else:
            with open(path, "rb") as f:
                f.seek(-4, os.SEEK_END)
                isize = int.from_bytes(f.read(4), "little")  # uncompressed size mod 2**32 (gzip trailer)
            have = required if (required < 2**32 and isize == required % 2**32 and not floating) else None
            if have is None or floating:
                with gzip.open(path, "rb") as f:
                    data = f.read()
                have = len(data)
        if have < required:
            raise VolumeError(f"{path}: truncated NIfTI file (holds {have} of {required} bytes)")
        if not floating:
            return None
        if not gz:
            with open(path, "rb") as f:
                data = f.read()
        count = int(np.prod(dims[:3]))
        raw = np.frombuffer(data, end + _NIFTI_FLOATS[datatype], count=count, offset=offset)
    except (OSError, EOFError, ValueError, zlib.error) as e:
        if isinstance(e, VolumeError):
            raise
        raise VolumeError(f"{path}: unreadable or corrupt NIfTI file ({e})") from e
    bad = ~np.isfinite(raw)
    if not bad.any():
        return None
    values = raw.astype(np.float64)
    if slope != 0.0 and np.isfinite(slope):
        values = values * slope  # +-inf keeps or swaps sign, NaN stays NaN
    shape = tuple(reversed(dims[:3]))
    return bad.reshape(shape), values.reshape(shape)
