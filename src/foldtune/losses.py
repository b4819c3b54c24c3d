"""Training losses, by name. Each reduces (batch, targets) to a scalar, weighing the
targets' terms by `training.target_weights` when given (normalised to sum to one).

Rows are averaged; a `row_weight` (1 for a row, 0 for a stand-in) averages over the
weighted rows only. A CUDA graph replays a fixed batch size, so an epoch's short last
batch is filled up with stand-in rows that must not count (training/graphs.py).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from foldtune.config import ConfigError, TrainingConfig
from foldtune.registry import Registry

LOSSES: Registry = Registry("loss", "training.loss")

# Keeps the gradient of a square root finite when a batch is predicted exactly.
SQRT_EPS = 1e-8


class TargetLoss(nn.Module):
    """An elementwise loss averaged over rows, then over targets with the given weights."""

    def __init__(self, n_targets: int, weights: Sequence[float] | None = None):
        super().__init__()
        if weights is not None and len(weights) != n_targets:
            raise ConfigError(f"training.target_weights has {len(weights)} values for {n_targets} targets")
        w = torch.ones(n_targets) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
        self.register_buffer("weights", w / w.sum(), persistent=False)

    def per_target(self, pred: torch.Tensor, target: torch.Tensor, row_weight: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, pred: torch.Tensor, target: torch.Tensor, row_weight: torch.Tensor | None = None) -> torch.Tensor:
        return (self.per_target(pred.float(), target.float(), row_weight) * self.weights).sum()


def row_mean(values: torch.Tensor, row_weight: torch.Tensor | None) -> torch.Tensor:
    """Mean over the rows (dim 0) of (rows, targets) values; with row_weight, their weighted mean."""
    if row_weight is None:
        return values.mean(dim=0)
    return (values * row_weight[:, None]).sum(dim=0) / row_weight.sum()


@LOSSES.register("mse")
class MSELoss(TargetLoss):
    def per_target(self, pred, target, row_weight):
        return row_mean(F.mse_loss(pred, target, reduction="none"), row_weight)


@LOSSES.register("smooth_l1")
class SmoothL1Loss(TargetLoss):
    """Quadratic within beta of the target, linear beyond: outlying labels pull less."""

    def __init__(self, n_targets: int, weights=None, beta: float = 1.0):
        super().__init__(n_targets, weights)
        self.beta = beta

    def per_target(self, pred, target, row_weight):
        return row_mean(F.smooth_l1_loss(pred, target, reduction="none", beta=self.beta), row_weight)


@LOSSES.register("rmse")
class RMSELoss(TargetLoss):
    """Square root of the (weighted) mean squared error over every value of the batch."""

    def forward(self, pred, target, row_weight=None):
        mse = row_mean(F.mse_loss(pred.float(), target.float(), reduction="none"), row_weight)
        return torch.sqrt((mse * self.weights).sum() + SQRT_EPS)


@LOSSES.register("mcrmse")
class MCRMSELoss(TargetLoss):
    """The competition metric on the batch: the (weighted) mean of each target's RMSE."""

    def per_target(self, pred, target, row_weight):
        return torch.sqrt(row_mean(F.mse_loss(pred, target, reduction="none"), row_weight) + SQRT_EPS)


def build_loss(cfg: TrainingConfig, n_targets: int) -> nn.Module:
    cls = LOSSES.get(cfg.loss)
    if cls is SmoothL1Loss:
        return cls(n_targets, cfg.target_weights, beta=cfg.loss_beta)
    return cls(n_targets, cfg.target_weights)
