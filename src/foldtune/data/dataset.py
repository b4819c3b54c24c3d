"""Tokenize every text once per run and hand out rows of token ids and targets.

Texts are tokenized without special tokens and without truncation, so the full length
of each is known (and logged), then cut to fit max_len with the tokenizer's own special
tokens put back around the kept part: the start of a long text, or its start and its
end (an essay's conclusion says much about it). With data.long_text windows a text is
kept whole up to what its windows read (data/windows.py), cut into windows when batched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from foldtune.data.windows import Windows, special_token_template

log = logging.getLogger(__name__)


@dataclass
class EncodedTexts:
    """Token ids of each text, cut to max_len (windows: to what its windows read), with how
    long each text really was."""

    input_ids: list[list[int]]
    full_lengths: np.ndarray
    max_len: int            # the most ids a text keeps, special tokens included

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(ids) for ids in self.input_ids), dtype=np.int64, count=len(self.input_ids))

    @property
    def n_truncated(self) -> int:
        return int((self.full_lengths > self.max_len).sum())


def cut(body: Sequence[int], room: int, long_text: str = "truncate", head_fraction: float = 0.25) -> list[int]:
    """At most `room` tokens of `body`: its start (truncate, windows: what the windows read),
    or its start and end (head_tail)."""
    if len(body) <= room:
        return list(body)
    if long_text != "head_tail":
        return list(body[:room])
    head = int(round(room * head_fraction))
    return list(body[:head]) + list(body[len(body) - (room - head):])


def encode_texts(tokenizer, texts: Sequence[str], max_len: int, long_text: str = "truncate",
                 head_fraction: float = 0.25, chunk: int = 512, windows: Windows | None = None) -> EncodedTexts:
    """The ids of `texts` with the tokenizer's special tokens, cut as `long_text` says
    (windows: to what `windows` read, data/windows.py)."""
    prefix, suffix = special_token_template(tokenizer)
    room = max_len - len(prefix) - len(suffix)
    if room < 1:
        raise ValueError(f"max_len {max_len} leaves no room for text beside {len(prefix) + len(suffix)} special tokens")
    if long_text == "windows":
        if windows is None:
            raise ValueError("long_text windows needs the windows (Windows.of(tokenizer, data))")
        room = windows.capacity
    # Full-length encodings exceed the model's limit by design; the warning about it is noise.
    quiet = logging.getLogger("transformers.tokenization_utils_base")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        input_ids, full_lengths = [], []
        for start in range(0, len(texts), chunk):
            # the ids alone: building masks and type ids as Python lists took a third of the time
            batch = tokenizer(list(texts[start:start + chunk]), add_special_tokens=False, return_attention_mask=False,
                              return_token_type_ids=False)["input_ids"]
            for body in batch:
                full_lengths.append(len(body) + len(prefix) + len(suffix))
                input_ids.append(prefix + cut(body, room, long_text, head_fraction) + suffix)
    finally:
        quiet.setLevel(level)
    kept = room + len(prefix) + len(suffix)
    encoded = EncodedTexts(input_ids, np.asarray(full_lengths, dtype=np.int64), kept)
    if len(texts):
        how = (f"after {windows.max_windows} windows of max_len {max_len} ({kept} tokens)" if long_text == "windows"
               else f"to max_len {max_len} ({long_text})")
        log.info("tokenized %d texts: median %d tokens, max %d; %d (%.0f%%) cut %s",
                 len(texts), int(np.median(encoded.full_lengths)), int(encoded.full_lengths.max()),
                 encoded.n_truncated, 100 * encoded.n_truncated / len(texts), how)
    return encoded


def encode_data(tokenizer, texts: Sequence[str], data) -> EncodedTexts:
    """encode_texts with a run's DataConfig `data`: its max_len and long_text settings."""
    return encode_texts(tokenizer, texts, data.max_len, data.long_text, data.head_fraction,
                        windows=Windows.of(tokenizer, data))


class TextDataset(Dataset):
    """Rows of token ids (and float32 targets when given)."""

    def __init__(self, input_ids: Sequence[list[int]], targets: np.ndarray | None = None):
        if targets is not None and len(targets) != len(input_ids):
            raise ValueError(f"{len(input_ids)} texts but {len(targets)} target rows")
        self.input_ids = list(input_ids)
        self.targets = None if targets is None else torch.as_tensor(np.asarray(targets, dtype=np.float32))

    def __len__(self) -> int:
        return len(self.input_ids)

    def subset(self, rows: Sequence[int]) -> "TextDataset":
        """The rows `rows`, in that order."""
        return TextDataset([self.input_ids[i] for i in rows],
                           None if self.targets is None else self.targets.numpy()[list(rows)])

    def __getitem__(self, index: int) -> dict:
        item = {"input_ids": self.input_ids[index]}
        if self.targets is not None:
            item["labels"] = self.targets[index]
        return item

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(ids) for ids in self.input_ids), dtype=np.int64, count=len(self.input_ids))
