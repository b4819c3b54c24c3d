"""Whole texts past the backbone's positions: overlapping windows (data.long_text: windows).

A text's content tokens (its ids without the tokenizer's special tokens) are read as
windows of `room` tokens whose starts lie `stride` apart; each window is a row of its
own, [CLS] content [SEP], at most max_len ids. The last window is aligned to the text's
end (full, overlapping its neighbour more), unless max_windows windows do not reach the
end: then the text is cut after the last one.

A window batch (data/collate.py: window_batch) holds the windows of all its texts as rows (the backbone reads them at
once) and a stitch plan that puts each text's token states back in the order of the
text (models/stitch.py): for each position of a text, the (window, position) pairs that
read it and a weight each, 1/k for a token read by k windows. A window's special tokens
stand at the text's own special positions: the [CLS] of all its windows are one token,
their [SEP] one token. A text of one window is its one row, weight 1 everywhere: pooled
as the plain path pools it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from foldtune.config import ConfigError

# The batch keys of a stitch plan, each [n_texts, text length, most reads of a token].
STITCH_KEYS = ("stitch_window", "stitch_position", "stitch_weight")


def special_token_template(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a single text ([CLS] ... [SEP])."""
    probe = "hello world"
    body = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(body) + 1):
        if full[start:start + len(body)] == body:
            return list(full[:start]), list(full[start + len(body):])
    raise ValueError(f"cannot find how {type(tokenizer).__name__} adds special tokens around a text")


@dataclass(frozen=True)
class Windows:
    """How a tokenizer's texts are cut into windows: n_prefix and n_suffix special tokens
    around at most `room` content tokens a window."""

    max_len: int
    n_prefix: int
    n_suffix: int
    stride: int
    max_windows: int

    @classmethod
    def of(cls, tokenizer, data) -> "Windows | None":
        """The windows of DataConfig `data` for `tokenizer`; None unless data.long_text is windows."""
        if data.long_text != "windows":
            return None
        prefix, suffix = special_token_template(tokenizer)
        room = data.max_len - len(prefix) - len(suffix)
        if room < 1:
            raise ConfigError(f"config key 'data.max_len': {data.max_len} leaves no room for text beside "
                              f"{len(prefix) + len(suffix)} special tokens", "data.max_len")
        stride = data.window_stride if data.window_stride is not None else max(1, room * 3 // 4)
        if stride > room:
            raise ConfigError(f"config key 'data.window_stride': expected null or an integer in [1, {room}] "
                              f"(data.max_len {data.max_len} less {len(prefix) + len(suffix)} special tokens: a "
                              f"longer stride would skip tokens), got {stride}", "data.window_stride")
        return cls(data.max_len, len(prefix), len(suffix), stride, data.max_windows)

    @property
    def room(self) -> int:
        """Content tokens a window holds."""
        return self.max_len - self.n_prefix - self.n_suffix

    @property
    def capacity(self) -> int:
        """Content tokens max_windows windows read: a longer text is cut after them."""
        return self.room + (self.max_windows - 1) * self.stride

    def starts(self, n_content: int) -> list[int]:
        """Where each window of a text of n_content content tokens starts, in content tokens."""
        if n_content <= self.room:
            return [0]
        n = 1 + -(-(n_content - self.room) // self.stride)
        if n > self.max_windows:
            return [i * self.stride for i in range(self.max_windows)]
        return [i * self.stride for i in range(n - 1)] + [n_content - self.room]

    def parts(self, ids: Sequence[int]) -> tuple[list[int], list[int], list[int]]:
        """(prefix, content, suffix) of a text's ids, the content cut to `capacity` tokens."""
        ids = list(ids)
        content = ids[self.n_prefix:len(ids) - self.n_suffix][:self.capacity]
        return ids[:self.n_prefix], content, ids[len(ids) - self.n_suffix:] if self.n_suffix else []

    def split(self, ids: Sequence[int]) -> list[list[int]]:
        """The windows of a text's ids (special tokens included), each with the special tokens."""
        prefix, content, suffix = self.parts(ids)
        return [prefix + content[s:s + self.room] + suffix for s in self.starts(len(content))]


def text_rows(batch: dict[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
    """The part of a batch that holds its texts start..stop-1: their rows, or their windows
    and stitch plans (window numbers counted from their first window)."""
    if STITCH_KEYS[0] not in batch:
        return {key: value[start:stop] for key, value in batch.items()}
    local = {key: value[start:stop] for key, value in batch.items() if key not in ("input_ids", "attention_mask")}
    read = local["stitch_window"][local["stitch_weight"] > 0]
    first, last = int(read.min()), int(read.max())
    local["stitch_window"] = (local["stitch_window"] - first).clamp(min=0)
    local["input_ids"] = batch["input_ids"][first:last + 1]
    local["attention_mask"] = batch["attention_mask"][first:last + 1]
    return local
