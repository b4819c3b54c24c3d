"""Optimizers by name, built on the parameter groups."""

from __future__ import annotations

import torch
from torch import nn

from foldtune.config import ConfigError, TrainingConfig
from foldtune.optim.param_groups import parameter_groups
from foldtune.registry import Registry

OPTIMIZERS: Registry = Registry("optimizer", "training.optimizer")

# Optimizers whose kernels exist on CUDA only.
CUDA_ONLY = {"adamw_8bit"}


@OPTIMIZERS.register("adamw")
def _adamw(groups: list[dict], cfg: TrainingConfig, device: torch.device) -> torch.optim.Optimizer:
    # The fused kernel updates every tensor in one launch; it exists on CUDA only.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps,
                             weight_decay=cfg.weight_decay, fused=device.type == "cuda")


@OPTIMIZERS.register("madgrad")
def _madgrad(groups: list[dict], cfg: TrainingConfig, device: torch.device) -> torch.optim.Optimizer:
    from madgrad import MADGRAD

    # MADGRAD's momentum plays the part of Adam's beta1.
    return MADGRAD(groups, lr=cfg.lr, momentum=cfg.adam_betas[0], weight_decay=cfg.weight_decay, eps=cfg.adam_eps)


@OPTIMIZERS.register("adamw_8bit")
def _adamw_8bit(groups: list[dict], cfg: TrainingConfig, device: torch.device) -> torch.optim.Optimizer:
    # Imported here only: bitsandbytes is large and its CUDA kernels are of no use elsewhere.
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(groups, lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps,
                               weight_decay=cfg.weight_decay)


def check_optimizer(cfg: TrainingConfig, device: torch.device) -> None:
    """The name exists and the device can run it (fails before any model is loaded)."""
    OPTIMIZERS.get(cfg.optimizer)
    if cfg.optimizer in CUDA_ONLY and device.type != "cuda":
        raise ConfigError(f"training.optimizer '{cfg.optimizer}' runs on a CUDA GPU only (bitsandbytes' 8-bit "
                          f"kernels); this run is on {device.type}: use 'adamw' or 'madgrad'")


def build_optimizer(model: nn.Module, cfg: TrainingConfig, device: torch.device) -> torch.optim.Optimizer:
    check_optimizer(cfg, device)
    return OPTIMIZERS.get(cfg.optimizer)(parameter_groups(model, cfg), cfg, device)
