"""Weight averaging with `torch.optim.swa_utils`: SWA (an equal average of the weights
seen from start_epoch on, with SWALR holding the learning rate near swa_lr) or EMA (an
exponential moving average). The trainer evaluates the average beside the trained model
and keeps whichever scores better as the fold's checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler
from torch.optim.swa_utils import SWALR, AveragedModel, get_ema_multi_avg_fn

from foldtune.config import AveragingConfig, Config
from foldtune.training.hooks import NO_SCHEDULE_STEP, StepHook


class NoAveraging:
    """Averaging switched off: the schedule runs as configured and nothing is averaged."""

    averaged: nn.Module | None = None
    n_averaged = 0

    def schedule(self, step: int, scheduler: LRScheduler) -> LRScheduler:
        return scheduler

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class WeightAveraging:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: AveragingConfig,
                 steps_per_epoch: int):
        self.model = model
        self.optimizer = optimizer
        self.cfg = cfg
        # Optimizer steps taken before the first averaged one.
        self.start_step = (cfg.start_epoch - 1) * steps_per_epoch
        multi_avg_fn = get_ema_multi_avg_fn(cfg.ema_decay) if cfg.method == "ema" else None
        self._averaged = AveragedModel(model, multi_avg_fn=multi_avg_fn)
        self._swalr: SWALR | None = None

    @property
    def n_averaged(self) -> int:
        return int(self._averaged.n_averaged.item())

    @property
    def averaged(self) -> nn.Module | None:
        """The averaged regressor, once it has averaged anything."""
        return self._averaged.module if self.n_averaged else None

    def _start_swalr(self) -> None:
        # Made at the switch, not before: SWALR sets the learning rates when built.
        self._swalr = SWALR(self.optimizer, swa_lr=self.cfg.swa_lr, anneal_epochs=self.cfg.anneal_steps,
                            anneal_strategy=self.cfg.anneal_strategy)

    def state_dict(self) -> dict:
        state = {"averaged": self._averaged.state_dict()}
        if self._swalr is not None:
            # its annealing function is code, rebuilt from the config on load
            state["swalr"] = {k: v for k, v in self._swalr.state_dict().items() if k != "anneal_func"}
        return state

    def load_state_dict(self, state: dict) -> None:
        """Load before the optimizer's state: rebuilding SWALR touches the learning rates."""
        self._averaged.load_state_dict(state["averaged"])
        if "swalr" in state:
            self._start_swalr()
            self._swalr.load_state_dict(state["swalr"])

    def schedule(self, step: int, scheduler: LRScheduler):
        """The schedule to step after optimizer step `step` (optimizer steps taken so far,
        this one included): the configured one, or SWALR once SWA has begun."""
        if self.cfg.method == "swa" and step > self.start_step:
            if self._swalr is None:
                self._start_swalr()
                return NO_SCHEDULE_STEP     # SWALR set this step's rates as it was built
            return self._swalr
        return scheduler

    def average(self, step: int) -> None:
        """The first step of the window is averaged, then every update_every-th."""
        if step > self.start_step and (step - self.start_step - 1) % self.cfg.update_every == 0:
            self._averaged.update_parameters(self.model)


class AveragingHook(StepHook):
    """Weight averaging as a step hook: the average follows every optimizer step (on the
    host, after the step, so a replayed step is averaged as an eager one)."""

    switch = "averaging.method"

    def __init__(self, averaging: WeightAveraging):
        self.averaging = averaging

    @classmethod
    def switched_on(cls, cfg: Config) -> bool:
        return cfg.averaging.method != "none"

    def after_optimizer_step(self, step: int) -> None:
        self.averaging.average(step)


def build_averaging(model: nn.Module, optimizer: torch.optim.Optimizer, cfg: AveragingConfig,
                    steps_per_epoch: int) -> WeightAveraging | NoAveraging:
    if cfg.method == "none":
        return NoAveraging()
    return WeightAveraging(model, optimizer, cfg, steps_per_epoch)
