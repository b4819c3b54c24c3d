"""Fast gradient method (FGM; Miyato, Dai and Goodfellow, "Adversarial training methods
for semi-supervised text classification", 2017).

Adversarial training on the input side: after the usual backward pass, each chosen
embedding matrix E (the token embeddings) is pushed along its own gradient g,

    r = epsilon * g / ||g||_2,

the loss at E + r is backpropagated too (its gradient adds to the first), and E is put
back bitwise from a copy. The optimizer then steps with both gradients: the model learns
to score a text the same when its words' vectors move a little.

Everything happens on the device: the norm is never read on the host, and a zero
gradient gives a zero push. The copies go to buffers made once, so a step allocates
nothing and a CUDA graph can capture it (graph_safe). With AWP on as well, FGM comes
second and pushes along the gradient AWP's pass added to.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from foldtune.config import Config, ConfigError, FGMConfig
from foldtune.training.hooks import StepHook


class FGM(StepHook):
    switch = "fgm.enabled: true"

    def __init__(self, model: nn.Module, cfg: FGMConfig):
        self.cfg = cfg
        self.params = [p for name, p in model.named_parameters() if p.requires_grad and cfg.params in name]
        if not self.params:
            raise ConfigError(f"fgm.params: '{cfg.params}' matches no trainable parameter name of the model "
                              "(frozen embeddings? set model.freeze_embeddings: false)")
        # The embeddings as they were before the push, restored from here.
        self.originals = [torch.empty_like(p) for p in self.params]
        self.acting = self.active(0)

    @classmethod
    def switched_on(cls, cfg: Config) -> bool:
        return cfg.fgm.enabled

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        # Frozen embeddings get no gradient to push along (caught before the model loads).
        if cfg.model.freeze_embeddings and "embeddings" in cfg.fgm.params:
            raise ConfigError(f"fgm.params: '{cfg.fgm.params}' names embeddings that model.freeze_embeddings: true "
                              "freezes: set model.freeze_embeddings=false or fgm.enabled=false")

    def active(self, epoch: int) -> bool:
        """epoch counts from 0 in the loop; start_epoch counts from 1 in the config."""
        return epoch + 1 >= self.cfg.start_epoch

    def start_epoch(self, epoch: int) -> None:
        self.acting = self.active(epoch)

    @torch.no_grad()
    def attack(self) -> None:
        """Push each matrix epsilon along its normalised gradient, keeping the original."""
        for param, original in zip(self.params, self.originals):
            original.copy_(param)
            grad = param.grad
            if grad is None:            # no gradient reached it (it stays where it is)
                continue
            norm = grad.norm()
            # epsilon / ||g||, and 0 for a zero gradient: decided on the device, no sync
            scale = torch.where(norm > 0, self.cfg.epsilon / norm, torch.zeros_like(norm))
            param.addcmul_(grad.to(param.dtype), scale)

    @torch.no_grad()
    def restore(self) -> None:
        for param, original in zip(self.params, self.originals):
            param.copy_(original)

    def after_backward(self, again: Callable[[], object]) -> None:
        if not self.acting:
            return
        self.attack()
        try:
            again()
        finally:
            self.restore()
