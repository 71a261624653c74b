"""Datasets: training windows of slices, whole preprocessed volumes (validate / test), volumes to predict.

Every random choice of a training window is derived from (seed, epoch, index), so a run repeats exactly for a
seed, and a resumed run sees the data order it would have seen.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from sautomed.data.augment import Augmentation, augment_window
from sautomed.data.io import VolumeError, read_volume
from sautomed.data.layouts import Layout
from sautomed.data.preprocess import Prepared, Preprocessing, VolumeCache, preprocess


def _class_slices(label: np.ndarray) -> dict[int, np.ndarray]:
    """(Z, S, S) labels -> {class: sorted indices of the slices holding it}, background left out."""
    per_slice = label.reshape(label.shape[0], -1)
    return {int(k): np.flatnonzero((per_slice == k).any(1)) for k in np.unique(per_slice) if k != 0}


class WindowDataset(Dataset):
    """Training windows. Key (epoch, item, n): target t, direction d, slices t-(n+1)d .. t+d (clamped).

    Item: `image` (n+3, S, S) float in processing order (n warm-ups at positions 1..n, the target at n+1,
    its far neighbour at n+2), `index` (n+3,) slice indices, `direction` (+1/-1), `label` (S, S) long of
    the target slice and `warmup_label` (n, S, S) long of the warm-up slices (for the optional warm-up loss).
    """

    def __init__(
        self,
        volumes: list[Prepared],
        samples_per_epoch: int,
        seed: int,
        augmentation: Augmentation,
        foreground_fraction: float,
        class_balanced: bool = False,
    ) -> None:
        if not volumes:
            raise ValueError("no training volumes")
        self.volumes = volumes
        self.n = samples_per_epoch
        self.seed = seed
        self.augmentation = augmentation
        self.foreground_fraction = foreground_fraction
        self.class_balanced = class_balanced
        # per volume: {class: slices holding it}; their union is the volume's foreground slices
        self.class_slices = [_class_slices(v.label) for v in volumes]
        self.fg_slices = [
            np.unique(np.concatenate(list(cs.values()))) if cs else np.zeros(0, np.int64)
            for cs in self.class_slices
        ]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: tuple[int, int, int]) -> dict[str, Any]:
        epoch, i, n = key
        rng = np.random.default_rng([self.seed, epoch, i])
        c = int(rng.integers(len(self.volumes)))
        vol = self.volumes[c]
        z = vol.image.shape[0]
        fg = self.fg_slices[c]
        if len(fg) and rng.random() < self.foreground_fraction:
            if self.class_balanced:  # a class present in this volume, uniformly, then one of its slices
                slices = list(self.class_slices[c].values())
                cls_slices = slices[int(rng.integers(len(slices)))]
                t = int(cls_slices[rng.integers(len(cls_slices))])
            else:
                t = int(fg[rng.integers(len(fg))])
        else:
            t = int(rng.integers(z))
        # warm-ups come from before t in the processing direction; prefer a side where they fit
        fits_up, fits_down = t - (n + 1) >= 0, t + (n + 1) <= z - 1
        if fits_up == fits_down:
            d = 1 if rng.random() < 0.5 else -1
        else:
            d = 1 if fits_up else -1
        idx = np.clip(t + (np.arange(n + 3) - (n + 1)) * d, 0, z - 1)
        image = torch.from_numpy(np.ascontiguousarray(vol.image[idx], dtype=np.float32))
        labels = torch.from_numpy(vol.label[idx[1 : n + 2]].astype(np.int64))  # (n+1, S, S): warm-ups, target
        image, labels = augment_window(image, labels, rng, self.augmentation)
        return {
            "image": image,
            "label": labels[n],
            "warmup_label": labels[:n],
            "index": torch.from_numpy(idx),
            "direction": d,
        }


class VolumeDataset(Dataset):
    """Whole preprocessed volumes with their original-grid labels and geometry (validate / test)."""

    def __init__(self, layout: Layout, cases: list, cache: VolumeCache, preprocessing: Preprocessing) -> None:
        self.layout, self.cases, self.cache, self.preprocessing = layout, cases, cache, preprocessing

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, i: int) -> dict[str, Any]:
        prep = self.cache.get(self.layout, self.cases[i], self.preprocessing)
        return {
            "case_id": prep.case_id,
            "image": torch.from_numpy(np.asarray(prep.image, dtype=np.float32)),
            "label": None if prep.label_full is None else torch.from_numpy(prep.label_full.astype(np.uint8)),
            "geom": prep.geom,
        }


class PredictDataset(Dataset):
    """Volumes read from paths for prediction; a broken input becomes an item carrying its error."""

    def __init__(self, inputs: list[tuple[Path, Path]], preprocessing: Preprocessing) -> None:
        self.inputs, self.preprocessing = inputs, preprocessing

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        src, out = self.inputs[i]
        item: dict[str, Any] = {"case_id": src.name, "source": str(src), "output": str(out)}
        try:
            image, geom = read_volume(src)
            pre, _ = preprocess(image, None, self.preprocessing)
        except (VolumeError, OSError, RuntimeError, ValueError) as exc:
            item["error"] = str(exc)
            return item
        item.update(image=torch.from_numpy(pre.astype(np.float32)), geom=geom)  # as VolumeDataset's
        return item


class VolumeBatch(dict):
    """One volume's item. Moving it to a device moves its tensors and leaves the rest (its Geometry, a
    frozen dataclass, its names), so Lightning's own batch transfer handles it: no hook needs overriding."""

    def to(self, device: torch.device | str, *args: Any, **kwargs: Any) -> VolumeBatch:
        moved = {
            k: v.to(device, *args, **kwargs) if isinstance(v, torch.Tensor) else v for k, v in self.items()
        }
        return VolumeBatch(moved)


def collate_single(batch: list[dict[str, Any]]) -> VolumeBatch:
    """Volumes differ in depth: one volume per batch, passed through unstacked."""
    return VolumeBatch(batch[0])
