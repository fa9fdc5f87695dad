"""Learning-rate schedules as pure functions of the batch count, composed like Composer's.

Each schedule maps (batch, total_batches) to a factor of the optimizer's base learning rate; a
list of schedules multiplies its factors (e.g. linear warmup x cosine). Being pure functions of
the batch counter, they restore exactly on resume: no learning-rate jump.

A schedule's settings are its fields (the config's schema is derived from them); a span of
training (:data:`Batches`) is written in the config as a duration (``200ep``, ``1000ba``, ``64sp``)
and reaches the schedule in batches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated

from ..core.schema import NonNegative, Setting

# A span of training: a duration in the config, a number of batches here (the builder converts it).
Batches = Annotated[int, Setting(kind="duration")]


@dataclass(frozen=True)
class Constant:
    """The same factor throughout."""

    factor: NonNegative = 1.0

    def __call__(self, batch: int, total: int) -> float:
        return self.factor


@dataclass(frozen=True)
class Cosine:
    """Cosine decay from 1 to ``min_factor`` over ``t_max`` batches (default: the whole run)."""

    min_factor: NonNegative = 0.0
    t_max: Batches | None = None

    def __call__(self, batch: int, total: int) -> float:
        span = max(self.t_max or total, 1)
        progress = min(batch / span, 1.0)
        return self.min_factor + (1.0 - self.min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Poly:
    """nnU-Net's polynomial decay ``(1 - batch / t_max) ** power``."""

    power: NonNegative = 0.9
    t_max: Batches | None = None

    def __call__(self, batch: int, total: int) -> float:
        span = max(self.t_max or total, 1)
        return max(1.0 - batch / span, 0.0) ** self.power


@dataclass(frozen=True)
class LinearWarmup:
    """Linear ramp from ``start_factor`` to 1 over ``duration`` batches, then 1."""

    duration: Annotated[int, Setting.defaulting("1ep", kind="duration")]
    start_factor: NonNegative = 0.0

    def __call__(self, batch: int, total: int) -> float:
        if self.duration <= 0 or batch >= self.duration:
            return 1.0
        return self.start_factor + (1.0 - self.start_factor) * batch / self.duration


class ComposedSchedule:
    """The product of several schedules; a callable for ``torch.optim.lr_scheduler.LambdaLR``.

    Args:
        schedules: the factors to multiply.
        total_batches: the run's length in batches (for schedules without their own t_max).
    """

    def __init__(self, schedules: Sequence, total_batches: int):
        self.schedules = list(schedules)
        self.total_batches = int(total_batches)

    def __call__(self, batch: int) -> float:
        factor = 1.0
        for schedule in self.schedules:
            factor *= schedule(batch, self.total_batches)
        return factor


class BatchScheduler:
    """Sets every parameter group's lr to ``base_lr * schedule(batch)``; stepped once per batch.

    Unlike ``LambdaLR`` its state is plain numbers (base lrs and the batch count), so it is saved
    in weights-only checkpoints and restores the exact learning rate on resume.
    """

    def __init__(self, optimizer, schedule: ComposedSchedule):
        self.optimizer = optimizer
        self.schedule = schedule
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.batch = 0
        self._apply()

    def _apply(self) -> None:
        factor = self.schedule(self.batch)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor

    def step(self) -> None:
        self.batch += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"base_lrs": list(self.base_lrs), "batch": self.batch}

    def load_state_dict(self, state: dict) -> None:
        self.base_lrs = list(state["base_lrs"])
        self.batch = int(state["batch"])
        self._apply()
