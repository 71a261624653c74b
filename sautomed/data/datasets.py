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
from sautomed.data.errors import DatasetError
from sautomed.data.io import VolumeError, read_volume
from sautomed.data.layouts import Layout, channel_files, read_channels
from sautomed.data.preprocess import Prepared, Preprocessing, VolumeCache, preprocess
from sautomed.errors import UserError


def _class_slices(label: np.ndarray) -> dict[int, np.ndarray]:
    """(Z, S, S) labels -> {class: sorted indices of the slices holding it}, background left out."""
    per_slice = label.reshape(label.shape[0], -1)
    return {int(k): np.flatnonzero((per_slice == k).any(1)) for k in np.unique(per_slice) if k != 0}


class WindowDataset(Dataset):
    """Training windows. Key (epoch, item, n): target t, direction d, slices t-(n+1)d .. t+d (clamped).

    Item: `image` (n+3, S, S) float in processing order (n warm-ups at positions 1..n, the target at n+1,
    its far neighbour at n+2), `index` (n+3,) slice indices, `direction` (+1/-1), `label` (S, S) long of
    the target slice and `warmup_label` (n, S, S) long of the warm-up slices (for the optional warm-up loss).

    `augmented_copies` K > 0: each volume is augmented K - 1 times once, up front (copy 0 is the volume as it
    is), and windows are cut from a random copy without further augmentation. Every slice then has a stable
    identity, `slice_key` (n+3,), so a frozen encoder's features can be computed once and cached (the
    module does). `end_fraction`: the share of foreground targets taken 1-2 slices past one end of a class's
    extent, with the warm-ups inside it, so that "the organ ended" is trained as often as that.
    """

    def __init__(
        self,
        volumes: list[Prepared],
        samples_per_epoch: int,
        seed: int,
        augmentation: Augmentation,
        foreground_fraction: float,
        class_balanced: bool = False,
        augmented_copies: int = 0,
        end_fraction: float = 0.0,
    ) -> None:
        if not volumes:
            raise UserError("no training volumes")
        if augmented_copies < 0 or not 0.0 <= end_fraction <= 1.0:
            raise UserError("augmented_copies must be >= 0 and end_fraction within [0, 1]")
        self.augmented_copies = augmented_copies
        self.end_fraction = end_fraction
        self.copies: list[list[tuple[np.ndarray, np.ndarray]]] = []  # [volume][copy] -> (image, label)
        self.key_offset: list[list[int]] = []  # first slice_key of each (volume, copy)
        offset = 0
        for c, v in enumerate(volumes if augmented_copies else []):
            copies, offsets = [], []
            for j in range(augmented_copies):
                image, label = np.asarray(v.image, dtype=np.float32), np.asarray(v.label)
                if j > 0:  # the whole volume under one transform: a slice's copy is the same in every window
                    rng = np.random.default_rng([seed, c, j, 7])
                    ti, tl = augment_window(
                        torch.from_numpy(image), torch.from_numpy(label.astype(np.int64)), rng, augmentation
                    )
                    image, label = ti.numpy(), tl.numpy().astype(label.dtype)
                copies.append((image, label))
                offsets.append(offset)
                offset += image.shape[0]
            self.copies.append(copies)
            self.key_offset.append(offsets)
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
        d = 0  # direction, chosen below unless an organ-end target fixes it
        if len(fg) and rng.random() < self.foreground_fraction:
            if self.end_fraction > 0 and rng.random() < self.end_fraction:
                t, d = self._end_target(c, z, rng)
            elif self.class_balanced:  # a class present in this volume, uniformly, then one of its slices
                slices = list(self.class_slices[c].values())
                cls_slices = slices[int(rng.integers(len(slices)))]
                t = int(cls_slices[rng.integers(len(cls_slices))])
            else:
                t = int(fg[rng.integers(len(fg))])
        else:
            t = int(rng.integers(z))
        # warm-ups come from before t in the processing direction; prefer a side where they fit
        fits_up, fits_down = t - (n + 1) >= 0, t + (n + 1) <= z - 1
        if d != 0:
            pass
        elif fits_up == fits_down:
            d = 1 if rng.random() < 0.5 else -1
        else:
            d = 1 if fits_up else -1
        idx = np.clip(t + (np.arange(n + 3) - (n + 1)) * d, 0, z - 1)
        item: dict[str, Any] = {"index": torch.from_numpy(idx), "direction": d}
        if self.augmented_copies:
            j = int(rng.integers(self.augmented_copies))
            vol_image, vol_label = self.copies[c][j]
            image = torch.from_numpy(np.ascontiguousarray(vol_image[idx]))
            labels = torch.from_numpy(vol_label[idx[1 : n + 2]].astype(np.int64))
            item["slice_key"] = torch.from_numpy(idx + self.key_offset[c][j])
        else:
            image = torch.from_numpy(np.ascontiguousarray(vol.image[idx], dtype=np.float32))
            labels = torch.from_numpy(vol.label[idx[1 : n + 2]].astype(np.int64))  # (n+1, S, S)
            image, labels = augment_window(image, labels, rng, self.augmentation)
        item.update(image=image, label=labels[n], warmup_label=labels[:n])
        return item

    def _end_target(self, c: int, z: int, rng: np.random.Generator) -> tuple[int, int]:
        """A target 1-2 slices past one end of a class's extent; the direction runs out of the organ."""
        slices = list(self.class_slices[c].values())
        cls = slices[int(rng.integers(len(slices)))]
        past = int(rng.integers(1, 3))
        if rng.random() < 0.5 and cls[-1] + past <= z - 1:
            return int(cls[-1] + past), 1  # moving up, out of the top of the organ
        if cls[0] - past >= 0:
            return int(cls[0] - past), -1
        return int(min(cls[-1] + past, z - 1)), 1


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
    """Volumes read from paths for prediction; a broken input becomes an item carrying its error.

    With ``channels`` C > 1 each input is a ``case_0000`` file read with its ``case_0001`` .. siblings
    (one grid, checked), as the nnunet layout reads a training case.
    """

    def __init__(
        self, inputs: list[tuple[Path, Path]], preprocessing: Preprocessing, channels: int = 1
    ) -> None:
        self.inputs, self.preprocessing, self.channels = inputs, preprocessing, channels

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        src, out = self.inputs[i]
        item: dict[str, Any] = {"case_id": src.name, "source": str(src), "output": str(out)}
        try:
            if self.channels > 1:
                image, geom = read_channels((Path(src), *channel_files(Path(src), self.channels)))
            else:
                image, geom = read_volume(src)
            pre, _ = preprocess(image, None, self.preprocessing)
        except (VolumeError, DatasetError, OSError, RuntimeError, ValueError) as exc:
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
