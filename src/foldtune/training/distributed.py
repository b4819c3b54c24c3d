"""Several processes, one run: what `accelerate launch` starts, and how they share the work.

    accelerate launch --multi_gpu --num_processes N train.py ...                  each fold data-parallel
    accelerate launch --multi_gpu --num_processes N train.py --fold-parallel ...  the folds spread over them

`current_launch()` is the process's view of the launch: `ONE_PROCESS` (every method a
no-op, accelerate never imported) when train.py runs alone, else an `AcceleratedLaunch`
over accelerate's `PartialState` (process group, rank, this process's device).

Data-parallel: every process draws the same global batches (same generator, same
seed), takes its contiguous share of each, and DistributedDataParallel averages the
gradients. Each process weighs its loss by its share of the batch, so a short last
batch, split unevenly, still gives the gradient of the whole batch's mean loss: a
loss that is a mean over rows (mse, smooth_l1) trains as a single process at the same
global batch does. Validation rows are split the same way and gathered back in order.
Only the main process writes files; a stop signal seen by any process stops all of them
at the same step (one small all-reduce a step).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import os
from typing import Any, Callable, Sequence, TypeVar

import numpy as np
import torch

from foldtune.config import Config, ConfigError
from foldtune.data.collate import round_up
from foldtune.data.windows import text_rows
from foldtune.training.state import restore_rng

T = TypeVar("T")

# Variables a launcher sets for every process it starts (torchrun, mpirun), as accelerate reads them.
_WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
# The longest a process waits in a collective call: the others wait there while the main
# process tokenizes or writes, never while folds train (fold-parallel waits by files).
_WAIT_LIMIT = dt.timedelta(hours=2)


def launched_world_size() -> int:
    """How many processes the launcher started (1 when train.py runs alone)."""
    for name in _WORLD_SIZE_VARIABLES:
        if os.environ.get(name, "").strip().isdigit():
            return int(os.environ[name])
    return 1


class OneProcess:
    """train.py on its own: rank 0 of 1, and every exchange is the identity."""

    rank = 0
    world_size = 1
    is_main = True

    def run_on_main(self, fn: Callable[[], T]) -> T:
        return fn()

    def gather(self, value: T) -> list[T]:
        return [value]

    def local_device(self, device: torch.device) -> torch.device:
        return device

    def close(self) -> None:
        pass

    # --- one fold, data-parallel (the trainer's side) ---------------------------------

    def describe(self) -> str:
        return ""

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def sync_gradients(self, model: torch.nn.Module, sync: bool):
        return contextlib.nullcontext()

    def shard(self, batch: dict, pad_multiple: int) -> tuple[dict, float]:
        """(this process's rows of the global batch, their share of it)."""
        return batch, 1.0

    def rows(self, n: int) -> np.ndarray | None:
        """This process's validation rows; None: all of them."""
        return None

    def gather_rows(self, rows: np.ndarray | None, preds: np.ndarray, n: int) -> np.ndarray:
        return preds

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def agree_on_stop(self, signum: int | None) -> int | None:
        return signum

    def reseed_dropout(self, seed: int) -> None:
        pass

    def restore_rng(self, state: dict, seed: int) -> None:
        restore_rng(state["rng"])


ONE_PROCESS = OneProcess()


class AcceleratedLaunch(OneProcess):
    """One of the processes of `accelerate launch`, over accelerate's PartialState."""

    def __init__(self, cpu: bool):
        from accelerate import PartialState

        # cpu: gloo over the CPUs (no GPU, or ACCELERATE_USE_CPU=1); otherwise NCCL and
        # one GPU per process.
        self.state = PartialState(cpu=cpu, timeout=_WAIT_LIMIT)
        if self.state.num_processes != launched_world_size():
            raise ConfigError(f"the launcher started {launched_world_size()} processes but accelerate set up "
                              f"{self.state.num_processes}; launch with accelerate launch --multi_gpu "
                              "--num_processes N")
        self.rank = self.state.process_index
        self.world_size = self.state.num_processes
        self.is_main = self.state.is_main_process

    def run_on_main(self, fn: Callable[[], T]) -> T:
        """fn() on the main process, its result (or its exception) handed to every process."""
        from accelerate.utils import broadcast_object_list

        outcome: list[Any] = [None]
        if self.is_main:
            try:
                outcome[0] = (True, fn())
            except Exception as err:  # raised on every process below, not only here
                outcome[0] = (False, err)
        broadcast_object_list(outcome)
        ok, value = outcome[0]
        if not ok:
            raise value
        return value

    def gather(self, value: T) -> list[T]:
        from accelerate.utils import gather_object

        return gather_object([value])

    def local_device(self, device: torch.device) -> torch.device:
        # every process on its own GPU (the one accelerate set); a CPU is shared
        return self.state.device if device.type == "cuda" else device

    def close(self) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


class DataParallel:
    """The trainer's view of a data-parallel fold: the same methods as OneProcess's."""

    def __init__(self, launch: AcceleratedLaunch):
        self.launch = launch
        self.rank, self.world_size, self.is_main = launch.rank, launch.world_size, launch.is_main

    def describe(self) -> str:
        return f", data-parallel over {self.world_size} processes"

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        device = next(model.parameters()).device
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                         else None)

    def sync_gradients(self, model: torch.nn.Module, sync: bool):
        """Within an accumulation group, gradients add up locally; the last micro-batch
        averages them over the processes."""
        return contextlib.nullcontext() if sync else model.no_sync()

    def shard(self, batch: dict, pad_multiple: int) -> tuple[dict, float]:
        n = len(batch["labels"])
        start, stop = n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size
        if stop == start:
            # A last batch with fewer rows than processes: this one still runs a step
            # (the gradient all-reduce needs every process), on a row weighted zero.
            return text_rows(batch, 0, 1), 0.0
        local = text_rows(batch, start, stop)
        # Drop the padding columns that none of this process's rows needs.
        width = int(local["attention_mask"].sum(dim=1).max())
        width = min(round_up(width, pad_multiple), local["input_ids"].shape[1])
        local["input_ids"], local["attention_mask"] = local["input_ids"][:, :width], local["attention_mask"][:, :width]
        return local, (stop - start) / n

    def rows(self, n: int) -> np.ndarray:
        return np.arange(n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size)

    def gather_rows(self, rows: np.ndarray, preds: np.ndarray, n: int) -> np.ndarray:
        """Every process's predictions, each row once and in order (no padded repeats)."""
        out = None
        for their_rows, their_preds in self.launch.gather((rows, preds)):
            if out is None:
                out = np.empty((n, their_preds.shape[1]), dtype=np.float32)
            out[their_rows] = their_preds
        return out

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        total = value.detach().clone()
        torch.distributed.all_reduce(total)
        return total

    def agree_on_stop(self, signum: int | None) -> int | None:
        """A signal seen by any process stops all of them at the same step."""
        flag = torch.tensor([signum or 0], device=self.launch.state.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item()) or None

    def reseed_dropout(self, seed: int) -> None:
        """Process 0 keeps a single process's dropout stream; the others draw their own
        masks (the model is already built, the same everywhere)."""
        if self.rank:
            torch.manual_seed(seed + 104729 * self.rank)

    def restore_rng(self, state: dict, seed: int) -> None:
        """Each process continues its own generators; a state saved by another number of
        processes gives process 0's to all, and fresh dropout streams to the others."""
        by_rank = state.get("rng_by_rank")
        if by_rank is not None and len(by_rank) == self.world_size:
            restore_rng(by_rank[self.rank])
        else:
            restore_rng(state["rng"])
            self.reseed_dropout(seed + state["step"])

    def gather(self, value: T) -> list[T]:
        return self.launch.gather(value)


# The process's launch: it joins one process group, once.
_LAUNCH: OneProcess | None = None


def _on_cpu() -> bool:
    return not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")


def current_launch() -> OneProcess:
    """This process's launch, set up on the first call: gloo on CPUs, NCCL on GPUs."""
    global _LAUNCH
    if _LAUNCH is None:
        _LAUNCH = ONE_PROCESS if launched_world_size() <= 1 else AcceleratedLaunch(cpu=_on_cpu())
    return _LAUNCH


def close_launch() -> None:
    """Leave the process group, if this process joined one."""
    if _LAUNCH is not None:
        _LAUNCH.close()


def fold_group(launch: OneProcess, fold_parallel: bool) -> OneProcess | DataParallel:
    """The processes that train one fold together: all of them, or (fold-parallel) one."""
    if launch.world_size > 1 and not fold_parallel:
        return DataParallel(launch)
    return ONE_PROCESS


def folds_of_process(folds: Sequence[int], launch: OneProcess) -> list[int]:
    """A fold-parallel process's folds: every world_size-th, starting at its rank."""
    return list(folds)[launch.rank::launch.world_size]


# How a launch with no mode chosen (neither --fold-parallel nor --data-parallel) shares
# its folds, from what each mode paid on two H200s (docs/benchmarks.md, "Several GPUs"):
# a backbone of fewer parameters than this takes steps too short for the processes'
# gradient exchange to pay (MiniLM, 22.7M: 5 folds data-parallel on two GPUs took 1.35x
# the time of one GPU).
DATA_PARALLEL_MIN_PARAMETERS = 100_000_000
# A larger one (DeBERTa-v3-base, 184M, the recipe with transformers' attention) trained
# data-parallel at 1.30x one GPU's speed on two (0.65 of 2x); spreading its 5 folds gave
# 1.59x. Fold-parallel is chosen wherever whole folds spread at least this well.
DATA_PARALLEL_EFFICIENCY = 0.65


def choose_fold_parallel(world_size: int, n_folds: int, n_parameters: int) -> tuple[bool, str]:
    """(whether to spread the folds over the processes, why) for a launch with no mode given.

    Fold-parallel, the busiest process trains ceil(F / N) of the F folds, so the run is at
    most F / ceil(F / N) times as fast as one process (5 folds on 2: 1.67x). Data-parallel
    divides every step, at the cost of a gradient exchange per step.
    """
    busiest = math.ceil(n_folds / world_size)
    spread = n_folds / busiest
    size = f"{n_parameters / 1e6:.1f}M parameters"
    if n_parameters < DATA_PARALLEL_MIN_PARAMETERS:
        return True, (f"the backbone has {size}, too few for data-parallel to pay: the folds are spread over the "
                      f"{world_size} processes")
    data_parallel = DATA_PARALLEL_EFFICIENCY * world_size
    if spread >= data_parallel:
        return True, (f"the backbone has {size}; spread over the {world_size} processes, the {n_folds} folds give up "
                      f"to {spread:.2f}x one process ({busiest} on the busiest), data-parallel about "
                      f"{data_parallel:.2f}x")
    return False, (f"the backbone has {size}; spread over the {world_size} processes, the {n_folds} fold(s) would "
                   f"give at most {spread:.2f}x one process ({busiest} on the busiest), data-parallel about "
                   f"{data_parallel:.2f}x: each fold is trained data-parallel")


def check_launch(cfg: Config, world_size: int, fold_parallel: bool) -> None:
    """What a launch of world_size processes cannot train, refused before anything is loaded."""
    if world_size <= 1:
        return
    t = cfg.training
    if cfg.model.type != "transformer":
        raise ConfigError(f"model.type: {cfg.model.type} has no GPU training to spread over {world_size} processes: "
                          "run it as plain python train.py")
    if cfg.distill.teacher is not None:
        raise ConfigError("a distillation run trains one student in one process: run it as plain python train.py")
    if t.parallel_folds > 1 and not fold_parallel:
        raise ConfigError(f"training.parallel_folds: {t.parallel_folds} trains folds side by side on one device, but "
                          f"this launch trains each fold data-parallel over its {world_size} processes: set "
                          "training.parallel_folds: 1, or use --fold-parallel (each process then trains its folds "
                          "side by side in threads)")
    if t.parallel_folds > 1 and t.parallel_mode != "threads":
        raise ConfigError(f"training.parallel_folds: {t.parallel_folds} with training.parallel_mode: "
                          f"{t.parallel_mode} would start processes of their own inside each of the {world_size} "
                          "launched ones: under --fold-parallel set training.parallel_mode: threads (each process "
                          "trains its folds side by side in threads, on its own GPU)")
    if t.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"training.device: {t.device} would put every one of the {world_size} processes on the "
                          "same device; use auto (each process gets its own GPU)")
    if t.device == "cpu" and not _on_cpu():
        raise ConfigError("training.device: cpu under a launch on GPUs: use auto (each process gets its own GPU), "
                          "or set ACCELERATE_USE_CPU=1 to train on the CPUs")
    if fold_parallel:
        return
    if cfg.pruning.heads.enabled:
        raise ConfigError("pruning.heads.enabled: true cannot train data-parallel (the gates' log_alpha has no "
                          "gradient before pruning.heads.start_epoch, which DistributedDataParallel refuses): "
                          "use --fold-parallel, or set pruning.heads.enabled=false", "pruning.heads.enabled")
    if t.cuda_graphs:
        raise ConfigError("training.cuda_graphs: true cannot train data-parallel (the gradient all-reduce is not "
                          "in the captured graph): set training.cuda_graphs: false, or use --fold-parallel")
    if t.batch_size % world_size:
        below = t.batch_size - t.batch_size % world_size
        fits = [b for b in (below, below + world_size) if b > 0]
        raise ConfigError(f"training.batch_size: {t.batch_size} is the global batch of a data-parallel run over "
                          f"{world_size} processes, so it must be a multiple of {world_size} (each process takes "
                          f"batch_size / {world_size} rows); set it to {' or '.join(map(str, fits))}")
