"""The techniques around a training step, all in one shape: `StepHook`.

A technique (AWP, FGM, R-Drop, clipping, the learning-rate schedule, weight averaging,
gradient accumulation) is a StepHook that overrides the moments it acts at; the step
(training/step.py) calls each moment's hooks in their order and nothing else. A hook
that is switched off is not built at all, so it costs nothing per step.

The moments, in the order a step meets them:

    start_epoch(epoch)          on the host, before an epoch's first step: whether it acts
    around_forward(batch, fwd)  the loss of a batch: fwd(batch) -> (loss, predictions)
    after_backward(again)       after the backward pass; again() runs forward + backward
                                once more, its gradients added to the first ones
    before_optimizer_step()     the gradients are complete (clipping)
    after_optimizer_step(step)  on the host, after every optimizer step, eager or
                                replayed (schedule, averaging); step counts from 1

A CUDA graph captures the moments from around_forward to before_optimizer_step once per
batch shape and replays them; a hook that does something a replay cannot repeat (a
decision on the host inside the step, a host sync) declares `graph_safe = False`, and
`training.cuda_graphs: true` is refused with its `switch`, the config key to change
(training/step.py: refuse_ungraphable). `acting` says whether the hook acts in the
current epoch: a graph captured while it did not is not replayed once it does.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from foldtune.config import Config

Forward = Callable[[dict], "tuple[torch.Tensor, torch.Tensor]"]


class StepHook:
    """A technique around the training step: every moment does nothing until overridden."""

    # Whether a CUDA graph can capture what the hook does inside the step.
    graph_safe: bool = True
    # The config setting that switches the hook on, as the refusal under CUDA graphs names it.
    switch: str = ""
    # Whether the hook acts in the current epoch (set by start_epoch).
    acting: bool = True

    @classmethod
    def switched_on(cls, cfg: Config) -> bool:
        """Whether cfg switches the hook on: it is built then (and checked against CUDA graphs)."""
        return False

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Raise a ConfigError, before any training, for settings the hook cannot work with
        (called when it is switched on)."""

    def start_epoch(self, epoch: int) -> None:
        """epoch counts from 0, as the loop does."""

    def around_forward(self, batch: dict, forward: Forward) -> tuple[torch.Tensor, torch.Tensor]:
        return forward(batch)

    def after_backward(self, again: Callable[[], torch.Tensor]) -> None:
        pass

    def before_optimizer_step(self) -> None:
        pass

    def after_optimizer_step(self, step: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def overrides(hook: StepHook, moment: str) -> bool:
    """Whether hook does something at `moment` (a StepHook method name)."""
    return getattr(type(hook), moment) is not getattr(StepHook, moment)


class GradientClipping(StepHook):
    """Clip the gradients' global norm to training.max_grad_norm before the update.

    The grad scaler's factor comes out first (fp16), so the norm is that of the true
    gradients. No host sync (no error on a non-finite norm): it can be captured."""

    switch = "training.max_grad_norm"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scaler, max_norm: float):
        # Frozen parameters have no gradient; leaving them out changes nothing.
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = optimizer
        self.scaler = scaler
        self.max_norm = max_norm

    @classmethod
    def switched_on(cls, cfg: Config) -> bool:
        return cfg.training.max_grad_norm is not None

    def before_optimizer_step(self) -> None:
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)


class _NoScheduleStep:
    """A schedule step that does nothing: the rates were set when the schedule was built."""

    def step(self) -> None:
        pass


NO_SCHEDULE_STEP = _NoScheduleStep()


class LearningRateSchedule(StepHook):
    """Steps the learning-rate schedule after every optimizer step: the one place it steps.

    Which schedule steps is weight averaging's to say (`averaging.schedule`): the
    configured one, or SWALR once SWA has begun. The rates live in the optimizer's
    groups (device tensors that the schedule fills in place under CUDA graphs), so a
    replayed step reads them; the hook itself runs on the host."""

    switch = "training.scheduler"

    def __init__(self, scheduler, averaging):
        self.scheduler = scheduler
        self.averaging = averaging

    @classmethod
    def switched_on(cls, cfg: Config) -> bool:
        return True

    def after_optimizer_step(self, step: int) -> None:
        self.averaging.schedule(step, self.scheduler).step()


class GradientAccumulation(StepHook):
    """Micro-batches taken `steps` at a time: one optimizer step per group, each batch's
    loss divided by its group's size (the last group of an epoch may be short).

    The trainer asks it where a group ends; a step that does not update cannot be
    replayed as a whole, so it is not graph safe. With steps 1 every batch is a group."""

    graph_safe = False
    switch = "training.gradient_accumulation_steps > 1"

    def __init__(self, steps: int, n_batches: int):
        self.steps = steps
        self.n_batches = n_batches

    @classmethod
    def switched_on(cls, cfg: Config) -> bool:
        return cfg.training.gradient_accumulation_steps > 1

    def group_size(self, i: int) -> int:
        """The size of micro-batch i's group (i counts from 0 in the epoch)."""
        return min(self.steps, self.n_batches - (i // self.steps) * self.steps)

    def ends_group(self, i: int) -> bool:
        """Whether micro-batch i is its group's last: the optimizer steps after it."""
        return (i + 1) % self.steps == 0 or i + 1 == self.n_batches
