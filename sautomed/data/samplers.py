"""Samplers: training-window batches drawn from (seed, epoch), and volumes sharded across DDP ranks.

Neither pads with duplicates: every item is on exactly one rank.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

from sautomed.errors import UserError


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
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
            raise UserError(f"warm-up range must satisfy 1 <= min <= max, got {warmups}")
        self.n, self.batch_size, self.warmups, self.seed = n, batch_size, warmups, seed
        self.sampler = _Epoch()

    def _batches(self) -> list[list[tuple[int, int, int]]]:
        rank, world = rank_world()
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

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        # lazily: when Lightning resumes from a checkpoint it creates the epoch's batch iterator before it
        # calls set_epoch, so the batches must be drawn at the first next(), not at iter()
        yield from self._batches()

    def __len__(self) -> int:
        rank, world = rank_world()
        return -(-len(range(rank, self.n, world)) // self.batch_size)


class ShardSampler(Sampler[int]):
    """Every item exactly once over all ranks (rank r takes r, r + world, ...): no padding duplicates."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self) -> Iterator[int]:
        rank, world = rank_world()
        return iter(range(rank, self.n, world))

    def __len__(self) -> int:
        rank, world = rank_world()
        return len(range(rank, self.n, world))
