"""R-Drop (Liang et al., "R-Drop: Regularized Dropout for Neural Networks", 2021).

Each batch goes through the model twice; dropout draws two different masks, so the two
predictions p1 and p2 differ. The loss is the mean of the two task losses plus alpha
times a consistency term that pulls the two sub-models together:

    loss = (task(p1) + task(p2)) / 2 + alpha * consistency(p1, p2).

For classification the paper's consistency is the symmetric KL divergence between the
two predicted distributions. A regressor predicts a number per target; read as the mean
of a Gaussian of unit variance, P1 = N(p1, 1) and P2 = N(p2, 1), and

    KL(P1 || P2) = integral of P1(x) * (log P1(x) - log P2(x)) dx
                 = E_{x ~ P1}[((x - p2)^2 - (x - p1)^2) / 2]
                 = E[(x - p1)^2 + 2 (x - p1)(p1 - p2) + (p1 - p2)^2 - (x - p1)^2] / 2
                 = (p1 - p2)^2 / 2,

since E[x - p1] = 0 under P1. KL(P2 || P1) is the same, so the symmetric divergence
KL(P1 || P2) + KL(P2 || P1) = (p1 - p2)^2: the consistency term is the squared difference
of the predictions, averaged over the rows and the targets. (The paper's half of that sum
is alpha / 2 here.)

Rows are weighed as the task loss weighs them (`row_weight`): the stand-in rows that fill
a short batch under CUDA graphs count for nothing in the consistency term either. Two
forward passes on the device and no host sync: a CUDA graph captures them (graph_safe).
Without any dropout the passes agree and the step is the plain one.
"""

from __future__ import annotations

import torch

from foldtune.config import Config, ConfigError, RDropConfig
from foldtune.losses import row_mean
from foldtune.training.hooks import Forward, StepHook


def consistency(p1: torch.Tensor, p2: torch.Tensor, row_weight: torch.Tensor | None) -> torch.Tensor:
    """The symmetric KL of unit-variance Gaussians at p1 and p2: the (row-weighted) mean of
    (p1 - p2)^2 over rows and targets."""
    return row_mean((p1.float() - p2.float()).pow(2), row_weight).mean()


class RDrop(StepHook):
    switch = "rdrop.enabled: true"

    def __init__(self, cfg: RDropConfig):
        self.alpha = cfg.alpha

    @classmethod
    def switched_on(cls, cfg: Config) -> bool:
        return cfg.rdrop.enabled

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        # Without dropout the two passes agree: twice the time for the plain step.
        if cfg.model.backbone_dropout == 0.0 and cfg.model.head_dropout == 0.0:
            raise ConfigError("rdrop.enabled: true needs dropout, and model.backbone_dropout and "
                              "model.head_dropout are both 0: set model.backbone_dropout=0.1 (for example) "
                              "or rdrop.enabled=false")

    def around_forward(self, batch: dict, forward: Forward) -> tuple[torch.Tensor, torch.Tensor]:
        loss1, p1 = forward(batch)
        loss2, p2 = forward(batch)
        loss = (loss1 + loss2) / 2 + self.alpha * consistency(p1, p2, batch.get("row_weight"))
        return loss, p1
