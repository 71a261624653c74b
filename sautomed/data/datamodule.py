"""LightningDataModule: slice windows for training, whole volumes for validate / test / predict.

No I/O happens in `__init__`; cases are discovered and preprocessed (through the content-hash cache) in
`setup`. Every random choice of a training sample is derived from (seed, epoch, index), so a run repeats
exactly for a seed, and a resumed run sees the data order it would have seen.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from sautomed.data.augment import Augmentation, augment_window
from sautomed.data.io import VolumeError, read_volume
from sautomed.data.layouts import Layout, get_layout
from sautomed.data.preprocess import Prepared, Preprocessing, VolumeCache, path_sha256, preprocess
from sautomed.data.splits import resolve_split

log = logging.getLogger(__name__)


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class _Epoch:
    """Holds the epoch; Lightning finds it as `batch_sampler.sampler` and calls `set_epoch`."""

    def __init__(self) -> None:
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class WindowBatchSampler(Sampler[list[tuple[int, int, int]]]):
    """Batches of (epoch, item, warm-ups) keys; the warm-up count n is drawn once per batch.

    A seeded permutation of the items per epoch, sharded across DDP ranks without padding. Every key
    carries what the dataset needs to derive its randomness, so workers need no shared state and a
    resumed run (Lightning calls `set_epoch`) reproduces the data order.
    """

    def __init__(self, n: int, batch_size: int, warmups: tuple[int, int], seed: int) -> None:
        if not 1 <= warmups[0] <= warmups[1]:
            raise ValueError(f"warm-up range must satisfy 1 <= min <= max, got {warmups}")
        self.n, self.batch_size, self.warmups, self.seed = n, batch_size, warmups, seed
        self.sampler = _Epoch()

    def _batches(self) -> list[list[tuple[int, int, int]]]:
        rank, world = _rank_world()
        epoch = self.sampler.epoch
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)[rank::world]
        batches = []
        for b, start in enumerate(range(0, len(perm), self.batch_size)):
            warm = int(
                np.random.default_rng([self.seed, epoch, rank, b]).integers(
                    self.warmups[0], self.warmups[1] + 1
                )
            )
            batches.append([(epoch, int(i), warm) for i in perm[start : start + self.batch_size]])
        return batches

    def __iter__(self):
        # lazily: when Lightning resumes from a checkpoint it creates the epoch's batch iterator before it
        # calls set_epoch, so the batches must be drawn at the first next(), not at iter()
        yield from self._batches()

    def __len__(self) -> int:
        rank, world = _rank_world()
        return -(-len(range(rank, self.n, world)) // self.batch_size)


class ShardSampler(Sampler[int]):
    """Every item exactly once over all ranks (rank r takes r, r + world, ...): no padding duplicates."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):
        rank, world = _rank_world()
        return iter(range(rank, self.n, world))

    def __len__(self) -> int:
        rank, world = _rank_world()
        return len(range(rank, self.n, world))


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


def _single(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Volumes differ in depth: one volume per batch, passed through unstacked."""
    return batch[0]


@dataclass(frozen=True)
class PhantomSettings:
    """Synthetic data made in `prepare_data` when the folders are missing (the embedded default)."""

    cases: int = 10
    seed: int = 0
    test_cases: int = 4
    test_seed: int = 1000


@dataclass(frozen=True)
class Windows:
    """Training-window settings."""

    samples_per_epoch: int = 512
    warmup_min: int = 1
    warmup_max: int = 3
    foreground_fraction: float = 0.8
    class_balanced: bool = False  # foreground targets: a class uniformly first, then a slice holding it


class SegmentationDataModule(L.LightningDataModule):
    """Data for every model family: slice windows for training, volumes for evaluation.

    Args:
        layout: dataset layout: btcv, chaos, segthor, nnunet (also MSD) or folder.
        root: the dataset's root folder.
        label_map: optional JSON mapping source label values to the model's classes (btcv layout).
        fold: cross-validation fold used by fit / validate.
        folds: number of folds (5 in the paper).
        split_seed: seed of the case shuffle before cutting folds.
        splits_file: a user's splits.json (wins over the computed split).
        test_root: folder tested by `sautomed test` (all of its cases); default: `root`.
        test_layout: layout of `test_root`; default: `layout`.
        preprocessing: intensity normalisation and in-plane size S.
        windows: training-window sampling.
        augmentation: in-plane augmentation of training windows.
        batch_size: training windows per batch (8 in the paper).
        num_workers: DataLoader workers.
        cache_dir: preprocessed-volume cache; default `$SAUTOMED_CACHE` or `~/.cache/sautomed`.
        seed: seed of the training-window sampling.
        phantoms: if set, synthetic phantoms are written to `root` (and `test_root`) when missing.
    """

    def __init__(
        self,
        layout: Literal["btcv", "chaos", "segthor", "nnunet", "folder"] = "nnunet",
        root: str = "phantoms/train",
        label_map: str | None = None,
        fold: int = 0,
        folds: int = 5,
        split_seed: int = 0,
        splits_file: str | None = None,
        test_root: str | None = None,
        test_layout: Literal["btcv", "chaos", "segthor", "nnunet", "folder"] | None = None,
        preprocessing: Preprocessing = Preprocessing(),
        windows: Windows = Windows(),
        augmentation: Augmentation = Augmentation(),
        batch_size: int = 8,
        num_workers: int = 0,
        cache_dir: str | None = None,
        seed: int = 0,
        phantoms: PhantomSettings | None = None,
    ) -> None:
        super().__init__()
        self.layout_name, self.root, self.label_map = layout, root, label_map
        self.fold, self.folds, self.split_seed, self.splits_file = fold, folds, split_seed, splits_file
        self.test_root, self.test_layout = test_root, test_layout
        self.preprocessing, self.windows, self.augmentation = preprocessing, windows, augmentation
        self.batch_size, self.num_workers, self.cache_dir, self.seed = (
            batch_size,
            num_workers,
            cache_dir,
            seed,
        )
        self.phantoms = phantoms
        self._layout: Layout | None = None
        self._cache: VolumeCache | None = None
        self.train_cases: list = []
        self.val_cases: list = []
        self.test_cases: list = []

    # -- discovery -----------------------------------------------------------------------------------
    @property
    def layout(self) -> Layout:
        if self._layout is None:
            self._layout = get_layout(self.layout_name, self.root, self.label_map)
        return self._layout

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.layout.class_names)

    @property
    def cache(self) -> VolumeCache:
        if self._cache is None:
            default = os.environ.get("SAUTOMED_CACHE") or str(Path.home() / ".cache" / "sautomed")
            self._cache = VolumeCache(Path(self.cache_dir or default))
        return self._cache

    def _run_dir(self) -> Path:
        trainer = getattr(self, "trainer", None)
        return Path(trainer.default_root_dir if trainer is not None else ".")

    def prepare_data(self) -> None:
        if self.phantoms is None:
            return
        from sautomed.data.phantom import make_phantoms

        todo = [(self.root, self.phantoms.cases, self.phantoms.seed)]
        if self.test_root:
            todo.append((self.test_root, self.phantoms.test_cases, self.phantoms.test_seed))
        for root, cases, seed in todo:
            spec = Path(root) / "dataset.json"
            if not spec.is_file():
                log.info("making %d phantom cases (seed %d) in %s", cases, seed, root)
                make_phantoms(Path(root), cases, seed)
                continue
            try:
                found = json.loads(spec.read_text()).get("numTraining")
            except (OSError, ValueError, AttributeError):
                found = None
            if found != cases:  # an existing folder is used as it is, never remade over
                log.warning(
                    "%s already exists with %s cases, the config asks for %d: using it as it is "
                    "(delete the folder to remake the phantoms)",
                    root,
                    found,
                    cases,
                )

    def setup(self, stage: str) -> None:
        if stage in ("fit", "validate"):
            cases = self.layout.cases()
            by_id = {c.case_id: c for c in cases}
            user = Path(self.splits_file) if self.splits_file else None
            train_ids, val_ids = resolve_split(
                list(by_id), self._run_dir(), self.fold, self.folds, self.split_seed, user_file=user
            )
            self.train_cases = [by_id[i] for i in train_ids]
            self.val_cases = [by_id[i] for i in val_ids]
            log.info("fold %d: %d training and %d validation cases", self.fold, len(train_ids), len(val_ids))

    # -- loaders -------------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        volumes = [self.cache.get(self.layout, c, self.preprocessing) for c in self.train_cases]
        unlabeled = [v.case_id for v in volumes if v.label is None]
        if unlabeled:
            raise ValueError(f"training cases without labels: {', '.join(unlabeled)}")
        ds = WindowDataset(
            volumes,
            self.windows.samples_per_epoch,
            self.seed,
            self.augmentation,
            self.windows.foreground_fraction,
            self.windows.class_balanced,
        )
        w = self.windows
        sampler = WindowBatchSampler(len(ds), self.batch_size, (w.warmup_min, w.warmup_max), self.seed)
        return DataLoader(ds, batch_sampler=sampler, num_workers=self.num_workers)

    def _volume_loader(self, layout: Layout, cases: list) -> DataLoader:
        ds = VolumeDataset(layout, cases, self.cache, self.preprocessing)
        return DataLoader(ds, batch_size=1, sampler=ShardSampler(len(ds)), collate_fn=_single, num_workers=0)

    def val_dataloader(self) -> DataLoader:
        return self._volume_loader(self.layout, self.val_cases)

    def test_dataloader(self) -> DataLoader:
        layout = get_layout(self.test_layout or self.layout_name, self.test_root or self.root, self.label_map)
        self.test_cases = layout.cases()
        return self._volume_loader(layout, self.test_cases)

    def case_fingerprints(self, which: Literal["train", "val", "test"]) -> dict[str, str]:
        """{case id: sha256 of the image's bytes} of the fold's training or validation cases, or of the cases
        `test` evaluates (after `test_dataloader`). A checkpoint records those of its fit, so that an
        evaluation can name the cases it was trained on whatever their ids or folders."""
        cases = {"train": self.train_cases, "val": self.val_cases, "test": self.test_cases}[which]
        return {c.case_id: path_sha256(c.image) for c in cases}
