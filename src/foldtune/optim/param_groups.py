"""Parameter groups: which weights decay, and at which learning rate each part learns.

Without layer-wise decay the backbone is one part at `lr` and the head (with the
pooling) another at `head_lr`. With `layerwise_lr_decay` d < 1 every encoder layer is
a part of its own: the top layer learns at `lr`, each layer below at d times the one
above it, and the embeddings (every backbone parameter outside the layers) one step
below the first layer. Each part is split in two groups: matrices with weight decay,
biases and normalisation weights without.
"""

from __future__ import annotations

from torch import nn

from foldtune.config import TrainingConfig
from foldtune.models.surgery import encoder_layers, layer_of_parameters


def is_no_decay(module: nn.Module, param_name: str) -> bool:
    """Biases and normalisation weights are not decayed: shrinking them helps nothing."""
    return param_name == "bias" or isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "norm" in type(module).__name__.lower()


def _part_lrs(model: nn.Module, cfg: TrainingConfig) -> tuple[dict[str, str], dict[str, float], set[str]]:
    """Parameter name -> part, part -> learning rate (in the order groups are listed), and
    the parts of modules with a rate of their own (`own_lr`)."""
    head_lr = cfg.head_lr if cfg.head_lr is not None else cfg.lr
    part_of: dict[str, str] = {}
    lrs: dict[str, float] = {}
    backbone = getattr(model, "backbone", None)
    if backbone is not None and cfg.layerwise_lr_decay < 1.0:
        n_layers = len(encoder_layers(backbone))
        lrs["embeddings"] = cfg.lr * cfg.layerwise_lr_decay ** n_layers
        for i in range(n_layers):
            lrs[f"layer_{i}"] = cfg.lr * cfg.layerwise_lr_decay ** (n_layers - 1 - i)
        for name, layer in layer_of_parameters(backbone).items():
            part_of[f"backbone.{name}"] = "embeddings" if layer < 0 else f"layer_{layer}"
    else:
        lrs["backbone"] = cfg.lr
        part_of.update({f"backbone.{name}": "backbone" for name, _ in (backbone.named_parameters() if backbone else [])})
    lrs["head"] = head_lr
    # A module that sets `own_lr` (the attention-head gates of pruning.heads) learns in a
    # part of its own at that rate.
    own = set()
    for module_name, module in model.named_modules():
        own_lr = getattr(module, "own_lr", None)
        if own_lr is not None:
            lrs[module_name] = own_lr
            own.add(module_name)
            part_of.update({f"{module_name}.{name}": module_name for name, _ in module.named_parameters()})
    return part_of, lrs, own


def parameter_groups(model: nn.Module, cfg: TrainingConfig) -> list[dict]:
    """Optimizer groups with a `name`, `lr` and `weight_decay` each; frozen weights left out."""
    # Parts of their own (own_lr) are not decayed: decay would pull log_alpha to 0, gates half-open.
    part_of, lrs, own = _part_lrs(model, cfg)
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            full = f"{module_name}.{param_name}" if module_name else param_name
            part = part_of.get(full, "head")
            key = (part, part in own or is_no_decay(module, param_name))
            buckets.setdefault(key, []).append(param)
    groups = []
    for part, lr in lrs.items():
        for no_decay in (False, True):
            params = buckets.get((part, no_decay))
            if params:
                groups.append({"name": f"{part}{'_no_decay' if no_decay else ''}", "params": params, "lr": lr,
                               "weight_decay": 0.0 if no_decay else cfg.weight_decay})
    return groups
