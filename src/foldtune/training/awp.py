"""Adversarial weight perturbation (AWP).

After the usual backward pass, the chosen weights are pushed a small step uphill (along
their gradient, or along Adam's first moment), each by at most adv_eps of its own size;
the loss at those weights is backpropagated too, and the weights are put back exactly.
The optimizer then steps with both gradients: it learns a minimum that stays low when
the weights move, which generalises better on small data sets.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from foldtune.config import AWPConfig, Config
from foldtune.training.hooks import StepHook

# Keeps the division finite for a zero gradient or a zero weight.
NORM_EPS = 1e-6


class AWP(StepHook):
    """AWP as a step hook: after the backward pass, one more forward/backward at the
    perturbed weights. Whether it acts is decided on the host at each epoch (a step
    variant of its own: training/graphs.py captures each variant apart); inside the step
    the attack, its bound per weight and the restore are device work with no host sync,
    so a CUDA graph captures them (graph_safe)."""

    switch = "awp.enabled: true"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: AWPConfig):
        self.cfg = cfg
        self.acting = self.active(0)
        self.optimizer = optimizer
        self.params = [p for name, p in model.named_parameters() if p.requires_grad and cfg.params in name]
        if not self.params:
            raise ValueError(f"awp.params='{cfg.params}' matches no trainable parameter name")

    @classmethod
    def switched_on(cls, cfg: Config) -> bool:
        return cfg.awp.enabled

    def start_epoch(self, epoch: int) -> None:
        self.acting = self.active(epoch)

    def after_backward(self, again: Callable[[], object]) -> None:
        """Run again (forward + backward) at perturbed weights, then restore them; from the
        start epoch on."""
        if not self.acting:
            return
        backup = self.attack()
        try:
            again()
        finally:
            self.restore(backup)

    def active(self, epoch: int) -> bool:
        """epoch counts from 0 in the loop; start_epoch counts from 1 in the config."""
        return epoch + 1 >= self.cfg.start_epoch

    def _direction(self, param: nn.Parameter) -> torch.Tensor | None:
        if self.cfg.direction == "adam":
            return self.optimizer.state.get(param, {}).get("exp_avg")
        return param.grad

    @torch.no_grad()
    def attack(self) -> dict[nn.Parameter, torch.Tensor]:
        """Perturb the weights; return the originals for restore()."""
        backup = {}
        for param in self.params:
            direction = self._direction(param)
            if direction is None:
                continue
            original = param.detach().clone()
            backup[param] = original
            # The step is adv_lr of the weight's norm, along the unit direction; no host
            # sync: a zero direction gives a zero step.
            scale = self.cfg.adv_lr * (original.norm() + NORM_EPS) / (direction.norm() + NORM_EPS)
            param.add_(direction.to(param.dtype) * scale)
            bound = self.cfg.adv_eps * original.abs()
            torch.clamp(param, min=original - bound, max=original + bound, out=param)
        return backup

    @torch.no_grad()
    def restore(self, backup: dict[nn.Parameter, torch.Tensor]) -> None:
        for param, original in backup.items():
            param.copy_(original)
