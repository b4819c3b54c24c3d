"""Optimizers by name, built on the parameter groups."""

from __future__ import annotations

import torch
from torch import nn

from foldtune.config import TrainingConfig
from foldtune.optim.param_groups import decay_groups
from foldtune.registry import Registry

OPTIMIZERS: Registry = Registry("optimizer", "training.optimizer")


@OPTIMIZERS.register("adamw")
def _adamw(groups: list[dict], cfg: TrainingConfig, device: torch.device) -> torch.optim.Optimizer:
    # The fused kernel updates every tensor in one launch; it exists on CUDA only.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps,
                             weight_decay=cfg.weight_decay, fused=device.type == "cuda")


def build_optimizer(model: nn.Module, cfg: TrainingConfig, device: torch.device) -> torch.optim.Optimizer:
    head_lr = cfg.head_lr if cfg.head_lr is not None else cfg.lr
    groups = decay_groups(model, cfg.lr, head_lr, cfg.weight_decay)
    return OPTIMIZERS.get(cfg.optimizer)(groups, cfg, device)
