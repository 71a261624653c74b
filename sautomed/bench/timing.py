"""The timing harness: medians of functions taking turns, encoder-call counting, the load average."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor

from sautomed.models.sautomed.network import SAutoMedNet


def sync(device: str) -> None:
    """Wait for the device's queued work (CUDA), so that wall times cover it."""
    if device == "cuda":
        torch.cuda.synchronize()


def time_it(fn: Callable[[], Any], repeats: int, warmup: int, device: str = "cpu") -> dict[str, Any]:
    """Median wall time of ``fn`` over ``repeats`` runs after ``warmup`` uncounted ones."""
    return time_interleaved({"fn": fn}, {"fn": repeats}, warmup, device)["fn"]


def time_interleaved(
    fns: dict[str, Callable[[], Any]],
    repeats: dict[str, int],
    warmup: int,
    device: str = "cpu",
    first_run_in: dict[str, Callable[[], Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Median wall time of each function, the functions taking turns (round-robin).

    Round k runs every function once, so a slow drift of the machine (other work starting or stopping)
    touches all of them alike and their ratios stay meaningful. The first ``warmup`` rounds are not counted;
    function f takes part in ``warmup + repeats[f]`` rounds. ``first_run_in[f]``: a context-manager factory
    the first run of f runs inside (e.g. an encoder-call counter). Returns, per function, the median, every
    timed run, the first run's time and the last result.
    """
    out: dict[str, dict[str, Any]] = {k: {"all": [], "first": None, "result": None} for k in fns}
    for i in range(warmup + max(repeats.values(), default=0)):
        for name, fn in fns.items():
            if i >= warmup + repeats[name]:
                continue
            factory = (first_run_in or {}).get(name)
            with factory() if (factory is not None and i == 0) else nullcontext():
                sync(device)
                t0 = time.perf_counter()
                out[name]["result"] = fn()
                sync(device)
                dt = time.perf_counter() - t0
            out[name]["first"] = dt if i == 0 else out[name]["first"]
            if i >= warmup:
                out[name]["all"].append(dt)
    for v in out.values():
        v["median"] = statistics.median(v["all"])
    return out


@contextmanager
def count_encoded(net: SAutoMedNet) -> Iterator[list[int]]:
    """Record the number of slices of every ``net.encode`` call (instance-level wrapper)."""
    calls: list[int] = []
    original = net.encode
    previous = net.__dict__.get("encode")  # an instance-level override (e.g. a compiled encode)

    def counting(images: Tensor) -> Tensor:
        calls.append(int(images.shape[0]))
        return original(images)

    net.encode = counting  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        if previous is None:
            del net.encode  # the class method again
        else:
            net.encode = previous  # type: ignore[method-assign]


def loadavg() -> list[float] | None:
    """1/5/15-minute load averages: other work on the machine shows here."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def mid_to_ends_batches(slices: int) -> list[int]:
    """Batch size of every sequential step of mid_to_ends (the middle slice, then both chains)."""
    mid = slices // 2
    down, up = mid, slices - 1 - mid
    return [1] + [2] * min(down, up) + [1] * abs(down - up)


def predicted_ratio(slices: int, step1: float, step2: float) -> float:
    """propagation mid_to_ends / end_to_end if it were only decoder steps of the measured costs."""
    return sum(step1 if b == 1 else step2 for b in mid_to_ends_batches(slices)) / (slices * step1)
