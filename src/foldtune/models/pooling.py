"""Poolings: one vector per text from the encoder's token states.

A pooling may read only the positions the attention mask marks as real tokens; a row
with no real token at all pools to zeros, never NaN.
"""

from __future__ import annotations

import torch
from torch import nn

from foldtune.registry import Registry

POOLINGS: Registry[type["Pooling"]] = Registry("pooling", "model.pooling")


class Pooling(nn.Module):
    """Base class: `forward(hidden, mask)` -> (batch, out_features(hidden_size))."""

    # Poolings that combine several layers set this to ask the backbone for all of them.
    needs_all_hidden_states = False

    def __init__(self, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size

    @property
    def out_features(self) -> int:
        return self.hidden_size


@POOLINGS.register("mean")
class MeanPooling(Pooling):
    """Average of the token states under the attention mask."""

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor, all_hidden=None) -> torch.Tensor:
        # Summing hundreds of bf16 states loses digits: pool in float32.
        weights = mask.unsqueeze(-1).to(torch.float32)
        total = (hidden.to(torch.float32) * weights).sum(dim=1)
        count = weights.sum(dim=1).clamp(min=1.0)
        return total / count


def build_pooling(name: str, hidden_size: int) -> Pooling:
    return POOLINGS.get(name)(hidden_size)
