"""Changes to a pretrained backbone before training: re-initialise the top layers, freeze
the bottom ones, switch dropout off, and the one map of a backbone these all share:
which parameters belong to which encoder layer.

Layer map, for any `AutoModel` encoder: the encoder layers are the `nn.ModuleList` with
`config.num_hidden_layers` entries (BERT, RoBERTa, DeBERTa: `encoder.layer`); every other
backbone parameter (word and position embeddings, DeBERTa's relative position
embeddings and their LayerNorm) counts as "embeddings", one level below the first layer.
"""

from __future__ import annotations

import torch
from torch import nn

# Config keys under which encoders keep their dropout rates.
DROPOUT_KEYS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "pooler_dropout", "dropout",
                "attention_dropout", "hidden_dropout", "activation_dropout")


def encoder_layers(backbone: nn.Module) -> nn.ModuleList:
    """The backbone's stack of encoder layers, bottom first."""
    expected = getattr(backbone.config, "num_hidden_layers", None)
    lists = [m for m in backbone.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    matching = [m for m in lists if len(m) == expected] if expected is not None else lists
    if not matching:
        raise ValueError(f"cannot find the encoder layers of {type(backbone).__name__} "
                         f"(no module list of {expected} layers)")
    return max(matching, key=len)


def layer_of_parameters(backbone: nn.Module) -> dict[str, int]:
    """Parameter name (as in backbone.named_parameters) -> layer index; -1 for embeddings."""
    layers = encoder_layers(backbone)
    index = {id(p): i for i, layer in enumerate(layers) for p in layer.parameters()}
    return {name: index.get(id(p), -1) for name, p in backbone.named_parameters()}


def _init_module(module: nn.Module, std: float) -> None:
    # The scheme BERT and DeBERTa are initialised with (transformers' _init_weights).
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=std)
    elif isinstance(module, nn.LayerNorm) or "LayerNorm" in type(module).__name__:
        if getattr(module, "weight", None) is not None:
            nn.init.ones_(module.weight)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)


@torch.no_grad()
def reinit_last_layers(backbone: nn.Module, n: int) -> None:
    """Give the top n encoder layers fresh weights: their pretraining fits the
    pretraining task, not the new one."""
    if n == 0:
        return
    layers = encoder_layers(backbone)
    if n > len(layers):
        raise ValueError(f"model.reinit_layers={n} but the backbone has {len(layers)} layers")
    std = getattr(backbone.config, "initializer_range", 0.02)
    for layer in list(layers)[-n:]:
        for module in layer.modules():
            _init_module(module, std)


def freeze_bottom(backbone: nn.Module, embeddings: bool, n_layers: int) -> None:
    """Stop training the embeddings and/or the first n_layers encoder layers."""
    if not embeddings and n_layers == 0:
        return
    layer_of = layer_of_parameters(backbone)
    n_total = len(encoder_layers(backbone))
    if n_layers > n_total:
        raise ValueError(f"model.freeze_layers={n_layers} but the backbone has {n_total} layers")
    for name, param in backbone.named_parameters():
        layer = layer_of[name]
        if (layer == -1 and embeddings) or 0 <= layer < n_layers:
            param.requires_grad_(False)


def set_dropout(backbone: nn.Module, p: float | None) -> None:
    """Set every dropout rate inside the backbone to p (None: leave the model's own)."""
    if p is None:
        return
    for key in DROPOUT_KEYS:
        if isinstance(getattr(backbone.config, key, None), float):
            setattr(backbone.config, key, p)
    for module in backbone.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
        elif hasattr(module, "dropout_prob") and isinstance(module.dropout_prob, float):
            module.dropout_prob = p
