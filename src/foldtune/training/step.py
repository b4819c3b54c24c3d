"""The training step, written once: the eager loop calls it, a CUDA graph captures it.

`TrainingStep` owns everything a step touches:
- `model`: what the step calls (the regressor, or its DistributedDataParallel wrapper);
- `loss_fn`: the task loss (losses.py), given each batch's `row_weight` when it has one;
- `optimizer` and `precision` (autocast and the grad scaler);
- `hooks`: the techniques around the step (training/hooks.py), only those switched on;
- `loss_sum`: the running sum of the training loss on the device, read when shown.

The loss sum is changed in place only, never replaced: a CUDA graph (training/graphs.py)
captured the tensor and adds each replay's loss to it. `take_loss()` and `restore_loss()`
are the only ways to reset or set it.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from foldtune.config import Config, ConfigError
from foldtune.data.collate import model_inputs
from foldtune.training.averaging import AveragingHook
from foldtune.training.awp import AWP
from foldtune.training.fgm import FGM
from foldtune.training.head_pruning import HeadPruning
from foldtune.training.hooks import GradientAccumulation, GradientClipping, LearningRateSchedule, StepHook, overrides
from foldtune.training.rdrop import RDrop

# Every technique around the step, in the order of its hooks at each moment. HeadPruning
# first: its penalty is added once, around R-Drop's two passes.
TECHNIQUES: tuple[type[StepHook], ...] = (HeadPruning, RDrop, AWP, FGM, GradientClipping, LearningRateSchedule, AveragingHook,
                                          GradientAccumulation)


class TrainingStep:
    """One optimizer step's work: forward, loss, backward and the update, with the hooks
    at their moments.

    Eagerly the trainer calls `forward_backward` for each micro-batch and `update` +
    `clear_gradients` at the end of a group; `__call__` is the whole step of one batch,
    as a CUDA graph captures it (its gradients stay in the graph's own buffers)."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer, precision,
                 hooks: list[StepHook], device: torch.device, world_size: int = 1):
        self.model = model
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.precision = precision
        self.hooks = list(hooks)
        self.world_size = world_size
        self.loss_sum = torch.zeros((), device=device)
        # Each moment's hooks, in order: a moment no hook uses costs an empty loop.
        self._after_backward = [h for h in self.hooks if overrides(h, "after_backward")]
        self._before_optimizer_step = [h for h in self.hooks if overrides(h, "before_optimizer_step")]
        self._after_optimizer_step = [h for h in self.hooks if overrides(h, "after_optimizer_step")]
        forward = self._forward
        for hook in reversed([h for h in self.hooks if overrides(h, "around_forward")]):
            forward = partial(hook.around_forward, forward=forward)
        self._loss_and_preds = forward
        # Which hooks act this epoch: a graph captured for one variant is not replayed for another.
        self.variant: tuple[bool, ...] = tuple(h.acting for h in self.hooks)

    def start_epoch(self, epoch: int) -> None:
        for hook in self.hooks:
            hook.start_epoch(epoch)
        self.variant = tuple(h.acting for h in self.hooks)

    def _forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The task loss of a batch and the model's predictions."""
        with self.precision.autocast():
            preds = self.model(**model_inputs(batch))
        return self.loss_fn(preds, batch["labels"], batch.get("row_weight")), preds

    def loss(self, batch: dict) -> torch.Tensor:
        """The loss of a batch as the hooks shape it (R-Drop: two passes)."""
        return self._loss_and_preds(batch)[0]

    def _backward(self, batch: dict, weight: float, group_size: int) -> torch.Tensor:
        loss = self.loss(batch)
        # Factors of one are left out: the product would be the same bits, one kernel later.
        scaled = loss if weight == 1.0 and group_size == 1 else loss * weight / group_size
        self.precision.scaler.scale(scaled).backward()
        return loss.detach()

    def forward_backward(self, batch: dict, batch_fraction: float = 1.0, group_size: int = 1) -> torch.Tensor:
        """The loss of one micro-batch (times batch_fraction), its gradient added to the parameters' .grad.

        batch_fraction: this process's part of the global batch (1.0 alone). The processes'
        gradients are averaged, so each weighs its mean loss by batch_fraction * world_size:
        together they give the gradient of the global batch's mean loss. group_size: the
        micro-batches of its accumulation group, whose gradients add up.
        """
        weight = batch_fraction * self.world_size
        loss = self._backward(batch, weight, group_size)
        for hook in self._after_backward:
            hook.after_backward(partial(self._backward, batch, weight, group_size))
        return loss if batch_fraction == 1.0 else loss * batch_fraction

    def count_loss(self, loss: torch.Tensor) -> None:
        self.loss_sum.add_(loss)

    def update(self) -> None:
        """The optimizer's step with the gradients gathered so far."""
        for hook in self._before_optimizer_step:
            hook.before_optimizer_step()
        self.precision.scaler.step(self.optimizer)
        self.precision.scaler.update()

    def clear_gradients(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def __call__(self, batch: dict) -> torch.Tensor:
        """The whole step of one batch, as a CUDA graph captures it; the loss counted."""
        loss = self.forward_backward(batch)
        self.update()
        self.count_loss(loss)
        return loss

    def after_optimizer_step(self, step: int) -> None:
        """The host's part after optimizer step `step` (from 1), eager or replayed."""
        for hook in self._after_optimizer_step:
            hook.after_optimizer_step(step)

    def take_loss(self) -> torch.Tensor:
        """The loss summed since the last take, as a new tensor; the running sum restarts at 0."""
        taken = self.loss_sum.clone()
        self.loss_sum.zero_()
        return taken

    def restore_loss(self, value: float) -> None:
        """Set the running sum (a resumed state's)."""
        self.loss_sum.fill_(value)


def technique_hooks(cfg: Config, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, precision,
                    averaging) -> list[StepHook]:
    """The hooks of the techniques cfg switches on, in TECHNIQUES' order. Gradient
    accumulation is the trainer's (it says where a group of micro-batches ends)."""
    build = {
        HeadPruning: lambda: HeadPruning(model.head_gates, cfg.pruning.heads),
        RDrop: lambda: RDrop(cfg.rdrop),
        AWP: lambda: AWP(model, optimizer, cfg.awp),
        FGM: lambda: FGM(model, cfg.fgm),
        GradientClipping: lambda: GradientClipping(model, optimizer, precision.scaler, cfg.training.max_grad_norm),
        LearningRateSchedule: lambda: LearningRateSchedule(scheduler, averaging),
        AveragingHook: lambda: AveragingHook(averaging),
    }
    return [build[hook]() for hook in TECHNIQUES if hook in build and hook.switched_on(cfg)]


def check_techniques(cfg: Config) -> None:
    """Each switched-on technique's own checks of the config, then the refusal of those a
    CUDA graph cannot capture; before any training."""
    for hook in TECHNIQUES:
        if hook.switched_on(cfg):
            hook.check_config(cfg)
    refuse_ungraphable(cfg)


def refuse_ungraphable(cfg: Config) -> None:
    """Refuse training.cuda_graphs with a technique whose hook declares it cannot be
    captured (graph_safe False), naming the config key to change; before any training."""
    if not cfg.training.cuda_graphs:
        return
    found = [hook.switch for hook in TECHNIQUES if not hook.graph_safe and hook.switched_on(cfg)]
    if found:
        raise ConfigError("training.cuda_graphs: true cannot be combined with " + "; ".join(found)
                          + ": switch those off or set training.cuda_graphs: false")
