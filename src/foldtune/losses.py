"""Training losses, by name."""

from __future__ import annotations

from torch import nn

from foldtune.registry import Registry

LOSSES: Registry = Registry("loss", "training.loss")


@LOSSES.register("mse")
def mse_loss() -> nn.Module:
    return nn.MSELoss()


def build_loss(name: str) -> nn.Module:
    return LOSSES.get(name)()
