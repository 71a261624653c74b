"""Synthetic labelled CT-like volumes ("phantoms") in the nnU-Net raw layout, for demos and tests.

Each case is an abdomen-like body (air outside, a fat ring, textured soft tissue, a spine) holding five
labelled organs: 1 liver, 2 right kidney, 3 left kidney, 4 spleen, 5 aorta, plus unlabelled bowel-like blobs
whose intensity overlaps the liver's. The two kidneys share one intensity distribution (their side comes from
position only) and the spleen matches the liver, so context matters. Organs are smoothly deformed ellipsoids
whose centre, size and outline vary from slice to slice and from case to case; each spans a limited z range
(the aorta runs through all slices). Intensities are in Hounsfield units (the default CT window applies),
with smooth texture and noise. Spacing is anisotropic and varies per case, and cases are stored in several
voxel orders (axial, flipped like RAS files, slightly rotated, coronal), all of which read back to the same
canonical (z, y, x) arrays. Output is deterministic for a seed (byte for byte); a case is independent of
the number of cases asked for.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from sautomed.errors import UserError

from .io import Geometry, atomic_write, orientation, write_label_volume, write_volume

CLASSES = ("liver", "right_kidney", "left_kidney", "spleen", "aorta")

# name: (centre z, y, x), radii (z, y, x) in fractions of the volume (x towards patient left, y posterior,
# z superior), mean HU
_ORGANS = {
    "liver": ((0.62, 0.42, 0.30), (0.32, 0.22, 0.20), 70.0),
    "spleen": ((0.62, 0.64, 0.75), (0.17, 0.10, 0.08), 70.0),
    "right_kidney": ((0.38, 0.70, 0.30), (0.17, 0.09, 0.07), 150.0),
    "left_kidney": ((0.42, 0.70, 0.70), (0.17, 0.09, 0.07), 150.0),
}
# stored voxel orders: (axes, flips) of canonical <- stored, plus a rotation angle about z in degrees
_STORAGE = (
    ((0, 1, 2), (False, False, False), 0.0),  # axial, identity direction
    ((0, 1, 2), (False, True, True), 0.0),  # x and y flipped (as RAS-stored NIfTI)
    ((0, 1, 2), (False, False, False), 6.0),  # axial, slightly rotated direction
    ((1, 0, 2), (True, False, False), 0.0),  # coronal voxel order, z stored top-down
)


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], coarse: tuple[int, ...]) -> np.ndarray:
    """Smooth random field (unit-ish amplitude): coarse normal noise, trilinear upsampling, a light blur."""
    noise = torch.from_numpy(rng.standard_normal(coarse))[None, None]  # (1, 1, cz, cy, cx)
    field = F.interpolate(noise, size=shape, mode="trilinear", align_corners=True)[0, 0].numpy()
    sigma = [0.5 * s / c for s, c in zip(shape, coarse)]
    return ndimage.gaussian_filter(field, sigma, truncate=2.0)


def _blob(rng, grid, centre, radii, warp, tilt=0.1) -> np.ndarray:
    """Smoothly deformed ellipsoid mask on canonical fraction coordinates ``grid`` = (z, y, x)."""
    cz, cy, cx = centre
    rz, ry, rx = radii
    phase = rng.uniform(0, 2 * np.pi, 4)
    tilt_y, tilt_x = tilt * rng.uniform(-1, 1), tilt * rng.uniform(-1, 1)
    lobe2, lobe3 = rng.uniform(0.05, 0.15), rng.uniform(0.0, 0.08)
    # work inside the blob's bounding box only (lobes <= 1.23, warp and drift <= ~0.15)
    box = []
    for axis, (c, r) in enumerate(
        ((cz, rz), (cy, ry * 1.25 + tilt * rz + 0.15), (cx, rx * 1.25 + tilt * rz + 0.15))
    ):
        n = grid[0].shape[axis]
        box.append(
            slice(max(0, int(np.floor((c - r) * (n - 1)))), max(0, int(np.ceil((c + r) * (n - 1))) + 1))
        )
    box = tuple(box)
    z, y, x = (g[box] for g in grid)
    u = (z - cz) / rz
    # centre drifts with z (tilt + a slow wave), the outline has random 2- and 3-lobed modulation
    drift_y = tilt_y * (z - cz) + 0.02 * np.sin(3 * z + phase[0])
    drift_x = tilt_x * (z - cz) + 0.02 * np.sin(3 * z + phase[1])
    v = (y + warp[0][box] - cy - drift_y) / ry
    w = (x + warp[1][box] - cx - drift_x) / rx
    theta = np.arctan2(v, w)
    lobes = 1 + lobe2 * np.cos(2 * theta + phase[2] + 2 * z) + lobe3 * np.cos(3 * theta + phase[3] - z)
    mask = np.zeros(grid[0].shape, bool)
    mask[box] = u**2 + (v**2 + w**2) / lobes**2 < 1.0
    return mask


def _case(rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """One canonical (z, y, x) int16 HU image and uint8 label volume."""
    nz, ny, nx = shape
    grid = np.meshgrid(*(np.linspace(0, 1, n) for n in shape), indexing="ij")  # 3 x (z, y, x) fractions
    z, y, x = grid
    coarse = (max(2, nz // 8), max(2, ny // 16), max(2, nx // 16))
    warp = (0.03 * _smooth_field(rng, shape, coarse), 0.03 * _smooth_field(rng, shape, coarse))
    jitter = lambda scale: rng.uniform(-scale, scale)  # noqa: E731

    # body: ellipse with a fat ring, slowly varying with z; spine behind
    by, bx = 0.36 * (1 + jitter(0.08)), 0.44 * (1 + jitter(0.06))
    body_r = ((y + warp[0] - 0.5) / by) ** 2 + ((x + warp[1] - 0.5) / bx) ** 2
    body = body_r < (1 + 0.05 * np.sin(4 * z + jitter(3))) ** 2
    fat_r = 0.86 + jitter(0.04)
    image = np.full(shape, -1000.0)
    image[body] = -100.0
    inner = body_r < fat_r**2
    image[inner] = 30.0 + 15.0 * _smooth_field(rng, shape, coarse)[inner]
    spine = ((y - 0.74) / 0.07) ** 2 + ((x - 0.5) / 0.06) ** 2 < 1
    image[spine & inner] = 450.0
    image[(((y - 0.75) / 0.025) ** 2 + ((x - 0.5) / 0.02) ** 2 < 1) & inner] = 20.0  # spinal canal

    # bowel-like blobs (unlabelled), intensities overlapping the liver's
    for _ in range(int(rng.integers(6, 11))):
        centre = (rng.uniform(0.0, 0.55), rng.uniform(0.2, 0.5), rng.uniform(0.35, 0.75))
        radii = (rng.uniform(0.08, 0.2), rng.uniform(0.03, 0.07), rng.uniform(0.03, 0.07))
        image[_blob(rng, grid, centre, radii, warp) & inner] = (
            rng.uniform(35, 85) if rng.random() < 0.8 else -600
        )

    label = np.zeros(shape, np.uint8)
    for name, (centre, radii, hu) in _ORGANS.items():
        centre = tuple(c + jitter(0.04) for c in centre)
        radii = tuple(r * (1 + jitter(0.15)) for r in radii)
        mask = _blob(rng, grid, centre, radii, warp) & inner & ~spine
        image[mask] = hu + jitter(10) + 8.0 * _smooth_field(rng, shape, coarse)[mask]
        label[mask] = CLASSES.index(name) + 1
    # aorta: a tube through every slice, in front of the spine, drifting slowly
    ay = 0.6 + jitter(0.02) + 0.015 * np.sin(2 * z + jitter(3))
    ax = 0.54 + jitter(0.02) + 0.015 * np.sin(2 * z + jitter(3))
    ar = 0.035 * (1 + jitter(0.15)) * (1 + 0.1 * z)
    aorta = (((y - ay) ** 2 + (x - ax) ** 2) < ar**2) & inner
    image[aorta] = 200.0 + jitter(15)
    label[aorta] = CLASSES.index("aorta") + 1

    image = ndimage.gaussian_filter(image, sigma=(0.3, 0.7, 0.7))  # partial volume
    image += rng.normal(0.0, 12.0, shape)  # scanner noise
    return np.clip(np.round(image), -1024, 3071).astype(np.int16), label


def storage_geometry(
    path: Path,
    shape_zyx: tuple[int, int, int],
    spacing_zyx: tuple[float, float, float],
    axes: tuple[int, int, int],
    flips: tuple[bool, bool, bool],
    degrees: float = 0.0,
) -> Geometry:
    """A Geometry storing a canonical array in a given voxel order (and rotated about z by ``degrees``)."""
    d0 = np.zeros((3, 3))
    size, spacing = [0, 0, 0], [0.0, 0.0, 0.0]
    corner = np.zeros(3)  # physical position of stored index 0, before rotation
    for k in range(3):
        p, c = 2 - k, 2 - axes[k]  # physical axis, stored index axis
        d0[p, c] = -1.0 if flips[k] else 1.0
        size[c], spacing[c] = shape_zyx[k], spacing_zyx[k]
        corner[p] = (shape_zyx[k] - 1) * spacing_zyx[k] if flips[k] else 0.0
    t = np.deg2rad(degrees)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    direction = tuple(float(v) for v in (rot @ d0).ravel())
    origin = tuple(float(v) for v in rot @ (corner - np.array([100.0, 120.0, 300.0])))
    found_axes, found_flips = orientation(direction)
    assert found_axes == tuple(axes) and found_flips == tuple(flips)
    return Geometry(str(path), tuple(size), tuple(spacing), origin, direction, tuple(axes), tuple(flips))


def make_phantoms(out: Path, cases: int, seed: int, size: tuple[int, int, int] = (32, 128, 128)) -> Path:
    """Write ``cases`` phantoms as an nnU-Net raw dataset in ``out``; returns ``out``.

    ``size`` is the canonical (z, y, x) size; the slice count varies by up to 1/8 from case to case.
    Files: ``dataset.json``, ``imagesTr/phantom_XXX_0000.nii.gz`` (int16 HU), ``labelsTr/phantom_XXX.nii.gz``.
    """
    out = Path(out)
    if cases < 1:
        raise UserError(f"cases must be >= 1, got {cases}")
    if min(size) < 4:
        raise UserError(f"phantom size {size} is too small (at least 4 voxels per axis)")
    for i in range(cases):
        rng = np.random.default_rng([seed, i])
        nz = int(size[0] + rng.integers(-(size[0] // 8), size[0] // 8 + 1))
        shape = (nz, size[1], size[2])
        spacing = (round(float(rng.uniform(2.0, 3.0)), 3), *([round(float(rng.uniform(0.7, 0.95)), 3)] * 2))
        axes, flips, degrees = _STORAGE[i % len(_STORAGE)]
        image, label = _case(rng, shape)
        case_id = f"phantom_{i:03d}"
        geom = storage_geometry(
            out / "imagesTr" / f"{case_id}_0000.nii.gz", shape, spacing, axes, flips, degrees
        )
        write_volume(image, geom, out / "imagesTr" / f"{case_id}_0000.nii.gz", overwrite=True)
        write_label_volume(label, geom, out / "labelsTr" / f"{case_id}.nii.gz", overwrite=True)
    spec = {
        "name": "sautomed phantoms",
        "description": f"synthetic CT-like abdomen phantoms, seed {seed}",
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, **{name: i + 1 for i, name in enumerate(CLASSES)}},
        "numTraining": cases,
        "file_ending": ".nii.gz",
    }
    text = json.dumps(spec, indent=2) + "\n"
    atomic_write(out / "dataset.json", lambda tmp: tmp.write_text(text))
    return out
