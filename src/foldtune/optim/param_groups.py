"""Parameter groups: which weights decay, and which learn at the head's rate."""

from __future__ import annotations

from torch import nn


def is_no_decay(module: nn.Module, param_name: str) -> bool:
    """Biases and normalisation weights are not decayed: shrinking them helps nothing."""
    return param_name == "bias" or isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "norm" in type(module).__name__.lower()


def decay_groups(model: nn.Module, lr: float, head_lr: float, weight_decay: float) -> list[dict]:
    """Four groups: backbone and head (pooling included), each with and without weight decay."""
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            part = "backbone" if module_name == "backbone" or module_name.startswith("backbone.") else "head"
            buckets.setdefault((part, is_no_decay(module, param_name)), []).append(param)
    groups = []
    for (part, no_decay), params in sorted(buckets.items()):
        groups.append({
            "name": f"{part}{'_no_decay' if no_decay else ''}",
            "params": params,
            "lr": lr if part == "backbone" else head_lr,
            "weight_decay": 0.0 if no_decay else weight_decay,
        })
    return groups
