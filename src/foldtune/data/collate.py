"""Batches padded to their own longest row; length-bucketed batches for training and
length-sorted ones for prediction, so little compute goes to padding. With data.long_text
windows a batch's rows are its texts' windows, with a stitch plan (data/windows.py)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from foldtune.data.windows import STITCH_KEYS, Windows

# Widths are rounded up to this under training.compile, training.cuda_graphs and
# model.attention flex: few shapes, few compilations or captures.
STATIC_PAD_MULTIPLE = 64


def round_up(width: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is at least `width`."""
    return -(-width // multiple) * multiple


class DynamicPadding:
    """Collate rows of token ids into tensors padded to the longest row of the batch."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int = 1):
        if pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set one (e.g. tokenizer.pad_token = tokenizer.eos_token)")
        self.pad_token_id = int(pad_token_id)
        # > 1: widths rounded up to a multiple, so a compiled model sees few distinct shapes.
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, items: Sequence[dict]) -> dict[str, torch.Tensor]:
        width = round_up(max(len(item["input_ids"]) for item in items), self.pad_to_multiple_of)
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


class PaddedRows:
    """Collate row numbers of a dataset into the batch DynamicPadding makes of those rows.

    The rows are padded into one matrix once (int32: 4 bytes a token), and a batch is
    gathered from it, so a training step does not loop over each row's token ids in
    Python (1,645 MiniLM rows: 0.78 ms a batch of 16 on the 2-core development machine
    with DynamicPadding). Give the loader range(len(dataset)) as its dataset: the same
    sampler and generator then give the same batches as a loader over the rows.
    """

    def __init__(self, dataset, pad_token_id: int, pad_to_multiple_of: int = 1):
        self.pad = DynamicPadding(pad_token_id, pad_to_multiple_of)     # checks the pad token
        lengths = dataset.lengths
        ids = np.full((len(lengths), int(lengths.max(initial=1))), self.pad.pad_token_id, dtype=np.int32)
        ids[np.arange(ids.shape[1]) < lengths[:, None]] = np.concatenate(
            [np.asarray(row, dtype=np.int32) for row in dataset.input_ids] + [np.empty(0, dtype=np.int32)])
        self.ids = torch.from_numpy(ids)
        self.lengths = torch.from_numpy(lengths)
        self.targets = dataset.targets

    def __call__(self, rows: Sequence[int]) -> dict[str, torch.Tensor]:
        index = torch.as_tensor(rows, dtype=torch.long)
        lengths = self.lengths[index]
        width = round_up(int(lengths.max()), self.pad.pad_to_multiple_of)
        input_ids = torch.full((len(index), width), self.pad.pad_token_id, dtype=torch.long)
        stored = min(width, self.ids.shape[1])      # a width rounded up may pass the longest row
        input_ids[:, :stored] = self.ids[index, :stored]
        batch = {"input_ids": input_ids, "attention_mask": (torch.arange(width) < lengths[:, None]).long()}
        if self.targets is not None:
            batch["labels"] = self.targets[index]
        return batch


def window_batch(texts: Sequence[Sequence[int]], windows: Windows, pad_token_id: int,
                 pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """The windows of `texts` (ids with special tokens) padded into rows, a text's windows
    in consecutive rows, and the stitch plan of each text."""
    split = [windows.split(ids) for ids in texts]
    padded = DynamicPadding(pad_token_id, pad_to_multiple_of)([{"input_ids": window} for text in split
                                                               for window in text])

    n_content = [len(windows.parts(ids)[1]) for ids in texts]
    specials = windows.n_prefix + windows.n_suffix
    reads = max(len(text) for text in split)     # no token is read by more windows than its text has
    source_window = np.zeros((len(texts), specials + max(n_content), reads), dtype=np.int64)
    source_position = np.zeros_like(source_window)
    count = np.zeros(source_window.shape[:2], dtype=np.int64)
    first_row = 0
    for t, text in enumerate(split):
        for w, start in enumerate(windows.starts(n_content[t])):
            n_window_content = len(text[w]) - specials
            # where each position of the window stands in the text
            at = np.concatenate([np.arange(windows.n_prefix),
                                 windows.n_prefix + start + np.arange(n_window_content),
                                 windows.n_prefix + n_content[t] + np.arange(windows.n_suffix)])
            slot = count[t, at]
            source_window[t, at, slot] = first_row + w
            source_position[t, at, slot] = np.arange(len(at))
            count[t, at] += 1
        first_row += len(text)
    weight = np.where(np.arange(reads) < count[..., None], 1.0 / np.maximum(count, 1)[..., None], 0.0)
    return {**padded,
            "stitch_window": torch.from_numpy(source_window), "stitch_position": torch.from_numpy(source_position),
            "stitch_weight": torch.from_numpy(weight.astype(np.float32))}


class WindowPadding:
    """Collate rows of token ids into window batches (data.long_text: windows; data/windows.py)."""

    def __init__(self, windows: Windows, pad_token_id: int, pad_to_multiple_of: int = 1):
        self.pad = DynamicPadding(pad_token_id, pad_to_multiple_of)     # checks the pad token
        self.windows = windows

    def __call__(self, items: Sequence[dict]) -> dict[str, torch.Tensor]:
        batch = window_batch([item["input_ids"] for item in items], self.windows, self.pad.pad_token_id,
                             self.pad.pad_to_multiple_of)
        if "labels" in items[0]:
            batch["labels"] = torch.stack([item["labels"] for item in items])
        return batch


class WindowedRows(WindowPadding):
    """Collate row numbers of a dataset into window batches, as PaddedRows does rows."""

    def __init__(self, dataset, windows: Windows, pad_token_id: int, pad_to_multiple_of: int = 1):
        super().__init__(windows, pad_token_id, pad_to_multiple_of)
        self.dataset = dataset

    def __call__(self, rows: Sequence[int]) -> dict[str, torch.Tensor]:
        return super().__call__([self.dataset[row] for row in rows])


# Under training.cuda_graphs a window batch's number of windows and its texts' stitched
# length are rounded up to these (and its reads per position to max_windows): with the
# widths' multiple of 64, a fold of essays needs a few dozen shapes, each captured once.
GRAPH_WINDOW_ROWS = 8
GRAPH_TEXT_LENGTH = 256


def fixed_window_shapes(batch: dict[str, torch.Tensor], reads: int) -> dict[str, torch.Tensor]:
    """A window batch padded to the shapes a replayed step takes (training/graphs.py): its
    window rows repeated up to a multiple of GRAPH_WINDOW_ROWS (stand-ins no text reads),
    its stitch plan padded with reads of weight zero up to a text length that is a multiple
    of GRAPH_TEXT_LENGTH and `reads` reads a position. Each text's output is unchanged."""
    n_windows = len(batch["input_ids"])
    texts, length, have = batch["stitch_weight"].shape
    # copies of real windows, not rows of padding: a window whose tokens all are masked can
    # give NaN states (a softmax over no key), and a NaN weighed zero in the stitch still
    # makes the weights' gradients NaN
    rows = torch.arange(round_up(n_windows, GRAPH_WINDOW_ROWS)) % n_windows
    pad = (0, reads - have, 0, round_up(length, GRAPH_TEXT_LENGTH) - length)
    return {**batch, "input_ids": batch["input_ids"][rows], "attention_mask": batch["attention_mask"][rows],
            **{key: torch.nn.functional.pad(batch[key], pad) for key in STITCH_KEYS}}


def row_collate(dataset, pad_token_id: int, pad_to_multiple_of: int = 1, windows: Windows | None = None):
    """What collates a loader's row numbers of `dataset`: PaddedRows, or WindowedRows for windows."""
    if windows is None:
        return PaddedRows(dataset, pad_token_id, pad_to_multiple_of)
    return WindowedRows(dataset, windows, pad_token_id, pad_to_multiple_of)


def item_collate(pad_token_id: int, pad_to_multiple_of: int = 1, windows: Windows | None = None):
    """What collates a dataset's items: DynamicPadding, or WindowPadding for windows."""
    if windows is None:
        return DynamicPadding(pad_token_id, pad_to_multiple_of)
    return WindowPadding(windows, pad_token_id, pad_to_multiple_of)


# What a batch gives the model (TextRegressor.forward): a window batch adds its stitch plan.
MODEL_INPUTS = ("input_ids", "attention_mask") + STITCH_KEYS


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch's tensors the model takes, by name."""
    return {key: batch[key] for key in MODEL_INPUTS if key in batch}


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Row indices grouped longest first, so each batch carries almost no padding.

    Longest first also means a batch that does not fit in memory fails at once.
    """
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]


class LengthBucketSampler(torch.utils.data.Sampler[list[int]]):
    """Training batches of rows of similar length, in random order.

    Each epoch shuffles all rows, cuts the shuffled order into pools of
    `batch_size * pool_batches` rows, sorts each pool by length and cuts it into
    batches, then shuffles the batches. Every row is seen once an epoch, which rows
    share a batch still changes from epoch to epoch, and a batch carries little padding.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, generator: torch.Generator,
                 pool_batches: int = 50):
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.generator = generator
        self.pool = batch_size * pool_batches

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def __iter__(self):
        order = torch.randperm(len(self.lengths), generator=self.generator).numpy()
        batches = []
        for start in range(0, len(order), self.pool):
            pool = order[start:start + self.pool]
            pool = pool[np.argsort(-self.lengths[pool], kind="stable")]
            batches += [pool[i:i + self.batch_size].tolist() for i in range(0, len(pool), self.batch_size)]
        for index in torch.randperm(len(batches), generator=self.generator).tolist():
            yield batches[index]
