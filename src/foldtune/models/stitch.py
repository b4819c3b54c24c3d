"""A text's token states put back together from the windows that read it.

A window batch (data.long_text: windows; data/windows.py) runs the backbone on windows,
and its stitch plan says, for each position of each text, which (window, position) pairs
read it and with what weight (1/k for k reads). The stitched states are [n_texts, text
length, size], with a mask of the text's real positions, and any pooling pools them as
it pools a plain batch: each token once, the [CLS] of all windows as one token (their
mean state: what cls pooling reads), their [SEP] as one. A text of one window stitches
to its window's states exactly (weight 1, other reads weight 0).
"""

from __future__ import annotations

from typing import Sequence

import torch


class Stitch:
    """One window batch's stitch plan, applied to the backbone's states."""

    def __init__(self, window: torch.Tensor, position: torch.Tensor, weight: torch.Tensor):
        self.window, self.position, self.weight = window, position, weight
        self.mask = (weight > 0).any(dim=-1).long()

    def __call__(self, states: torch.Tensor) -> torch.Tensor:
        """[n_texts, text length, size] in float32 from [n_windows, width, size] states."""
        n_windows, width, size = states.shape
        # index_select on the flattened states rather than states[window, position]: its
        # backward is an index_add, which a CUDA graph captures like an embedding's
        flat = (self.window * width + self.position).reshape(-1)
        read = states.reshape(n_windows * width, size).index_select(0, flat).view(*self.window.shape, size)
        return (read * self.weight.unsqueeze(-1)).sum(dim=2)             # [texts, length, size]

    def layers(self, all_hidden: Sequence[torch.Tensor] | None) -> "StitchedLayers | None":
        return None if all_hidden is None else StitchedLayers(all_hidden, self)


class StitchedLayers(Sequence):
    """Every layer's states, stitched when a pooling reads them (most read only the last few)."""

    def __init__(self, layers: Sequence[torch.Tensor], stitch: Stitch):
        self.layers, self.stitch = layers, stitch

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return tuple(self.stitch(layer) for layer in self.layers[index])
        return self.stitch(self.layers[index])
