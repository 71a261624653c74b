"""Synthetic MR-like head volumes with tumour-like lesions ("lesion phantoms") in the nnU-Net raw layout.

Each case is a head (a bright scalp/skull ring around textured brain tissue with darker ventricles) holding
one or two lesions in BraTS's label scheme: 2 oedema (a large irregular halo, bright as in FLAIR), inside it
the tumour core: 4 enhancing rim, 1 necrosis at its centre, and sometimes 3 non-enhancing tumour. Lesions are
smoothly deformed ellipsoids (``phantom._blob``) placed at random inside the brain, with random sizes, so the
whole tumour (labels > 0) is a small, variable, blob-like target, as in lesion segmentation. Optionally
(``mimics``) unlabelled lesion-like blobs (homogeneous, no halo, in the lesion intensity range) make the
image alone ambiguous, as cysts or vessels do: then clicks carry information the image lacks. Intensities are
arbitrary MR-like units (use percentile normalisation). Spacing is isotropic 1 mm; voxel orders vary as in
``phantom.py`` (its geometry and writer functions are reused). Output is deterministic for a seed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy import ndimage

from sautomed.errors import UserError

from .io import atomic_write, write_label_volume, write_volume
from .phantom import _STORAGE, _blob, _smooth_field, storage_geometry

LESION_LABELS = {"necrosis": 1, "edema": 2, "non_enhancing_tumour": 3, "enhancing_tumour": 4}


def _lesion(rng: np.random.Generator, grid, brain: np.ndarray, warp, label: np.ndarray, image: np.ndarray):
    """Paint one lesion (oedema halo, enhancing rim, necrotic centre) into ``label`` and ``image``."""
    centre = tuple(rng.uniform(0.3, 0.7, 3))
    core = rng.uniform(0.05, 0.12)
    radii = tuple(core * rng.uniform(0.8, 1.25, 3))
    halo = tuple(r * rng.uniform(1.4, 2.0) for r in radii)
    edema = _blob(rng, grid, centre, halo, warp) & brain
    tumour = _blob(rng, grid, centre, radii, warp) & brain
    necrosis = _blob(rng, grid, centre, tuple(r * rng.uniform(0.35, 0.6) for r in radii), warp) & tumour
    label[edema & (label == 0)] = LESION_LABELS["edema"]
    image[edema] = 620.0 + rng.uniform(-40, 40)
    label[tumour] = LESION_LABELS["enhancing_tumour"]
    image[tumour] = 520.0 + rng.uniform(-40, 40)
    if rng.random() < 0.4:  # a non-enhancing part on one side of the core
        side = tumour & (grid[2] > centre[2])
        label[side] = LESION_LABELS["non_enhancing_tumour"]
        image[side] = 470.0
    label[necrosis] = LESION_LABELS["necrosis"]
    image[necrosis] = 380.0 + rng.uniform(-30, 30)


def _mimic(rng: np.random.Generator, grid, brain: np.ndarray, warp, label: np.ndarray, image: np.ndarray):
    """Paint one unlabelled lesion-like blob where there is no lesion."""
    centre = tuple(rng.uniform(0.3, 0.7, 3))
    radii = tuple(rng.uniform(0.06, 0.14) * rng.uniform(0.8, 1.25, 3))
    blob = _blob(rng, grid, centre, radii, warp) & brain & (label == 0)
    image[blob] = rng.uniform(500.0, 640.0)


def _case(
    rng: np.random.Generator, shape: tuple[int, int, int], mimics: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """One canonical (z, y, x) int16 image and uint8 label volume."""
    grid = np.meshgrid(*(np.linspace(0, 1, n) for n in shape), indexing="ij")
    z, y, x = grid
    coarse = tuple(max(2, n // 8) for n in shape)
    warp = (0.03 * _smooth_field(rng, shape, coarse), 0.03 * _smooth_field(rng, shape, coarse))
    r = ((z - 0.5) / 0.46) ** 2 + ((y - 0.5) / 0.44) ** 2 + ((x - 0.5) / 0.40) ** 2
    head, brain = r < 1.0, r < 0.80
    image = np.zeros(shape)
    image[head] = 800.0  # scalp and skull (bright ring)
    image[brain] = 400.0 + 40.0 * _smooth_field(rng, shape, coarse)[brain]  # brain tissue texture
    for side in (-1, 1):  # ventricles: two dark blobs near the centre
        vent = _blob(rng, grid, (0.5, 0.48, 0.5 + side * 0.06), (0.12, 0.1, 0.03), warp) & brain
        image[vent] = 150.0
    label = np.zeros(shape, np.uint8)
    for _ in range(1 if rng.random() < 0.7 else 2):
        _lesion(rng, grid, brain, warp, label, image)
    for _ in range(int(rng.integers(0, mimics + 1)) if mimics else 0):
        _mimic(rng, grid, brain, warp, label, image)
    image = ndimage.gaussian_filter(image, sigma=0.7)  # partial volume
    image += rng.normal(0.0, 15.0, shape)
    return np.clip(np.round(image), 0, 4000).astype(np.int16), label


def _t1c(rng: np.random.Generator, flair: np.ndarray, label: np.ndarray) -> np.ndarray:
    """A T1c-like second channel on the same grid: the enhancing rim bright, necrosis dark, oedema barely
    visible (unlike FLAIR, where the oedema is the brightest part of the lesion)."""
    image = flair.astype(np.float64) * 0.8
    image[label == LESION_LABELS["edema"]] = 340.0
    image[label == LESION_LABELS["non_enhancing_tumour"]] = 300.0
    image[label == LESION_LABELS["enhancing_tumour"]] = 900.0 + rng.uniform(-60, 60)
    image[label == LESION_LABELS["necrosis"]] = 180.0
    image = ndimage.gaussian_filter(image, sigma=0.7) + rng.normal(0.0, 15.0, flair.shape)
    return np.clip(np.round(image), 0, 4000).astype(np.int16)


def make_lesion_phantoms(
    out: Path,
    cases: int,
    seed: int,
    size: tuple[int, int, int] = (64, 64, 64),
    mimics: int = 0,
    channels: int = 1,
) -> Path:
    """Write ``cases`` lesion phantoms as an nnU-Net raw dataset in ``out``; returns ``out``.

    ``mimics``: each case gets 0..``mimics`` unlabelled lesion-like blobs (0: none, the default).
    ``channels``: 1 (FLAIR-like) or 2 (also a T1c-like ``_0001`` on the same grid; channel 0 unchanged).

    Files: ``dataset.json``, ``imagesTr/lesion_XXX_0000.nii.gz`` (int16), ``labelsTr/lesion_XXX.nii.gz``
    (labels 0..4 as BraTS). ``size`` is the canonical (z, y, x) size; spacing is 1 mm.
    """
    if channels not in (1, 2):
        raise UserError(f"lesion phantoms have 1 or 2 channels, got {channels}")
    out = Path(out)
    if cases < 1:
        raise UserError(f"cases must be >= 1, got {cases}")
    if min(size) < 16:
        raise UserError(f"lesion phantom size {size} is too small (at least 16 voxels per axis)")
    for i in range(cases):
        rng = np.random.default_rng([seed, i])
        image, label = _case(rng, tuple(size), mimics)
        axes, flips, degrees = _STORAGE[i % len(_STORAGE)]
        case_id = f"lesion_{i:03d}"
        path = out / "imagesTr" / f"{case_id}_0000.nii.gz"
        geom = storage_geometry(path, tuple(size), (1.0, 1.0, 1.0), axes, flips, degrees)
        write_volume(image, geom, path, overwrite=True)
        if channels == 2:
            t1c = _t1c(np.random.default_rng([seed, i, 1]), image, label)
            write_volume(t1c, geom, path.with_name(f"{case_id}_0001.nii.gz"), overwrite=True)
        write_label_volume(label, geom, out / "labelsTr" / f"{case_id}.nii.gz", overwrite=True)
    spec = {
        "name": "sautomed lesion phantoms",
        "description": f"synthetic MR-like heads with tumour-like lesions, seed {seed}, mimics {mimics}",
        "channel_names": {"0": "FLAIR", "1": "T1c"} if channels == 2 else {"0": "FLAIR"},
        "labels": {"background": 0, **LESION_LABELS},
        "numTraining": cases,
        "file_ending": ".nii.gz",
    }
    text = json.dumps(spec, indent=2) + "\n"
    atomic_write(out / "dataset.json", lambda tmp: tmp.write_text(text))
    return out
