"""Learning-rate schedules: linear warmup, then linear, cosine or constant."""

from __future__ import annotations

import math
from typing import Callable

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from foldtune.registry import Registry

SCHEDULES: Registry[Callable[[float], float]] = Registry("scheduler", "training.scheduler")


@SCHEDULES.register("linear")
def _linear(progress: float) -> float:
    return max(0.0, 1.0 - progress)


@SCHEDULES.register("cosine")
def _cosine(progress: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


@SCHEDULES.register("constant")
def _constant(progress: float) -> float:
    return 1.0


def lr_factor(name: str, step: int, total_steps: int, warmup_steps: int) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based)."""
    decay = SCHEDULES.get(name)
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    span = max(1, total_steps - warmup_steps)
    return decay((step - warmup_steps) / span)


def warmup_steps(total_steps: int, ratio: float, steps: int = 0) -> int:
    """Warmup length: `steps` when given (> 0), else `ratio` of the total, rounded."""
    return min(steps, total_steps) if steps > 0 else int(round(ratio * total_steps))


def build_scheduler(optimizer: Optimizer, name: str, total_steps: int, warmup_steps: int) -> LambdaLR:
    SCHEDULES.get(name)
    return LambdaLR(optimizer, lambda step: lr_factor(name, step, total_steps, warmup_steps))
