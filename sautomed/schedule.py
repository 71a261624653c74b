"""The learning-rate schedule of a run: a short linear warm-up, then cosine to zero, over steps or the clock.

``by="steps"`` follows ``trainer.max_epochs`` / ``max_steps`` (a seeded run repeats exactly). ``by="clock"``
is for budgeted runs (a ``trainer.max_time`` guard): progress is the larger of the step fraction and the
fraction of the time budget used (``max_time`` less a margin for the last validation and checkpoint), and
the run stops when progress reaches 1. So the schedule ends, at a learning rate of zero, inside the guard on
any machine, fast or slow; the price is that two runs on machines of different speed train different steps.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

from lightning.pytorch.callbacks import Timer

from sautomed.errors import UserError

ScheduleBy = Literal["steps", "clock"]

log = logging.getLogger(__name__)


def check_schedule(scheduler: str, by: ScheduleBy, min_steps: int) -> None:
    """Refuse schedule settings that a run would otherwise ignore (every family calls this when built).

    Args:
        scheduler: the family's ``model.scheduler`` (only ``cosine`` can follow the clock).
        by: ``model.schedule_by``.
        min_steps: ``model.schedule_min_steps`` (a clock schedule's figure; >= 0).
    """
    if by == "clock" and scheduler != "cosine":
        raise UserError(f"model.schedule_by: clock needs model.scheduler: cosine (not {scheduler!r})")
    if min_steps < 0:
        raise UserError(f"model.schedule_min_steps must be >= 0, got {min_steps}")
    if min_steps and by != "clock":
        raise UserError(
            f"model.schedule_min_steps ({min_steps}) needs model.schedule_by: clock: a schedule by steps "
            f"trains all its steps on any machine, so there is no shortfall to warn of (got {by!r})"
        )


def _timer(trainer: Any) -> Timer | None:
    return next((cb for cb in trainer.callbacks if isinstance(cb, Timer)), None)


class Schedule:
    """Progress in [0, 1] and the LR factor of a run (the clock read from Lightning's Timer).

    Args:
        trainer: the Lightning trainer (its Timer callback holds ``max_time``).
        total_steps: the optimiser steps of ``max_epochs`` / ``max_steps``.
        warmup_steps: linear warm-up steps.
        by: ``steps`` or ``clock`` (see the module docstring).
        margin_s: seconds of ``max_time`` kept for the last validation and checkpoint (clock only).
        min_steps: the optimiser steps a config's figures were measured with: a run whose clock ends the
            schedule before them says so at the end (``shortfall``), since a slower machine trains less in
            the same budget. 0: no such figure.
    """

    def __init__(
        self,
        trainer: Any,
        total_steps: int,
        warmup_steps: int,
        by: ScheduleBy,
        margin_s: float,
        min_steps: int = 0,
    ) -> None:
        self.trainer, self.total, self.warmup, self.by, self.margin_s = (
            trainer,
            total_steps,
            warmup_steps,
            by,
            margin_s,
        )
        if min_steps < 0:
            raise UserError(f"model.schedule_min_steps must be >= 0, got {min_steps}")
        self.min_steps = min_steps
        if by == "clock" and (_timer(trainer) is None or _timer(trainer).time_remaining("train") is None):
            raise UserError("model.schedule_by: clock needs a trainer.max_time guard")

    def time_fraction(self) -> float:
        """Share of the time budget used (0 when the schedule follows steps, or before training starts)."""
        timer = _timer(self.trainer) if self.by == "clock" else None
        if timer is None:
            return 0.0
        elapsed, remaining = timer.time_elapsed("train"), timer.time_remaining("train")
        if remaining is None:
            return 0.0
        budget = max(1.0, elapsed + remaining - self.margin_s)
        return min(1.0, elapsed / budget)

    def seconds_left(self) -> float | None:
        """Seconds of the time budget (max_time less the margin) not yet used; None without the clock."""
        timer = _timer(self.trainer) if self.by == "clock" else None
        remaining = timer.time_remaining("train") if timer is not None else None
        return None if remaining is None else max(0.0, remaining - self.margin_s)

    def progress(self, step: int) -> float:
        steps = (step - self.warmup) / max(1, self.total - self.warmup)
        return min(1.0, max(0.0, steps, self.time_fraction()))

    def factor(self, step: int) -> float:
        """LambdaLR's factor for optimiser step ``step`` (zero once the clock has ended the schedule, even
        inside a warm-up that a very short budget never finished)."""
        if self.ended():
            return 0.0
        if step < self.warmup:
            return (step + 1) / self.warmup
        return 0.5 * (1.0 + math.cos(math.pi * self.progress(step)))

    def ended(self) -> bool:
        """True once the clock has run the schedule to its end (the run should stop)."""
        return self.by == "clock" and self.time_fraction() >= 1.0

    def stop_if_ended(self) -> None:
        """Tell the trainer to stop once the clock has run the schedule to its end (call after each batch)."""
        if self.ended() and not self.trainer.should_stop:
            self.trainer.should_stop = True

    def report(self) -> str:
        """How far the run got, for the log at the end of training."""
        step, total = self.trainer.global_step, self.total
        return (
            f"training ended at epoch {self.trainer.current_epoch}, step {step} of the {total} that "
            f"max_epochs / max_steps plan ({100.0 * step / max(1, total):.0f}%); schedule "
            f"{100.0 * self.progress(step):.0f}% through (by {self.by})"
        )

    def shortfall(self) -> str | None:
        """A warning when the clock ended the schedule before ``min_steps`` optimiser steps; else None."""
        step = self.trainer.global_step
        if not (self.ended() and step < self.min_steps):
            return None
        return (
            f"the clock (trainer.max_time) ended the schedule after {step} optimiser steps, fewer than the "
            f"{self.min_steps} this config's figures were measured with (model.schedule_min_steps): this "
            "machine trains more slowly than that one; expect lower scores, or raise trainer.max_time"
        )


class ScheduleHooks:
    """LightningModule hooks of a run with a :class:`Schedule` in ``self.schedule`` (None: no schedule):
    stop once the clock has ended the schedule, and say at the end how far the run got. Put it before
    ``L.LightningModule`` in the bases (every family's module does)."""

    schedule: Schedule | None = None

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.schedule is not None:
            self.schedule.stop_if_ended()  # the clock ran the schedule to its end: stop inside the guard

    def on_train_end(self) -> None:
        if self.schedule is not None:
            log.info("%s", self.schedule.report())
            if (short := self.schedule.shortfall()) is not None:
                log.warning("%s", short)


def time_remaining(trainer: Any) -> float | None:
    """Seconds left before the ``trainer.max_time`` guard stops the fit (None: no guard)."""
    for callback in getattr(trainer, "callbacks", []):
        if isinstance(callback, Timer) and callback._duration is not None:
            left = callback.time_remaining("train")
            return None if left is None else float(left)
    return None
