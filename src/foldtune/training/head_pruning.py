"""`pruning.heads`: the L0 penalty on attention-head gates, and the gates fixed at a fold's end.

The gates themselves live on the model (models/head_gates.py). This hook switches them
on at pruning.heads.start_epoch and adds the penalty to each batch's loss:

    no target:    l0_lambda * E[L0]
    with target:  l0_lambda * |E[L0] - target|

where E[L0] is the expected number of open heads. The absolute deviation rather than a
Lagrangian: no multiplier to learn by gradient ascent and keep in the resume state, and
its push does not fade near the target as a squared one would (which the task loss
would then hold above it); the exact number comes from the ranking at the end anyway.

With pruning.heads.fix_epoch the gates are fixed to that mask as the epoch starts and the
epochs from there train the pruned model (the closed heads multiplied by 0, without
penalty); the fold's best checkpoint is chosen among those steps, so that pruning it at
the end changes nothing but its size. Without it, the gates learn to the fold's end and
the best checkpoint, chosen with its evaluation gates, is fixed and scored again.

Refused, before training: CUDA graphs (the gates' mode is switched on the host, and a
capture of the drawn gates is untested), SWA or EMA (an average of log_alpha is not the
gates any model was evaluated with, and the averaged model could become the best one
that is pruned), model.attention dflash (its encoder bypasses the hooked output
projection), a data-parallel launch (log_alpha has no gradient before start_epoch,
which DistributedDataParallel refuses), and the tfidf_ridge model (no heads).
"""

from __future__ import annotations

import torch

from foldtune.config import Config, ConfigError, HeadPruningConfig
from foldtune.models.head_gates import HeadGates, kept_heads, prune_heads, target_heads
from foldtune.training.hooks import Forward, StepHook


class HeadPruning(StepHook):
    # The gates' mode changes on the host at start_epoch; not tried under capture.
    graph_safe = False
    switch = "pruning.heads.enabled: true"

    def __init__(self, gates: HeadGates, cfg: HeadPruningConfig):
        self.gates = gates
        self.cfg = cfg
        self.target = target_heads(cfg, gates.log_alpha.numel())
        self.acting = self.active(0)

    @classmethod
    def switched_on(cls, cfg: Config) -> bool:
        return cfg.pruning.heads.enabled

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        heads = cfg.pruning.heads
        refused = [
            (f"model.type: {cfg.model.type} (it has no attention heads)", cfg.model.type != "transformer"),
            (f"averaging.method: {cfg.averaging.method} (an average of the gates' log_alpha is not the gates any "
             "model was evaluated with)", cfg.averaging.method != "none"),
            ("model.attention: dflash (its encoder bypasses the gated output projection)",
             cfg.model.attention == "dflash"),
        ]
        found = [what for what, present in refused if present]
        if found:
            raise ConfigError("pruning.heads.enabled: true cannot be combined with " + "; ".join(found)
                              + ": change those or set pruning.heads.enabled=false", "pruning.heads.enabled")
        if heads.start_epoch > cfg.training.epochs:
            raise ConfigError(f"pruning.heads.start_epoch: {heads.start_epoch} is after the last epoch "
                              f"(training.epochs: {cfg.training.epochs}): the gates would never learn",
                              "pruning.heads.start_epoch")
        if heads.fix_epoch is not None and heads.fix_epoch > cfg.training.epochs:
            raise ConfigError(f"pruning.heads.fix_epoch: {heads.fix_epoch} is after the last epoch "
                              f"(training.epochs: {cfg.training.epochs}): no epoch would train the pruned model; "
                              "set it to an epoch <= training.epochs, or null to fix the gates at the fold's end",
                              "pruning.heads.fix_epoch")

    def active(self, epoch: int) -> bool:
        """epoch counts from 0 in the loop; start_epoch counts from 1 in the config."""
        return epoch + 1 >= self.cfg.start_epoch

    def fixed(self, epoch: int) -> bool:
        """Whether the epoch (from 0) trains the pruned model (pruning.heads.fix_epoch, from 1)."""
        return self.cfg.fix_epoch is not None and epoch + 1 >= self.cfg.fix_epoch

    def start_epoch(self, epoch: int) -> None:
        if self.fixed(epoch):
            # the mask fix_and_prune keeps at the end: log_alpha learns no more (its gates
            # are the mask's constants), so the heads ranked now are those removed then
            if self.gates.mode != "fixed":
                self.gates.fix(kept_heads(self.gates.log_alpha, self.target))
            self.acting = False
            return
        self.acting = self.active(epoch)
        self.gates.mode = "learn" if self.acting else "open"

    def penalty(self) -> torch.Tensor:
        expected = self.gates.expected_open()
        if self.target is None:
            return self.cfg.l0_lambda * expected
        return self.cfg.l0_lambda * (expected - self.target).abs()

    def around_forward(self, batch: dict, forward: Forward) -> tuple[torch.Tensor, torch.Tensor]:
        loss, preds = forward(batch)
        if not self.acting:
            return loss, preds
        return loss + self.penalty(), preds


def fix_and_prune(model: torch.nn.Module, cfg: HeadPruningConfig) -> dict:
    """Fix model.head_gates to 0/1 (the target's heads of the largest log_alpha, or those
    whose evaluation gate is above 0.5), remove the closed heads from the backbone and the
    gates from the model, in place. Returns what was done, for the checkpoint's metadata."""
    gates: HeadGates = model.head_gates
    mask = kept_heads(gates.log_alpha, target_heads(cfg, gates.log_alpha.numel()))
    gates.fix(mask)
    closed = {layer: [h for h in range(mask.shape[1]) if mask[layer, h] == 0] for layer in range(mask.shape[0])}
    gates.remove()
    del model.head_gates
    prune_heads(model.backbone, {layer: heads for layer, heads in closed.items() if heads})
    return {"kept": int(mask.sum().item()), "of": mask.numel(),
            "closed": {str(layer): heads for layer, heads in closed.items() if heads}}
