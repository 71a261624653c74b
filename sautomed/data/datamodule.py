"""LightningDataModule: slice windows for training, whole volumes for validate / test / predict.

No I/O happens in `__init__`; cases are discovered and preprocessed (through the content-hash cache) in
`setup`; `prepare_data` makes synthetic phantoms when configured and missing. The samplers are in
`samplers.py`, the datasets in `datasets.py`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import lightning as L
from torch.utils.data import DataLoader

from sautomed.data.augment import Augmentation
from sautomed.data.datasets import PredictDataset, VolumeDataset, WindowDataset, collate_single
from sautomed.data.layouts import Layout, get_layout
from sautomed.data.preprocess import Preprocessing, VolumeCache, path_sha256
from sautomed.data.samplers import ShardSampler, WindowBatchSampler
from sautomed.data.splits import resolve_split
from sautomed.errors import UserError

__all__ = [
    "PhantomSettings",
    "PredictDataset",
    "SegmentationDataModule",
    "ShardSampler",
    "VolumeDataset",
    "WindowBatchSampler",
    "WindowDataset",
    "Windows",
    "collate_single",
]

log = logging.getLogger(__name__)


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
    augmented_copies: int = 0  # K > 0: K fixed copies per volume (augmented once), cacheable features
    end_fraction: float = 0.0  # share of foreground targets 1-2 slices past an organ's end


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
        self.channels = 1  # input channels per case; a family reading more sets it (M-SAM's data.channels)
        self._layout: Layout | None = None
        self._cache: VolumeCache | None = None
        self.train_cases: list = []
        self.val_cases: list = []
        self.test_cases: list = []

    # -- discovery -----------------------------------------------------------------------------------
    @property
    def layout(self) -> Layout:
        if self._layout is None:
            self._layout = get_layout(self.layout_name, self.root, self.label_map, self.channels)
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

    def _run_dir(self) -> Path | None:
        """The trainer's run folder; None without a trainer (then no splits.json is written anywhere)."""
        trainer = getattr(self, "trainer", None)
        return Path(trainer.default_root_dir) if trainer is not None else None

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
            raise UserError(f"training cases without labels: {', '.join(unlabeled)}")
        ds = WindowDataset(
            volumes,
            self.windows.samples_per_epoch,
            self.seed,
            self.augmentation,
            self.windows.foreground_fraction,
            self.windows.class_balanced,
            self.windows.augmented_copies,
            self.windows.end_fraction,
        )
        w = self.windows
        sampler = WindowBatchSampler(len(ds), self.batch_size, (w.warmup_min, w.warmup_max), self.seed)
        return DataLoader(ds, batch_sampler=sampler, num_workers=self.num_workers)

    def _volume_loader(self, layout: Layout, cases: list) -> DataLoader:
        ds = VolumeDataset(layout, cases, self.cache, self.preprocessing)
        return DataLoader(
            ds, batch_size=1, sampler=ShardSampler(len(ds)), collate_fn=collate_single, num_workers=0
        )

    def val_dataloader(self) -> DataLoader:
        return self._volume_loader(self.layout, self.val_cases)

    def test_dataloader(self) -> DataLoader:
        layout = get_layout(
            self.test_layout or self.layout_name, self.test_root or self.root, self.label_map, self.channels
        )
        self.test_cases = layout.cases()
        return self._volume_loader(layout, self.test_cases)

    def case_fingerprints(self, which: Literal["train", "val", "test"]) -> dict[str, str]:
        """{case id: sha256 of the image's bytes} of the fold's training or validation cases, or of the cases
        `test` evaluates (after `test_dataloader`). A checkpoint records those of its fit, so that an
        evaluation can name the cases it was trained on whatever their ids or folders."""
        cases = {"train": self.train_cases, "val": self.val_cases, "test": self.test_cases}[which]
        return {c.case_id: path_sha256(c.image) for c in cases}
