"""Predictions in batches sorted by length: validation in training, and inference."""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from foldtune.data.collate import item_collate, length_sorted_batches, model_inputs, round_up
from foldtune.data.dataset import TextDataset
from foldtune.runtime.precision import Precision
from foldtune.runtime.launch_lock import to_host


def padded_batches(dataset: TextDataset, batch_size: int, pad_token_id: int, device: torch.device,
                   pad_to_multiple_of: int = 1,
                   rows_multiple: int = 1, windows=None) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """(rows, batch on `device`) for the dataset in batches sorted by length (almost no padding).

    rows_multiple > 1: a batch is filled up to a multiple of that many rows with copies of
    its shortest row, which follow its `rows` and whose outputs are dropped. The batch
    shapes then repeat from one fold to the next (411, 413 or 410 validation rows), and
    what cuDNN builds for an attention shape at its first use serves every fold.
    windows: data.long_text windows' Windows (data/windows.py): window batches.
    """
    batches = length_sorted_batches(dataset.lengths, batch_size)
    filled = [rows + rows[-1:] * (round_up(len(rows), rows_multiple) - len(rows)) for rows in batches]
    # Its own generator: a loader draws a seed when iterated, and training's global
    # generator (dropout) must not depend on when the batches were made.
    loader = DataLoader(dataset, batch_sampler=filled, collate_fn=item_collate(pad_token_id, pad_to_multiple_of, windows),
                        pin_memory=device.type == "cuda", generator=torch.Generator())
    for rows, batch in zip(batches, loader):
        yield rows, {key: value.to(device, non_blocking=True) for key, value in model_inputs(batch).items()}


@torch.inference_mode()
def predict_batches(model, batches: Iterable[tuple[list[int], dict[str, torch.Tensor]]], n_rows: int,
                    precision: Precision) -> np.ndarray:
    """Predictions in row order from (rows, batch) pairs; leaves the model in eval mode.

    A batch may hold stand-in rows after its `rows`: their outputs are dropped. The
    batches' outputs stay on the device until the last one: one wait for the GPU.
    """
    model.eval()
    order, outputs = [], []
    for rows, batch in batches:
        with precision.autocast():
            outputs.append(model(**model_inputs(batch)).float()[:len(rows)])
        order.extend(rows)
    if not outputs:
        raise ValueError("nothing to predict: no rows")
    preds = to_host(torch.cat(outputs)).numpy()     # waited for outside a fold's launch lock (runtime/launch_lock.py)
    out = np.empty((n_rows, preds.shape[1]), dtype=np.float32)
    out[order] = preds
    return out


def predict(model, dataset: TextDataset, batch_size: int, pad_token_id: int, device: torch.device,
            precision: Precision, pad_to_multiple_of: int = 1, windows=None) -> np.ndarray:
    """Predictions in row order, from batches sorted by length; leaves the model in eval mode.
    windows: data.long_text windows' Windows (data/windows.py), None for rows of one text each."""
    return predict_batches(model, padded_batches(dataset, batch_size, pad_token_id, device, pad_to_multiple_of,
                                                 windows=windows), len(dataset), precision)
