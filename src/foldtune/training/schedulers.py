"""Fold schedulers: how the folds of a run are trained, behind one interface.

`run_folds(prepared, folds)` trains `folds` of a prepared run and returns their results
(a fold is a FoldSeed: with training.seeds, each (fold, seed) model is one to schedule):
one after another (`Sequential`), side by side in threads (`InThreads`) or in
processes (`InProcesses`) of one device, or over the processes of an accelerate launch
(`Launched`). `fold_scheduler` picks the kind from the config and the launch, in one place.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Callable, Protocol, Sequence

import torch

from foldtune.config import Config
from foldtune.report import preload_plotting
from foldtune.run_layout import FoldResult, FoldSeed
from foldtune.runtime.precision import resolve_device
from foldtune.training.distributed import OneProcess, current_launch, fold_group, folds_of_process
from foldtune.training.prepared import PreparedRun
from foldtune.training.stopping import TrainingInterrupted, stop_requested

log = logging.getLogger("foldtune")

THREADS_SWITCH_INTERVAL = 0.0005  # seconds: the GIL's switch interval while folds train in threads

# Told of each fold (a FoldSeed) and its result once it has finished.
AfterFold = Callable[[FoldSeed, FoldResult], None]


class FoldScheduler(Protocol):
    def run_folds(self, prepared: PreparedRun, folds: Sequence[int]) -> dict[int, FoldResult]:
        """Train `folds`; the results this process has (under a launch, the main process has all)."""


class Sequential:
    """One fold after another, in this process.

    after_fold: called with each fold and its result as soon as the fold has finished (a
    search reports the fold's score to its pruner there, and may raise to end the run)."""

    def __init__(self, after_fold: AfterFold | None = None):
        self.after_fold = after_fold

    def run_folds(self, prepared: PreparedRun, folds: Sequence[int]) -> dict[int, FoldResult]:
        progress = prepared.progress(folds)
        results = {}
        for fold in folds:
            results[fold] = prepared.train_fold(fold, progress=progress)
            if self.after_fold is not None:
                self.after_fold(fold, results[fold])
        return results


class _SideBySide:
    """`parallel` folds at a time on this process's device (one fold: trained here, sequentially)."""

    def __init__(self, parallel: int):
        self.parallel = parallel

    def run_folds(self, prepared: PreparedRun, folds: Sequence[int]) -> dict[int, FoldResult]:
        if len(folds) < 2:
            return Sequential().run_folds(prepared, folds)
        return self.side_by_side(prepared, folds)

    def side_by_side(self, prepared: PreparedRun, folds: Sequence[int]) -> dict[int, FoldResult]:
        raise NotImplementedError


class InThreads(_SideBySide):
    """In threads of this process, each on its own CUDA stream (train_folds_in_threads)."""

    def side_by_side(self, prepared: PreparedRun, folds: Sequence[int]) -> dict[int, FoldResult]:
        return train_folds_in_threads(prepared, folds, self.parallel)


class InProcesses(_SideBySide):
    """Each fold in a process of its own (train_folds_in_processes)."""

    def side_by_side(self, prepared: PreparedRun, folds: Sequence[int]) -> dict[int, FoldResult]:
        return train_folds_in_processes(prepared, folds, self.parallel)


class Launched:
    """The folds of a run under accelerate launch; the main process gets every result.

    Data-parallel, every process trains every fold together. Fold-parallel, process r
    trains every world_size-th fold from r, alone and on its own device, seeded as a
    sequential run is (`here`: how it trains them, one by one or side by side in
    threads); the main process then reads the others' folds from their files. Nobody
    waits in a collective call while folds train, so a long fold meets no timeout.
    """

    def __init__(self, launch: OneProcess, fold_parallel: bool, here: FoldScheduler, parallel_folds: int):
        self.launch, self.fold_parallel, self.here, self.parallel_folds = launch, fold_parallel, here, parallel_folds

    def run_folds(self, prepared: PreparedRun, folds: Sequence[int]) -> dict[int, FoldResult]:
        launch = self.launch
        prepared.group = fold_group(launch, self.fold_parallel)
        if not self.fold_parallel:
            return Sequential().run_folds(prepared, folds)
        own_folds = folds_of_process(folds, launch)
        side_by_side = self.parallel_folds > 1 and len(own_folds) > 1
        log.info("process %d of %d: fold(s) %s%s", launch.rank, launch.world_size,
                 _listed(own_folds) if own_folds else "none",
                 f", {min(self.parallel_folds, len(own_folds))} at a time in threads" if side_by_side else "")
        self.here.run_folds(prepared, own_folds)
        if not launch.is_main:
            return {}
        _wait_for_folds(prepared, [fold for fold in folds if fold not in own_folds])
        return {fold: prepared.load_fold_result(fold) for fold in folds}


def fold_scheduler(cfg: Config, launch: OneProcess, fold_parallel: bool) -> FoldScheduler:
    """How this process trains the run's folds: training.parallel_folds at a time (in
    threads or processes, training.parallel_mode), under a launch spread over its processes."""
    t = cfg.training
    here: FoldScheduler = Sequential()
    if t.parallel_folds > 1:
        here = InThreads(t.parallel_folds) if t.parallel_mode == "threads" else InProcesses(t.parallel_folds)
    if launch.world_size > 1:
        return Launched(launch, fold_parallel, here, t.parallel_folds)
    return here


# A fold's process ends with this status when the GPU ran out of memory (fold_worker.py).
OUT_OF_MEMORY_EXIT = 3


class FoldsOutOfMemory(RuntimeError):
    """The GPU ran out of memory in these folds, trained `parallel` at a time in `mode`."""

    def __init__(self, folds: Sequence, parallel: int, mode: str):
        self.folds, self.parallel, self.mode = list(folds), parallel, mode
        super().__init__(f"the GPU ran out of memory in fold(s) {_listed(self.folds)}, {parallel} folds at a time "
                         f"in {mode}")


def train_folds_in_processes(prepared: PreparedRun, folds: Sequence[int], parallel: int) -> dict[int, FoldResult]:
    """Train each fold in its own process, `parallel` at a time, on the same device.

    Each process seeds and trains its fold exactly as the sequential loop does, so the
    results are the same; they only share the device. A stop signal is passed on to
    the running processes, which save their states and exit.
    """
    prepared.save_tokens()
    pending, running, failed = list(folds), {}, []
    forwarded = None
    while pending or running:
        stop = stop_requested()
        if stop is not None:
            pending.clear()
            if forwarded is None:
                for process in running.values():
                    process.send_signal(stop)
                forwarded = stop
        while pending and len(running) < parallel:
            fold = pending.pop(0)
            log.info("fold %s: started in its own process", fold)
            seed = [] if fold.seed is None else [str(fold.seed)]
            running[fold] = subprocess.Popen(
                [sys.executable, "-m", "foldtune.training.fold_worker", str(prepared.run_dir), str(fold.fold), *seed])
        time.sleep(0.2)
        for fold, process in list(running.items()):
            if process.poll() is not None:
                del running[fold]
                if process.returncode != 0 and forwarded is None:
                    failed.append((fold, process.returncode))
    if forwarded is not None:
        raise TrainingInterrupted(forwarded)
    if any(code == OUT_OF_MEMORY_EXIT for _, code in failed):
        raise FoldsOutOfMemory([fold for fold, code in failed if code == OUT_OF_MEMORY_EXIT], parallel, "processes")
    if failed:
        logs = ", ".join(str(f.folder(prepared.run_dir) / "train.log") for f, _ in failed)
        raise RuntimeError(f"fold(s) {_listed([f for f, _ in failed])} failed in their processes; see {logs}")
    return {fold: prepared.load_fold_result(fold) for fold in folds}


def train_folds_in_threads(prepared: PreparedRun, folds: Sequence[int], parallel: int) -> dict[int, FoldResult]:
    """Train `parallel` folds at a time in threads of this process, each on its own CUDA stream.

    With CUDA graphs a thread spends little time in Python, so the folds' kernels run
    side by side on the GPU. The folds are built one at a time (seeded as in a
    sequential run), but their dropout draws from the one generator they share: the
    results equal a sequential run's when the model has no dropout.

    A fold is built once the fold before it is running (its first steps done, its graph
    captured). A build's device work, the first eager step and the capture each hold the
    CUDA launch lock: started all at once, the folds kept the GPU idle until the last of them had
    captured. Staggered, the first fold trains while the next ones are built.
    """
    if prepared.cfg.model.backbone_dropout != 0.0 or prepared.cfg.model.head_dropout > 0:
        log.warning("training.parallel_mode threads: the folds share one random generator, so with dropout "
                    "on their results differ from a sequential run's (parallel_mode processes keeps them equal)")

    # Under a launch, this process's own GPU. A thread starts on the CUDA runtime's default
    # device, whatever the process set: each fold thread sets it first.
    device = current_launch().local_device(resolve_device(prepared.cfg.training.device))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())

    order = list(folds)
    running = {fold: threading.Event() for fold in order}
    progress = prepared.progress(order)         # one for the folds side by side: the run's time left adds theirs

    def on_running(fold: int) -> None:
        running[fold].set()
        if fold == order[-1] and len(order) > 1:
            preload_plotting()      # the report's imports, while the folds train

    def train(fold: int) -> FoldResult:
        threading.current_thread().name = f"fold-{fold}"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        place = order.index(fold)
        try:
            if place > 0:       # submitted before this one: its thread has started (or ended)
                running[order[place - 1]].wait()
            stop = stop_requested()
            if stop is not None:        # stopped before this fold began: it starts afresh on resume
                raise TrainingInterrupted(stop)
            own_stream = (torch.cuda.stream(torch.cuda.Stream(device)) if device.type == "cuda"
                          else contextlib.nullcontext())
            with own_stream:
                return prepared.train_fold(fold, in_threads=True, on_running=lambda: on_running(fold), progress=progress)
        finally:
            running[fold].set()     # failed or stopped before running: the next fold goes on

    results, interrupted, failed = {}, None, []
    # A thread that waited (for the launch lock, the GPU or a file) waits again for the GIL while
    # another one runs Python: up to the switch interval, 5 ms by default, which is most of
    # a graphed MiniLM step. A shorter interval keeps the folds' launches coming.
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(min(switch_interval, THREADS_SWITCH_INTERVAL))
    try:
        with ThreadPoolExecutor(max_workers=parallel) as pool:
            futures = {pool.submit(train, fold): fold for fold in folds}
            for future in as_completed(futures):
                try:
                    results[futures[future]] = future.result()
                except TrainingInterrupted as stop:
                    interrupted = stop
                except Exception as err:  # the others finish; the first failure is raised below
                    log.error("fold %s failed: %s", futures[future], err)
                    failed.append((futures[future], err))
    finally:
        sys.setswitchinterval(switch_interval)
    if interrupted is not None:
        raise interrupted
    short = [fold for fold, err in failed if isinstance(err, torch.OutOfMemoryError)]
    if short:
        raise FoldsOutOfMemory(short, parallel, "threads") from dict(failed)[short[0]]
    if failed:
        raise failed[0][1]
    return results


def _wait_for_folds(prepared: PreparedRun, folds: Sequence[int]) -> None:
    """Until the other processes' folds check out by their files. A process that fails
    ends the launch (the launcher stops the others); a stop signal ends the wait."""
    waiting = list(folds)
    if waiting:
        log.info("waiting for fold(s) %s of the other processes", _listed(waiting))
    while waiting:
        stop = stop_requested()
        if stop is not None:
            raise TrainingInterrupted(stop)
        waiting = [fold for fold in waiting if prepared.unfinished_reason(fold) is not None]
        if waiting:
            time.sleep(1.0)


def _listed(folds: Sequence) -> str:
    """'[0, 2]', or '[0 seed 42, 0 seed 7]' in a run with training.seeds."""
    return f"[{', '.join(map(str, folds))}]"
