"""The frozen encoder's feature cache: slice_key -> float16 features, in RAM or memory-mapped on disk.

A fit with a frozen encoder and fixed augmented copies encodes every training slice once
(``window.encode_window_cached``, ``dense.pretrain_dense_head``). The cache knows how many slices to expect
(``expect``); on the first features stored it computes the whole cache's size and, above ``limit_bytes``
(default: half the machine's memory), keeps the features in one memory-mapped file in ``folder`` instead of
RAM (deleted when the cache is), or refuses with the figures when there is no folder. Slice keys are the
data's contiguous ``slice_key`` values ``0 .. N-1`` (``data.datasets.WindowDataset``).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from sautomed.errors import UserError

log = logging.getLogger(__name__)

GIB = 1024**3


def machine_memory_bytes() -> int:
    """Physical memory of this machine (0 when the platform does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return 0


def default_limit_bytes() -> int:
    return machine_memory_bytes() // 2 or 8 * GIB


class FeatureCache:
    """A dict-like ``slice_key -> (D, h, w)`` float16 tensor store with a memory limit.

    Args:
        limit_bytes: largest cache kept in RAM (None: half the machine's memory).
        folder: where a larger cache is memory-mapped (None: a larger cache is refused).
    """

    def __init__(self, limit_bytes: int | None = None, folder: str | Path | None = None) -> None:
        self.limit_bytes = default_limit_bytes() if limit_bytes is None else int(limit_bytes)
        self.folder = None if folder is None else Path(folder)
        self.expected = 0  # slices the run will store (0: unknown, RAM)
        self._ram: dict[int, Tensor] = {}
        self._map: np.memmap | None = None
        self._filled: np.ndarray | None = None
        self._file: tempfile._TemporaryFileWrapper | None = None
        self.where = "ram"

    def expect(self, slices: int) -> None:
        """The number of distinct slices the run will store (keys ``0 .. slices - 1``)."""
        self.expected = int(slices)

    def nbytes(self, feature: Tensor) -> int:
        """The whole cache's size for features like ``feature``, once every expected slice is stored."""
        return self.expected * feature.numel() * 2

    def _plan(self, feature: Tensor) -> None:
        total = self.nbytes(feature)
        if total <= self.limit_bytes or not self.expected:
            log.info("feature cache: %d slices, %.2f GiB in memory", self.expected, total / GIB)
            return
        if self.folder is None:
            raise UserError(
                f"the frozen encoder's feature cache would need {total / GIB:.1f} GiB for {self.expected} "
                f"slices, over its {self.limit_bytes / GIB:.1f} GiB limit: fewer "
                "data.windows.augmented_copies, a smaller image size, or model.feature_cache_limit_gb"
            )
        self.folder.mkdir(parents=True, exist_ok=True)
        self._file = tempfile.NamedTemporaryFile(prefix="feature_cache_", suffix=".f16", dir=self.folder)
        shape = (self.expected, *feature.shape)
        self._map = np.memmap(self._file.name, dtype=np.float16, mode="w+", shape=shape)
        self._filled = np.zeros(self.expected, dtype=bool)
        self.where = self._file.name
        log.info(
            "feature cache: %d slices, %.2f GiB over the %.2f GiB memory limit: memory-mapped in %s",
            self.expected,
            total / GIB,
            self.limit_bytes / GIB,
            self._file.name,
        )

    def __contains__(self, key: int) -> bool:
        if self._map is not None:
            return 0 <= key < len(self._filled) and bool(self._filled[key])
        return key in self._ram

    def __getitem__(self, key: int) -> Tensor:
        if self._map is not None:
            if not self._filled[key]:
                raise KeyError(key)
            return torch.from_numpy(np.asarray(self._map[key]))
        return self._ram[key]

    def __setitem__(self, key: int, value: Tensor) -> None:
        value = value.detach().to(torch.float16)
        if not self._ram and self._map is None:
            self._plan(value)
        if self._map is not None:
            self._map[key] = value.cpu().numpy()
            self._filled[key] = True
        else:
            self._ram[key] = value.clone()  # on the encoder's device

    def __len__(self) -> int:
        return int(self._filled.sum()) if self._filled is not None else len(self._ram)

    def clear(self) -> None:
        """Forget every feature (and delete the memory-mapped file)."""
        self._ram.clear()
        self._map = self._filled = None
        if self._file is not None:
            self._file.close()
            self._file = None
        self.where = "ram"
