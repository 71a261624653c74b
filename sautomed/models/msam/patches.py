"""3D training crops around lesions, and the data module that serves them (validation stays volumes).

M-SAM trains on 128^3 crops (SAM-Med3D's ``tio.CropOrPad`` around the label, random flips). Here a crop is
centred on a random lesion voxel (plus a random shift of up to a quarter crop) with probability
``foreground_fraction``, else on a random voxel of the volume; outside the volume it is zero-padded. The
target is binary: the voxels whose label is in ``foreground_labels`` (all labels > 0 by default: the whole
tumour). Every random choice comes from (seed, epoch, index), so a run repeats exactly for a seed.

Volumes are the shared cache's preprocessed ones (intensities in [0, 1], slices resized in plane to
``preprocessing.image_size``; keep that at the data's own in-plane size for 3D crops at native spacing).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from sautomed.data.datamodule import SegmentationDataModule
from sautomed.data.preprocess import Prepared
from sautomed.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CropSettings:
    """Training-crop settings.

    Attributes:
        size: crop edge (= the network's ``image_size``).
        samples_per_epoch: crops per epoch.
        foreground_fraction: share of crops centred on a lesion voxel (the rest: anywhere).
        shift: random offset of a lesion-centred crop, as a fraction of ``size`` (each axis, +-).
        flip: random flips along the three axes.
    """

    size: int = 128
    samples_per_epoch: int = 256
    foreground_fraction: float = 0.9
    shift: float = 0.25
    flip: bool = True


def binary_target(label: np.ndarray, foreground_labels: Sequence[int] | None) -> np.ndarray:
    """Label map -> bool mask: labels in ``foreground_labels``, or every label > 0 when None."""
    if foreground_labels is None:
        return label > 0
    return np.isin(label, np.asarray(list(foreground_labels)))


def crop_or_pad(volume: np.ndarray, start: Sequence[int], size: int) -> np.ndarray:
    """The ``size``^3 block of ``volume`` (z, y, x) starting at ``start`` (may be negative), zeros outside;
    leading axes (channels: (C, z, y, x)) are kept whole."""
    lead = volume.shape[:-3]
    out = np.zeros((*lead, size, size, size), dtype=volume.dtype)
    src: list[slice] = [slice(None)] * len(lead)
    dst: list[slice] = [slice(None)] * len(lead)
    for s, n in zip(start, volume.shape[-3:]):
        lo, hi = max(0, s), min(n, s + size)
        src.append(slice(lo, max(lo, hi)))
        dst.append(slice(lo - s, lo - s + max(0, hi - lo)))
    out[tuple(dst)] = volume[tuple(src)]
    return out


def crop_start(centre: Sequence[int], shape: Sequence[int], size: int) -> list[int]:
    """Start of a crop centred at ``centre``, moved inside the volume where the volume is large enough."""
    start = []
    for c, n in zip(centre, shape):
        s = int(c) - size // 2
        start.append(min(max(s, 0), n - size) if n >= size else (n - size) // 2)
    return start


class EpochSampler(Sampler[tuple[int, int]]):
    """Keys (epoch, index): a seeded permutation per epoch, sharded over DDP ranks (Lightning sets epochs)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rank_world(self) -> tuple[int, int]:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def __iter__(self):
        rank, world = self._rank_world()
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)[rank::world]
        return iter([(self.epoch, int(i)) for i in perm])

    def __len__(self) -> int:
        rank, world = self._rank_world()
        return len(range(rank, self.n, world))


class LesionCropDataset(Dataset):
    """Random 3D crops. Item: ``image`` (C, c, c, c) float32 (C input channels), ``label`` (1, c, c, c)
    float32 in {0, 1}.

    Args:
        volumes: preprocessed labelled volumes.
        settings: crop settings.
        seed: seed of the crop sampling.
        foreground_labels: labels that make the binary target (None: all > 0).
    """

    def __init__(
        self,
        volumes: list[Prepared],
        settings: CropSettings,
        seed: int,
        foreground_labels: Sequence[int] | None = None,
    ) -> None:
        if not volumes:
            raise UserError("no training volumes")
        self.volumes, self.settings, self.seed = volumes, settings, seed
        self.targets = [binary_target(v.label, foreground_labels) for v in volumes]
        self.fg = [np.flatnonzero(t) for t in self.targets]  # flat indices of lesion voxels

    def __len__(self) -> int:
        return self.settings.samples_per_epoch

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        epoch, i = key if isinstance(key, tuple) else (0, key)
        rng = np.random.default_rng([self.seed, epoch, i])
        c = int(rng.integers(len(self.volumes)))
        s = self.settings
        shape = self.targets[c].shape
        if len(self.fg[c]) and rng.random() < s.foreground_fraction:
            centre = np.array(np.unravel_index(int(self.fg[c][rng.integers(len(self.fg[c]))]), shape))
            centre = centre + rng.integers(-int(s.shift * s.size), int(s.shift * s.size) + 1, 3)
        else:
            centre = np.array([rng.integers(n) for n in shape])
        start = crop_start(centre, shape, s.size)
        volume = self.volumes[c].image  # float16: cut the crop first, then convert it alone
        image = crop_or_pad(volume if volume.ndim == 4 else volume[None], start, s.size).astype(np.float32)
        target = crop_or_pad(self.targets[c], start, s.size)
        if s.flip:
            axes = tuple(a for a in range(3) if rng.random() < 0.5)
            if axes:
                image, target = np.flip(image, tuple(a + 1 for a in axes)), np.flip(target, axes)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image)),
            "label": torch.from_numpy(np.ascontiguousarray(target, dtype=np.float32))[None],
        }


class MSAMDataModule(SegmentationDataModule):
    """The shared data module with 3D lesion crops for training (validate / test / predict: volumes).

    Args:
        crops: training-crop settings.
        foreground_labels: labels forming the binary target (None: all > 0, the whole tumour).
        channels: input channels per case, nnU-Net's ``case_0000`` (FLAIR), ``case_0001`` (T1c) ... files of
            the nnunet layout, checked to share one grid (= ``model.network.in_channels``).
        **kwargs: the shared ``SegmentationDataModule``'s arguments; ``phantoms`` here makes lesion phantoms
            (``sautomed.data.lesion_phantom``) of 64^3 when the folders are missing.
    """

    def __init__(
        self,
        crops: CropSettings = CropSettings(),  # noqa: B008
        foreground_labels: list[int] | None = None,
        channels: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.crops = crops
        self.foreground_labels = foreground_labels
        self.channels = channels

    def prepare_data(self) -> None:
        if self.phantoms is None:
            return
        from sautomed.data.lesion_phantom import make_lesion_phantoms

        todo = [(self.root, self.phantoms.cases, self.phantoms.seed)]
        if self.test_root:
            todo.append((self.test_root, self.phantoms.test_cases, self.phantoms.test_seed))
        for root, cases, seed in todo:
            spec = Path(root) / "dataset.json"
            if not spec.is_file():
                make_lesion_phantoms(Path(root), cases, seed, channels=self.channels)
            elif json.loads(spec.read_text()).get("numTraining") != cases:
                log.warning("%s exists with another number of cases: using it as it is", root)

    def train_dataloader(self) -> DataLoader:
        volumes = [self.cache.get(self.layout, c, self.preprocessing) for c in self.train_cases]
        unlabeled = [v.case_id for v in volumes if v.label is None]
        if unlabeled:
            raise UserError(f"training cases without labels: {', '.join(unlabeled)}")
        ds = LesionCropDataset(volumes, self.crops, self.seed, self.foreground_labels)
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            sampler=EpochSampler(len(ds), self.seed),
            num_workers=self.num_workers,
        )
