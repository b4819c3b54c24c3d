"""Training steps replayed as CUDA graphs: one launch a step instead of about a thousand.

A small encoder on a large GPU spends its steps launching kernels, not computing
(MiniLM at batch 16 on an H100: ~29 ms a step in eager mode for ~3 ms of arithmetic).
With `training.cuda_graphs` the whole step (forward, loss, backward, clipping and the
optimizer's update) is captured once per batch shape and then replayed: the batch is
copied into the graph's own input tensors and one replay does the rest. Batch widths
are padded to multiples of 64, so a fold needs a handful of graphs (with data.long_text
windows, also the number of windows and the stitched length: data/collate.py's
fixed_window_shapes, a few dozen graphs). An epoch's short
last batch is filled up to the batch size with copies of its rows, weighed zero in the
loss (`row_weight`), and replayed too: run eagerly, it cost a slow step under the fold's
launch lock at every epoch end (and cuDNN plans for its shape). Only a larger batch, or a new
width beyond `max_graphs`, runs eagerly on the same weights and optimizer.

What makes a replay equal to an eager step:
- the optimizer (fused AdamW, capturable) keeps its step count on the device and reads
  each group's learning rate from a device tensor, which the schedule fills in place;
- its state exists before the first capture: a fold's first step runs eagerly;
- each replay's backward writes fresh gradients (captured from None): nothing is zeroed;
- the step (training/step.py) is the eager one, hooks included: the graph only captures it;
- the loss is added to the step's running sum inside the graph;
- a filled batch's stand-in rows weigh zero in the loss, so their outputs' gradients are
  exactly zero and the step is that of the short batch alone (up to summation order);
- dropout draws from the CUDA generator, which a replay advances as an eager step
  would; the warm-up and capture of a new shape leave the generator as they found it;
- model.attention flex builds its block mask from the padding mask inside the step, so
  each replay skips the padding tiles of its own batch (models/deberta_attention.py).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from foldtune.config import Config
from foldtune.data.collate import STATIC_PAD_MULTIPLE, fixed_window_shapes, round_up
from foldtune.data.windows import STITCH_KEYS, Windows
from foldtune.models.deberta_attention import forget_block_mask
from foldtune.training.step import TrainingStep
from foldtune.runtime.launch_lock import wait_for_stream

log = logging.getLogger("foldtune")


class NoGraphs:
    """CUDA graphs switched off: every step runs eagerly."""

    def prepare(self) -> None:
        pass

    def run(self, batch: dict[str, torch.Tensor]) -> bool:
        return False

    def before_eager_step(self) -> None:
        pass

    def close(self) -> None:
        pass


NO_GRAPHS = NoGraphs()


# The graphs a fold captures (per batch shape and step variant); a batch of any other
# shape runs eagerly. Window batches get twice as many (fixed_window_shapes).
MAX_GRAPHS = 16


def too_many_shapes(cfg: Config) -> str | None:
    """What a user should change when a fold's batches can come in more shapes than it
    captures graphs for: batch widths (data.max_len in multiples of the pad multiple) times
    step variants (AWP or FGM starting at a later epoch doubles them). None when they fit,
    without CUDA graphs, and for window batches (their own fixed shapes)."""
    t = cfg.training
    if not t.cuda_graphs or cfg.data.long_text == "windows":
        return None
    starts = sorted({hook.start_epoch for hook in (cfg.awp, cfg.fgm) if hook.enabled})
    variants = len({tuple(epoch + 1 >= start for start in starts) for epoch in range(t.epochs)})
    max_len = cfg.data.max_len

    def widths(multiple: int) -> int:
        return round_up(max_len, multiple) // multiple

    multiple = t.pad_to_multiple_of or STATIC_PAD_MULTIPLE
    if widths(multiple) * variants <= MAX_GRAPHS:
        return None
    coarser = next(m for m in range(STATIC_PAD_MULTIPLE, round_up(max_len, STATIC_PAD_MULTIPLE) + 1,
                                    STATIC_PAD_MULTIPLE) if widths(m) * variants <= MAX_GRAPHS)
    twice = f" times {variants} step variants (a technique starts at a later epoch)" if variants > 1 else ""
    return (f"training.cuda_graphs: batches come in up to {widths(multiple)} widths (data.max_len {max_len} in "
            f"multiples of {multiple}){twice}, more shapes than the {MAX_GRAPHS} graphs a fold captures: the others "
            f"train eagerly, slower. training.pad_to_multiple_of={coarser} makes {widths(coarser)} widths")


class GraphedSteps:
    """Captures and replays the training step (training/step.py), one CUDA graph per batch
    shape and per set of hooks acting (training/hooks.py: a hook may start acting at an
    epoch)."""

    def __init__(self, step: TrainingStep, batch_size: int, max_graphs: int = MAX_GRAPHS,
                 windows: Windows | None = None):
        self.step = step
        # data.long_text windows: batches padded to fixed shapes (data/collate.py), more of them
        self.windows = windows
        max_graphs = max_graphs if windows is None else 2 * max_graphs
        self.optimizer = step.optimizer
        self.batch_size = batch_size
        self.max_graphs = max_graphs
        self.device = step.loss_sum.device
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor]]] = {}
        self.stream = torch.cuda.Stream(self.device)
        self.pool = torch.cuda.graph_pool_handle()   # one memory pool for every shape's graph
        self._all_rows = torch.ones(batch_size).pin_memory()     # the row weights of a full batch
        cache_relative_positions(step.model)

    def prepare(self) -> None:
        """Make the optimizer replayable; call after a training state is loaded, before any step."""
        for group in self.optimizer.param_groups:
            group["capturable"] = True
            lr = group["lr"]
            if not torch.is_tensor(lr) or lr.device != self.device:
                group["lr"] = torch.tensor(float(lr), dtype=torch.float32, device=self.device)

    def run(self, batch: dict[str, torch.Tensor]) -> bool:
        """One training step as a replay; False when the batch must go the eager way instead."""
        if not self.optimizer.state:        # the first step creates the optimizer's state
            return False
        if len(batch["labels"]) > self.batch_size:
            return False
        batch = self.filled(batch)
        shape = (self.step.variant, *((key, tuple(value.shape)) for key, value in sorted(batch.items())))
        entry = self.graphs.get(shape)
        if entry is None and len(self.graphs) >= self.max_graphs:
            return False
        if entry is None:
            entry = self.graphs[shape] = self._capture(batch)
        graph, static = entry
        for key, value in batch.items():
            static[key].copy_(value, non_blocking=True)
        graph.replay()
        return True

    def before_eager_step(self) -> None:
        """Ready an eager step between replays."""
        # The step waits for the GPU under the launch lock (transformers reads the attention mask
        # on the host): let the steps replayed before it finish first, outside the launch lock.
        wait_for_stream(self.device)
        # A graph's gradient buffers stay attached after its capture: start afresh.
        self.optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        """Drop the graphs and their inputs: once torch's cache is emptied, their memory pool
        goes back to the device (a pool of a dropped graph is not reused by the next fold's)."""
        self.graphs.clear()
        self.optimizer.zero_grad(set_to_none=True)     # the captured gradient buffers

    def filled(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch with its row weights, filled up to the batch size with stand-in texts
        weighed zero; a window batch also padded to fixed shapes (data/collate.py)."""
        if self.windows is not None:
            batch = {key: value.pin_memory() for key, value in
                     fixed_window_shapes(batch, self.windows.max_windows).items()}
        if len(batch["labels"]) == self.batch_size:
            return {**batch, "row_weight": self._all_rows}
        # pinned, as the trainer's batches are: copied to the graph's inputs without waiting
        return {key: value.pin_memory() for key, value in filled_texts(batch, self.batch_size).items()}

    def _capture(self, batch: dict[str, torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor]]:
        static = {key: value.to(self.device, copy=True) for key, value in batch.items()}
        # The warm-up and the capture draw no random numbers of the run's: its dropout
        # sequence is that of the steps alone, with or without a stop and resume.
        rng = torch.cuda.get_rng_state(self.device)
        # Warm up on the capture stream (lazy initialisations must not happen while
        # capturing): forward and backward with the hooks, no update; the gradients it
        # makes are dropped, the weights are untouched (the hooks put back what they move).
        self.step.clear_gradients()
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            self.step.forward_backward(static)
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        self.step.clear_gradients()
        graph = torch.cuda.CUDAGraph()
        # Captured between capture_begin and capture_end rather than in torch.cuda.graph(),
        # whose entry waits for the whole device and empties torch's GPU and pinned-memory
        # caches: with folds in threads, every other fold's queue ran dry at each capture.
        # thread_local: folds trained in other threads may go on launching work meanwhile.
        with torch.cuda.stream(self.stream):
            graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
            try:
                self.step(static)
            finally:
                graph.capture_end()
        # The graph keeps its gradient buffers; eager steps must not add to them.
        self.step.clear_gradients()
        forget_block_mask()         # model.attention flex: the captured pass's block mask
        torch.cuda.set_rng_state(rng, self.device)
        log.info("captured a CUDA graph for batches of shape %s (%d so far)", tuple(static["input_ids"].shape),
                 len(self.graphs) + 1)
        return graph, static


def filled_texts(batch: dict[str, torch.Tensor], batch_size: int) -> dict[str, torch.Tensor]:
    """A short batch filled up to batch_size texts with stand-ins, copies of its own texts
    (so every row the model sees is a real one), and `row_weight` 0 for them, 1 for its
    own. A window batch's windows stay as they are: its stand-in texts read the windows of
    the texts they copy."""
    texts = len(batch["labels"])
    index = torch.arange(batch_size) % texts
    per_window = ("input_ids", "attention_mask") if STITCH_KEYS[0] in batch else ()
    filled = {key: value if key in per_window else value[index] for key, value in batch.items()}
    return {**filled, "row_weight": (torch.arange(batch_size) < texts).float()}


def cache_relative_positions(model: nn.Module) -> None:
    """Make DeBERTa's relative positions capturable: built once per length, outside captures.

    DeBERTa's encoder (`get_rel_pos`) builds the relative position of every query and key
    with a host-to-device copy, which a CUDA graph cannot hold. They depend on the
    sequence lengths alone, so each length's tensor is built at its shape's warm-up and
    the capture reuses it. Models without `get_rel_pos` are left as they are.
    """
    for module in model.modules():
        original = getattr(module, "get_rel_pos", None)
        if original is None or getattr(module, "_foldtune_cached_rel_pos", False):
            continue
        cache: dict[tuple, torch.Tensor | None] = {}

        def get_rel_pos(hidden_states, query_states=None, relative_pos=None, _original=original, _cache=cache):
            if relative_pos is not None:
                return _original(hidden_states, query_states, relative_pos)
            key = (hidden_states.shape[-2], None if query_states is None else query_states.shape[-2],
                   hidden_states.device)
            if key not in _cache:
                _cache[key] = _original(hidden_states, query_states, None)
            return _cache[key]

        module.get_rel_pos = get_rel_pos
        module._foldtune_cached_rel_pos = True
