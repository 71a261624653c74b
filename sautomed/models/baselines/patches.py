"""3D training patches from the shared preprocessed volumes, with nnU-Net's foreground oversampling.

Key (epoch, item, _) -> a patch; all its randomness comes from (seed, epoch, item), as for the slice windows,
so a run repeats for a seed and a resumed run sees the same patches. A `foreground_fraction` of the patches
is centred on a voxel of a class present in the case (the class drawn uniformly, then one of its voxels); the
rest lie anywhere. Augmentation is the shared in-plane one (`sautomed.data.augment`: never left-right flips),
applied to a crop 1.5 times wider in plane and cut back to the patch, so rotations bring in real context and
not black corners.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from sautomed.data.augment import Augmentation, augment_window
from sautomed.data.preprocess import Prepared
from sautomed.errors import UserError

_MAX_VOXELS_PER_CLASS = 10_000  # candidate centres kept per class and case (nnU-Net keeps 10,000 too)
_AUGMENT_MARGIN = 1.5


@dataclass(frozen=True)
class Patches:
    """3D training patches (the unet3d baseline's training data instead of slice windows).

    Args:
        size: patch size (z, y, x) in preprocessed voxels; must equal `model.unet.patch_size`.
        samples_per_epoch: patches per epoch.
        foreground_fraction: share of patches centred on a voxel of a class (nnU-Net: a third).
    """

    size: tuple[int, int, int] = (32, 128, 128)
    samples_per_epoch: int = 250
    foreground_fraction: float = 0.33


def _class_voxels(label: np.ndarray, rng: np.random.Generator) -> dict[int, np.ndarray]:
    """(Z, S, S) labels -> {class: (k, 3) voxel coordinates}, at most `_MAX_VOXELS_PER_CLASS` per class."""
    out = {}
    for c in np.unique(label):
        if c == 0:
            continue
        coords = np.argwhere(label == c)
        if len(coords) > _MAX_VOXELS_PER_CLASS:
            coords = coords[rng.choice(len(coords), _MAX_VOXELS_PER_CLASS, replace=False)]
        out[int(c)] = coords
    return out


def crop(volume: np.ndarray, start: tuple[int, ...], size: tuple[int, ...]) -> np.ndarray:
    """The box `start`..`start + size` of a volume; parts outside it are zeros (background)."""
    out = np.zeros(size, dtype=volume.dtype)
    src = tuple(slice(max(0, s), min(n, s + k)) for s, k, n in zip(start, size, volume.shape))
    dst = tuple(slice(sl.start - s, sl.stop - s) for sl, s in zip(src, start))
    if all(sl.stop > sl.start for sl in src):
        out[dst] = volume[src]
    return out


class PatchDataset(Dataset):
    """Training patches. Item: `image` (C, pz, py, px) float in [0, 1] (C input channels: a volume's image
    is (Z, Y, X) for one, (C, Z, Y, X) for more), `label` (pz, py, px) long."""

    def __init__(
        self, volumes: list[Prepared], patches: Patches, seed: int, augmentation: Augmentation
    ) -> None:
        if not volumes:
            raise UserError("no training volumes")
        self.volumes, self.patches, self.seed, self.augmentation = volumes, patches, seed, augmentation
        self.class_voxels = [
            _class_voxels(v.label, np.random.default_rng([seed, k])) for k, v in enumerate(volumes)
        ]

    def __len__(self) -> int:
        return self.patches.samples_per_epoch

    def _centre(self, c: int, rng: np.random.Generator) -> np.ndarray:
        classes = self.class_voxels[c]
        if classes and rng.random() < self.patches.foreground_fraction:
            coords = list(classes.values())[int(rng.integers(len(classes)))]
            return coords[int(rng.integers(len(coords)))]
        shape = np.array(self.volumes[c].image.shape[-3:])
        size = np.array(self.patches.size)
        # anywhere the patch overlaps the volume; a volume shorter than the patch is centred in it
        low = np.minimum(size // 2, shape // 2)
        high = np.maximum(shape - (size - size // 2), shape // 2)
        return np.array([int(rng.integers(lo, hi + 1)) for lo, hi in zip(low, high)])

    def __getitem__(self, key: tuple[int, int, int]) -> dict[str, Any]:
        epoch, i, _ = key  # the third entry (the slice windows' warm-up count) is not used by patches
        rng = np.random.default_rng([self.seed, epoch, i])
        c = int(rng.integers(len(self.volumes)))
        vol = self.volumes[c]
        pz, py, px = self.patches.size
        augment = self.augmentation.enabled
        wy, wx = (math.ceil(py * _AUGMENT_MARGIN), math.ceil(px * _AUGMENT_MARGIN)) if augment else (py, px)
        centre = self._centre(c, rng)
        start = (int(centre[0]) - pz // 2, int(centre[1]) - wy // 2, int(centre[2]) - wx // 2)
        channels = vol.image if vol.image.ndim == 4 else vol.image[None]  # (C, Z, Y, X)
        image = np.stack([crop(ch, start, (pz, wy, wx)) for ch in channels]).astype(np.float32)
        image = torch.from_numpy(image)  # (C, pz, wy, wx)
        label = torch.from_numpy(crop(vol.label, start, (pz, wy, wx)).astype(np.int64))
        if augment:  # one transform for every slice of every channel
            C = image.shape[0]
            flat, label = augment_window(image.reshape(C * pz, wy, wx), label, rng, self.augmentation)
            image = flat.reshape(C, pz, wy, wx)
            oy, ox = (wy - py) // 2, (wx - px) // 2
            image, label = image[..., oy : oy + py, ox : ox + px], label[:, oy : oy + py, ox : ox + px]
        return {"image": image.contiguous(), "label": label.contiguous()}
