"""Batches padded to their own longest row, and length-sorted batches for prediction."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


class DynamicPadding:
    """Collate rows of token ids into tensors padded to the longest row of the batch."""

    def __init__(self, pad_token_id: int):
        if pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set one (e.g. tokenizer.pad_token = tokenizer.eos_token)")
        self.pad_token_id = int(pad_token_id)

    def __call__(self, items: Sequence[dict]) -> dict[str, torch.Tensor]:
        width = max(len(item["input_ids"]) for item in items)
        input_ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, item in enumerate(items):
            ids = item["input_ids"]
            input_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "labels" in items[0]:
            batch["labels"] = torch.stack([item["labels"] for item in items])
        return batch


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Row indices grouped longest first, so each batch carries almost no padding.

    Longest first also means a batch that does not fit in memory fails at once.
    """
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]
