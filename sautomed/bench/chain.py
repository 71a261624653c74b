"""The training chain: which slices of a window carry a loss, the steps to time, supervised slices per second.

A training window with n warm-ups runs n + 1 decoder steps (`SAutoMedModule.training_step`). Without a
warm-up loss (``loss.warmup == 0``, the paper) only the target slice is supervised: 1 slice per window; with
it every step is: n + 1 slices. The data draws n uniformly from ``warmup_min..warmup_max`` once per batch
(`WindowBatchSampler`), so a chain's rate over a training run is

    supervised slices per s = batch * mean over n of supervised(n) / mean over n of step_s(n).

Two chains are compared: ``before`` (warm-ups ``before_warmups``, 1..3 by default, no warm-up loss, the
encoder run every step) and ``after`` (the config's chain: warm-ups ``warmup_min..n``, the config's warm-up
loss, cached features where the config caches them and the encoder is frozen).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from sautomed.bench.settings import BenchSettings


def supervised_slices(warmups: int, warmup_loss: float) -> int:
    """Slices of one window that carry a loss: n + 1 with a warm-up loss, else the target alone."""
    return warmups + 1 if warmup_loss > 0 else 1


@dataclass(frozen=True)
class StepKind:
    """One training step to time: n warm-ups, the warm-up loss weight, cached encoder features or not."""

    warmups: int
    warmup_loss: float
    cached: bool

    @property
    def key(self) -> str:
        return f"n{self.warmups}_{'cached' if self.cached else 'encoded'}_warmup_loss{self.warmup_loss:g}"


@dataclass(frozen=True)
class Chain:
    """A training setting: the warm-up range n is drawn from, the warm-up loss, cached features or not."""

    name: str
    warmups: tuple[int, int]
    warmup_loss: float
    cached: bool

    def kinds(self) -> list[StepKind]:
        lo, hi = self.warmups
        return [StepKind(n, self.warmup_loss, self.cached) for n in range(lo, hi + 1)]


def warmup_loss_weight(s: BenchSettings) -> float:
    """The config's ``loss.warmup`` (0: only the target slice is supervised)."""
    return float(s.loss.get("warmup", 0.0))


def config_kind(s: BenchSettings, cached: bool) -> StepKind:
    """The config's training step: n = ``warmup_slices`` warm-ups, its warm-up loss."""
    return StepKind(s.warmup_slices, warmup_loss_weight(s), cached)


def chains(s: BenchSettings, cached: bool) -> tuple[Chain, Chain]:
    """``before`` (no warm-up loss, encoded) and ``after`` (the config's chain; ``cached``: its cache)."""
    lo = max(1, min(s.warmup_min, s.warmup_slices))
    before = Chain("before", s.before_warmups, 0.0, False)
    after = Chain("after", (lo, max(lo, s.warmup_slices)), warmup_loss_weight(s), cached)
    return before, after


def step_kinds(s: BenchSettings, encoder_frozen: bool) -> list[StepKind]:
    """Every step a worker times (each once): the config's step, its other path, both chains' steps."""
    cached = s.feature_cache and encoder_frozen
    kinds = [config_kind(s, cached)]
    if encoder_frozen:  # the cache is possible: time the step the other way too
        kinds.append(config_kind(s, not cached))
    for chain in chains(s, cached):
        kinds += chain.kinds()
    return list(dict.fromkeys(kinds))


def chain_rate(chain: Chain, batch: int, step_s: dict[str, float]) -> dict[str, Any]:
    """A chain's supervised slices per second from the timed steps (``step_s``: StepKind.key -> median)."""
    kinds = chain.kinds()
    times = [step_s[k.key] for k in kinds]
    per_window = statistics.mean(supervised_slices(k.warmups, k.warmup_loss) for k in kinds)
    per_step = batch * per_window
    return {
        "warmups": list(chain.warmups),
        "warmup_loss": chain.warmup_loss,
        "feature_cache": chain.cached,
        "step_s": {str(k.warmups): t for k, t in zip(kinds, times)},
        "step_s_mean": statistics.mean(times),
        "supervised_slices_per_window": per_window,
        "supervised_slices_per_step": per_step,
        "supervised_slices_per_s": per_step / statistics.mean(times),
    }


def train_measures(s: BenchSettings, worker_result: dict[str, Any]) -> dict[str, Any]:
    """The ``train_*`` measures of one backbone from its worker's timed steps."""
    frozen = bool(worker_result["encoder_frozen"])
    cached = s.feature_cache and frozen
    steps: dict[str, float] = worker_result["steps"]
    config = config_kind(s, cached)
    per_window = supervised_slices(config.warmups, config.warmup_loss)
    per_step = s.train_batch * per_window
    before, after = (chain_rate(c, s.train_batch, steps) for c in chains(s, cached))
    return {
        "train_step_s": steps[config.key],
        "train_step_cached_s": steps.get(config_kind(s, True).key),
        "train_step_uncached_s": steps.get(config_kind(s, False).key),
        "train_feature_cache": cached,
        "train_encoder_frozen": frozen,
        "train_supervised_slices_per_window": per_window,
        "train_supervised_slices_per_step": per_step,
        "train_supervised_slices_per_s": per_step / steps[config.key],
        "train_chain_before": before,
        "train_chain_after": after,
        "train_supervised_slices_per_s_before": before["supervised_slices_per_s"],
        "train_supervised_slices_per_s_after": after["supervised_slices_per_s"],
        "train_steps_s": steps,
    }
