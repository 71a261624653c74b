"""Bringing every rank's results together under DDP: the one gather every family and the writer use."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar

import torch.distributed as dist

T = TypeVar("T")


def gather_lists(*parts: Sequence[Any]) -> tuple[list[Any], ...]:
    """Each list concatenated over every rank (rank order) under DDP; this process's lists otherwise."""
    lists = tuple(list(p) for p in parts)
    if not (dist.is_available() and dist.is_initialized()):
        return lists
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, lists)
    return tuple([x for rank in gathered for x in rank[k]] for k in range(len(lists)))


def unique_by(items: Sequence[T], key: Callable[[T], Hashable]) -> list[T]:
    """One item per key (the last seen: a rank may evaluate a padded copy of a case), sorted by key."""
    return [v for _, v in sorted({key(x): x for x in items}.items())]
