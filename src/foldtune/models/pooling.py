"""Poolings: one vector per text from the encoder's token states.

A pooling may read only the positions the attention mask marks as real tokens; a row
with no real token at all pools to zeros, never NaN. Every pooling computes in float32:
sums over hundreds of bf16 states lose digits.
"""

from __future__ import annotations

import torch
from torch import nn

from foldtune.config import ConfigError, ModelConfig
from foldtune.registry import Registry

POOLINGS: Registry[type["Pooling"]] = Registry("pooling", "model.pooling")


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(torch.float32)
    total = (hidden.to(torch.float32) * weights).sum(dim=1)
    return total / weights.sum(dim=1).clamp(min=1.0)


class Pooling(nn.Module):
    """Base class: `forward(hidden, mask, all_hidden)` -> (batch, out_features).

    hidden is the last layer's states (batch, length, size); all_hidden, given when
    `needs_all_hidden_states` is set, holds the embeddings' and every layer's states.
    """

    needs_all_hidden_states = False

    def __init__(self, hidden_size: int, cfg: ModelConfig):
        super().__init__()
        self.hidden_size = hidden_size

    @property
    def out_features(self) -> int:
        return self.hidden_size


class LastLayersPooling(Pooling):
    """Base of the poolings that read the last k layers (k = model.pooling_layers)."""

    needs_all_hidden_states = True

    def __init__(self, hidden_size: int, cfg: ModelConfig):
        super().__init__(hidden_size, cfg)
        self.k = cfg.pooling_layers

    def last_layers(self, all_hidden) -> tuple[torch.Tensor, ...]:
        if all_hidden is None or len(all_hidden) - 1 < self.k:
            have = "no" if all_hidden is None else len(all_hidden) - 1
            raise ConfigError(f"model.pooling_layers={self.k} needs {self.k} encoder layers; the backbone gave {have}")
        return tuple(h.to(torch.float32) for h in all_hidden[-self.k:])


@POOLINGS.register("mean")
class MeanPooling(Pooling):
    """Average of the token states under the attention mask."""

    def forward(self, hidden, mask, all_hidden=None):
        return masked_mean(hidden, mask)


@POOLINGS.register("max")
class MaxPooling(Pooling):
    """Largest value of each feature over the real tokens."""

    def forward(self, hidden, mask, all_hidden=None):
        real = mask.unsqueeze(-1).bool()
        values = hidden.to(torch.float32).masked_fill(~real, float("-inf")).amax(dim=1)
        return torch.where(real.any(dim=1), values, torch.zeros_like(values))


@POOLINGS.register("cls")
class CLSPooling(Pooling):
    """The first token's state ([CLS] for BERT and DeBERTa)."""

    def forward(self, hidden, mask, all_hidden=None):
        return hidden[:, 0].to(torch.float32) * mask[:, :1].to(torch.float32)


@POOLINGS.register("attention")
class AttentionPooling(Pooling):
    """A learned score per token (a small MLP), softmax over the real tokens, weighted sum."""

    def __init__(self, hidden_size: int, cfg: ModelConfig):
        super().__init__(hidden_size, cfg)
        self.score = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.Tanh(), nn.Linear(hidden_size, 1))

    def forward(self, hidden, mask, all_hidden=None):
        hidden = hidden.to(torch.float32)
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            scores = self.score(hidden).squeeze(-1)
        real = mask.bool()
        weights = torch.softmax(scores.masked_fill(~real, -1e4), dim=1) * real
        # renormalise over the real tokens; a row without any pools to zeros
        weights = weights / weights.sum(dim=1, keepdim=True).clamp(min=1e-12)
        return torch.einsum("bl,blh->bh", weights, hidden)


@POOLINGS.register("weighted_layers")
class WeightedLayerPooling(LastLayersPooling):
    """Mean pooling of a learned softmax-weighted sum of the last k layers."""

    def __init__(self, hidden_size: int, cfg: ModelConfig):
        super().__init__(hidden_size, cfg)
        self.layer_logits = nn.Parameter(torch.zeros(self.k))   # equal weights at the start

    def forward(self, hidden, mask, all_hidden=None):
        layers = torch.stack(self.last_layers(all_hidden))
        weights = torch.softmax(self.layer_logits.float(), dim=0).view(-1, 1, 1, 1)
        return masked_mean((weights * layers).sum(dim=0), mask)


@POOLINGS.register("concat_cls")
class ConcatCLSPooling(LastLayersPooling):
    """The first token's state of each of the last k layers, side by side."""

    @property
    def out_features(self) -> int:
        return self.hidden_size * self.k

    def forward(self, hidden, mask, all_hidden=None):
        first = [h[:, 0] for h in self.last_layers(all_hidden)]
        return torch.cat(first, dim=-1) * mask[:, :1].to(torch.float32)


@POOLINGS.register("gem")
class GeMPooling(Pooling):
    """Generalised mean: (mean of x^p)^(1/p) over the real tokens, x clamped above 0."""

    def __init__(self, hidden_size: int, cfg: ModelConfig):
        super().__init__(hidden_size, cfg)
        self.p = cfg.gem_p

    def forward(self, hidden, mask, all_hidden=None):
        powered = hidden.to(torch.float32).clamp(min=1e-6).pow(self.p)
        pooled = masked_mean(powered, mask).pow(1.0 / self.p)
        return pooled * mask.any(dim=1, keepdim=True).to(torch.float32)


def build_pooling(cfg: ModelConfig, hidden_size: int) -> Pooling:
    return POOLINGS.get(cfg.pooling)(hidden_size, cfg)
