"""Every fold of a run: check the input, split, tokenize once, train each fold, score the OOF.

    runs/<name>/
      config.yaml   the resolved config          folds.csv   id -> fold
      run.json      versions, device, command    oof.csv     id, fold, predictions
      scores.json   per fold and OOF, per target    report.md   tables, plots/ (foldtune.report)
      fold_<k>/     best/ (checkpoint), oof.csv, metrics.csv, train.log
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import platform
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
import transformers
from safetensors import SafetensorError, safe_open

from foldtune import __version__
from foldtune.checkpoint import WEIGHTS_FILE, CheckpointError, changed_files, read_meta
from foldtune.config import (Config, ConfigError, ConfigOrigin, config_diff, load_config, path_problem,
                             save_config)
from foldtune.data.dataset import TextDataset, encode_texts
from foldtune.data.folds import assign_folds
from foldtune.data.demo import write_demo_files
from foldtune.data.validate import check_data_files, load_test, load_train
from foldtune.files import atomic_path, atomic_write_csv, atomic_write_json, file_sha256, remove_orphans
from foldtune.losses import LOSSES
from foldtune.metrics import score_report
from foldtune.models.deberta_attention import fused_on
from foldtune.models.pooling import POOLINGS
from foldtune.models.regressor import check_backbone, load_tokenizer
from foldtune.optim.factory import check_optimizer
from foldtune.report import preload_plotting, write_report_or_warn
from foldtune.run_files import RESULT_FILE, read_run_csv
from foldtune.run_lock import RunLock
from foldtune.training.distributed import (ONE_PROCESS, DataParallel, OneProcess, check_launch, current_launch,
                                           fold_group, folds_of_process, launched_world_size)
from foldtune.training.precision import resolve_device, resolve_precision
from foldtune.training.progress import RunProgress, progress_settings
from foldtune.training.state import load_state, remove_states, state_files, wait_for_removals
from foldtune.training.stopping import TrainingInterrupted, stop_requested
from foldtune.training.step import refuse_ungraphable
from foldtune.training.trainer import FoldData, FoldResult, FoldTrainer, steps_per_epoch
from foldtune.training.turn import CUDA_TURN

log = logging.getLogger("foldtune")

TOKENS_FILE = "tokens.npz"       # token ids of every row, for fold processes
THREADS_SWITCH_INTERVAL = 0.0005  # seconds: the GIL's switch interval while folds train in threads
BUILDING = threading.Lock()      # one fold is built at a time: seeding sets the global generators


def check_names(cfg: Config) -> None:
    """Every name the config picks from a registry exists (fails before any loading)."""
    refuse_ungraphable(cfg)     # the techniques that cannot be captured, from their hooks' declarations
    POOLINGS.get(cfg.model.pooling)
    LOSSES.get(cfg.training.loss)
    device = resolve_device(cfg.training.device)
    if cfg.model.attention == "flex" and device.type != "cuda":
        raise ConfigError(f"model.attention: flex trains on CUDA only (FlexAttention has no backward pass on "
                          f"{device.type}): set model.attention: eager")
    if cfg.model.attention == "flex" and not fused_on(device):
        raise ConfigError(f"model.attention: flex compiles a Triton kernel, which needs a GPU of compute "
                          f"capability 7.0 or newer; {torch.cuda.get_device_name(device)} has "
                          f"{torch.cuda.get_device_capability(device)}: set model.attention=eager "
                          f"model.gradient_checkpointing=true")
    check_optimizer(cfg.training, device)
    precision = resolve_precision(cfg.training.precision, device)
    if cfg.training.cuda_graphs and device.type != "cuda":
        raise ConfigError(f"training.cuda_graphs: true needs a CUDA device; this run is on {device.type}: "
                          "set training.cuda_graphs: false")
    if cfg.training.cuda_graphs and precision.name == "fp16":
        raise ConfigError("training.cuda_graphs: true cannot train in fp16 (its grad scaler checks on the host): "
                          "this GPU has no bf16, so set training.precision: fp32 or training.cuda_graphs: false")
    if cfg.training.target_weights is not None and len(cfg.training.target_weights) != len(cfg.data.target_columns):
        raise ConfigError(f"training.target_weights has {len(cfg.training.target_weights)} values for "
                          f"{len(cfg.data.target_columns)} targets ({', '.join(cfg.data.target_columns)})")


def ensure_demo_files(cfg: Config) -> None:
    """Write the built-in demo essays to the demo's own files that are absent (never to a
    path the user chose, never over a file: data/demo.py)."""
    for path in write_demo_files(cfg.data):
        log.info("wrote the demo data set: %s", path)


def new_run_dir(cfg: Config, config_name: str) -> RunLock:
    """Create the new run's folder and lock it for this process (run_lock.py); the lock's
    `folder` is the run folder. Call on the main process only."""
    name = cfg.output.name or f"{config_name}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.output.dir) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    # Locked before the check: of two processes starting one name, one gets the folder and
    # the other an error naming it.
    lock = RunLock(run_dir, "training").acquire()
    if (run_dir / "config.yaml").exists():
        lock.release()
        raise ConfigError(f"run folder {run_dir} already holds a run; choose another output.name (or --name)")
    remove_orphans(run_dir)
    return lock


def parse_folds_arg(text: str | None, n_splits: int) -> list[int]:
    """'0,2' -> [0, 2]; None -> every fold."""
    if text is None:
        return list(range(n_splits))
    try:
        folds = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ConfigError(f"--folds '{text}': expected fold numbers separated by commas, e.g. 0,2") from None
    bad = [f for f in folds if not 0 <= f < n_splits]
    if bad or not folds:
        raise ConfigError(f"--folds '{text}': folds must be in 0..{n_splits - 1} (folds.n_splits={n_splits})")
    return folds


def make_fold_column(frame: pd.DataFrame, cfg: Config) -> np.ndarray:
    if cfg.folds.column is not None:
        return frame["fold"].to_numpy(dtype=np.int64)
    targets = frame[list(cfg.data.target_columns)].to_numpy()
    return assign_folds(targets, cfg.folds.n_splits, cfg.folds.seed, cfg.folds.n_bins)


def format_table(fold_reports: dict[int, dict], oof_report: dict, baseline: float, targets: Sequence[str]) -> str:
    header = ["fold"] + list(targets) + ["MCRMSE"]
    rows = [[str(fold)] + [f"{r['per_target'][t]:.4f}" for t in targets] + [f"{r['mcrmse']:.4f}"]
            for fold, r in sorted(fold_reports.items())]
    rows.append(["OOF"] + [f"{oof_report['per_target'][t]:.4f}" for t in targets] + [f"{oof_report['mcrmse']:.4f}"])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) for c, w in zip(cells, widths))

    body = [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]
    body.append(f"(predicting the training folds' mean scores: OOF MCRMSE {baseline:.4f})")
    return "\n".join(body)


def load_inputs(cfg: Config, fold_parallel: bool = False, origin: ConfigOrigin | None = None) -> pd.DataFrame:
    """Check the config's names, its backbone and both data files; return the training rows.

    Everything a user can get wrong in the inputs fails here, before a run folder is
    made or a model is loaded. Under accelerate launch every process checks the same
    inputs, so all of them fail together. origin: where the config came from, for the
    error of a missing data file.
    """
    check_names(cfg)
    if cfg.model.type == "transformer":
        check_backbone(cfg.model.name)
    check_launch(cfg, launched_world_size(), fold_parallel)
    progress_settings()         # a FOLDTUNE_PROGRESS that means nothing fails now, not at the first fold
    check_data_files(cfg.data, origin)
    if cfg.data.demo:
        current_launch().run_on_main(lambda: ensure_demo_files(cfg))
    frame = load_train(cfg.data.train_file, cfg.data, cfg.folds)
    if cfg.data.test_file is not None:
        load_test(cfg.data.test_file, cfg.data)  # a bad test file fails now, not after training
    return frame


@dataclass
class PreparedRun:
    """What every fold of a run shares: the rows, their folds and their token ids."""

    cfg: Config
    run_dir: Path
    frame: pd.DataFrame
    fold_of: np.ndarray
    input_ids: list[list[int]]
    tokenizer: object
    # The processes that train each fold together: this one alone, or all of a
    # data-parallel launch (whose main process writes the fold's files).
    group: OneProcess | DataParallel = field(default=ONE_PROCESS)

    @property
    def targets(self) -> np.ndarray:
        return self.frame[list(self.cfg.data.target_columns)].to_numpy(dtype=np.float32)

    def fold_data(self, fold: int) -> FoldData:
        targets = self.targets
        train_idx = np.flatnonzero(self.fold_of != fold)
        valid_idx = np.flatnonzero(self.fold_of == fold)
        ids = self.frame[self.cfg.data.id_column].tolist()
        return FoldData(
            fold=fold,
            train=TextDataset([self.input_ids[i] for i in train_idx], targets[train_idx]),
            valid=TextDataset([self.input_ids[i] for i in valid_idx], targets[valid_idx]),
            valid_ids=[ids[i] for i in valid_idx],
            valid_index=valid_idx,
            target_columns=self.cfg.data.target_columns,
            target_range=(float(targets.min()), float(targets.max())),
        )

    def progress(self, folds: Sequence[int]) -> RunProgress:
        """How this process shows the training of `folds`, and each one's steps for the run's
        time left. Bars only where one process draws on the terminal: under a fold-parallel
        launch each process writes lines."""
        tcfg = self.cfg.training
        steps = {fold: steps_per_epoch(int(np.sum(self.fold_of != fold)), tcfg) * tcfg.epochs for fold in folds}
        one_display = current_launch().world_size == 1 or self.group.world_size > 1
        return RunProgress.from_environment(bars=one_display, steps_of_fold=steps)

    def train_fold(self, fold: int, in_threads: bool = False, on_running: Callable[[], None] | None = None,
                   progress: RunProgress | None = None) -> FoldResult:
        """Train the fold, continuing from its newest training state if it has one.

        in_threads: other folds train beside this one, in threads of this process. At the
        end the GPU memory torch has cached is then not handed back to the driver (for the
        processes beside this one: it waits for the whole GPU, where the others train), and
        the fold's training states are removed in the background. on_running: called once
        the fold's first steps have run (see FoldTrainer.train). progress: how the run shows
        its folds (default: as the environment asks, this fold alone).
        """
        fold_dir = self.run_dir / f"fold_{fold}"
        states = state_files(fold_dir)
        state = load_state(states[-1]) if states else None
        if state is not None:
            log.info("fold %d: continuing from %s", fold, states[-1])
        with BUILDING:          # seeding and building a model use the global generators
            trainer = FoldTrainer(self.cfg, self.fold_data(fold), self.tokenizer, fold_dir, self.group,
                                  progress).setup()
        result = trainer.train(state, on_running)
        if not self.group.is_main:
            return result
        atomic_write_json(fold_dir / RESULT_FILE, {
            "fold": fold, "mcrmse": result.score, "per_target": result.per_target,
            "best_step": result.best_step, "seconds": result.seconds,
        })
        remove_states(fold_dir, wait=not in_threads)    # finished: the best checkpoint is what stays
        if not in_threads and torch.cuda.is_available():
            with CUDA_TURN:
                torch.cuda.empty_cache()
        return result

    def unfinished_reason(self, fold: int) -> str | None:
        """None if the fold's files show a finished fold; else what is missing or wrong."""
        fold_dir = self.run_dir / f"fold_{fold}"
        try:
            summary = json.loads((fold_dir / RESULT_FILE).read_text(encoding="utf-8"))
            float(summary["mcrmse"]), int(summary["best_step"])
        except FileNotFoundError:
            return f"no {RESULT_FILE}"
        except (ValueError, KeyError, TypeError) as err:
            return f"{RESULT_FILE} unreadable ({err})"
        try:
            oof = read_run_csv(fold_dir / "oof.csv", self.cfg.data.id_column)
        except (FileNotFoundError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
            return f"oof.csv missing or unreadable ({err})"
        expected = self.frame[self.cfg.data.id_column].to_numpy()[self.fold_of == fold].tolist()
        id_column, targets = self.cfg.data.id_column, list(self.cfg.data.target_columns)
        if id_column not in oof or oof[id_column].tolist() != expected:
            return "oof.csv does not hold exactly the fold's rows"
        if not set(targets) <= set(oof.columns) or not np.isfinite(oof[targets].to_numpy(dtype=float)).all():
            return "oof.csv lacks finite predictions for every target"
        try:
            meta = read_meta(fold_dir / "best")
            with safe_open(str(fold_dir / "best" / WEIGHTS_FILE), framework="pt") as weights:
                if not list(weights.keys()):
                    return "best/model.safetensors holds no tensors"
            changed = changed_files(fold_dir / "best", meta)
        except (CheckpointError, OSError, SafetensorError) as err:
            return f"best checkpoint unreadable ({err})"
        if changed:
            return f"{changed[0]} does not match the SHA-256 recorded when it was written"
        return None

    def load_fold_result(self, fold: int) -> FoldResult:
        """A fold trained by another process, read back from its folder."""
        fold_dir = self.run_dir / f"fold_{fold}"
        summary = json.loads((fold_dir / RESULT_FILE).read_text(encoding="utf-8"))
        oof = read_run_csv(fold_dir / "oof.csv", self.cfg.data.id_column)
        oof = oof[list(self.cfg.data.target_columns)].to_numpy(dtype=np.float32)
        return FoldResult(fold, summary["mcrmse"], summary["per_target"], summary["best_step"], oof,
                          np.flatnonzero(self.fold_of == fold), fold_dir / "best", summary["seconds"])

    @classmethod
    def load(cls, run_dir: str | Path) -> "PreparedRun":
        """Rebuild a run's shared inputs from its folder (config, folds, token ids)."""
        run_dir = Path(run_dir)
        cfg = load_config(run_dir / "config.yaml")
        frame = load_train(cfg.data.train_file, cfg.data, cfg.folds)
        fold_of = read_run_csv(run_dir / "folds.csv", cfg.data.id_column)["fold"].to_numpy(dtype=np.int64)
        with np.load(run_dir / TOKENS_FILE) as saved:
            flat, offsets = saved["ids"], saved["offsets"]
        input_ids = [flat[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]
        return cls(cfg, run_dir, frame, fold_of, input_ids, load_tokenizer(cfg.model.name))

    def save_tokens(self) -> None:
        """Token ids for fold processes: the texts are tokenized once per run."""
        offsets = np.cumsum([0] + [len(ids) for ids in self.input_ids])
        with atomic_path(self.run_dir / TOKENS_FILE) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, ids=np.concatenate([np.asarray(ids, dtype=np.int64) for ids in self.input_ids]),
                         offsets=offsets)


def train_folds_in_processes(prep: PreparedRun, folds: Sequence[int], parallel: int) -> dict[int, FoldResult]:
    """Train each fold in its own process, `parallel` at a time, on the same device.

    Each process seeds and trains its fold exactly as the sequential loop does, so the
    results are the same; they only share the device. A stop signal is passed on to
    the running processes, which save their states and exit.
    """
    prep.save_tokens()
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
            log.info("fold %d: started in its own process", fold)
            running[fold] = subprocess.Popen(
                [sys.executable, "-m", "foldtune.training.fold_worker", str(prep.run_dir), str(fold)])
        time.sleep(0.2)
        for fold, process in list(running.items()):
            if process.poll() is not None:
                del running[fold]
                if process.returncode != 0 and forwarded is None:
                    failed.append(fold)
    if forwarded is not None:
        raise TrainingInterrupted(forwarded)
    if failed:
        logs = ", ".join(str(prep.run_dir / f"fold_{f}" / "train.log") for f in failed)
        raise RuntimeError(f"fold(s) {failed} failed in their processes; see {logs}")
    return {fold: prep.load_fold_result(fold) for fold in folds}


def train_folds_in_threads(prep: PreparedRun, folds: Sequence[int], parallel: int) -> dict[int, FoldResult]:
    """Train `parallel` folds at a time in threads of this process, each on its own CUDA stream.

    With CUDA graphs a thread spends little time in Python, so the folds' kernels run
    side by side on the GPU. The folds are built one at a time (seeded as in a
    sequential run), but their dropout draws from the one generator they share: the
    results equal a sequential run's when the model has no dropout.

    A fold is built once the fold before it is running (its first steps done, its graph
    captured). A build's device work, the first eager step and the capture each hold the
    CUDA turn: started all at once, the folds kept the GPU idle until the last of them had
    captured. Staggered, the first fold trains while the next ones are built.
    """
    if prep.cfg.model.backbone_dropout != 0.0 or prep.cfg.model.head_dropout > 0:
        log.warning("training.parallel_mode threads: the folds share one random generator, so with dropout "
                    "on their results differ from a sequential run's (parallel_mode processes keeps them equal)")

    # Under a launch, this process's own GPU. A thread starts on the CUDA runtime's default
    # device, whatever the process set: each fold thread sets it first.
    device = current_launch().local_device(resolve_device(prep.cfg.training.device))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())

    order = list(folds)
    running = {fold: threading.Event() for fold in order}
    progress = prep.progress(order)         # one for the folds side by side: the run's time left adds theirs

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
                return prep.train_fold(fold, in_threads=True, on_running=lambda: on_running(fold), progress=progress)
        finally:
            running[fold].set()     # failed or stopped before running: the next fold goes on

    results, interrupted, failed = {}, None, []
    # A thread that waited (for its turn, the GPU or a file) waits again for the GIL while
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
                    log.error("fold %d failed: %s", futures[future], err)
                    failed.append(err)
    finally:
        sys.setswitchinterval(switch_interval)
    if interrupted is not None:
        raise interrupted
    if failed:
        raise failed[0]
    return results


def start_run(cfg: Config, run_dir: Path, frame: pd.DataFrame, folds_to_run: Sequence[int],
              fold_of: np.ndarray | None = None, launch: dict | None = None) -> np.ndarray:
    """Write what a new run records before training: config, provenance (and how it was
    launched, when several processes train it), folds (the config's, unless given)."""
    save_config(cfg, run_dir / "config.yaml")
    atomic_write_json(run_dir / "run.json", {
        **(launch or {}),
        "started": dt.datetime.now().isoformat(timespec="seconds"),
        "command": sys.argv,
        "folds": list(folds_to_run),
        "train_file_sha256": file_sha256(cfg.data.train_file),
        "foldtune": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
    })
    fold_of = make_fold_column(frame, cfg) if fold_of is None else fold_of
    atomic_write_csv(run_dir / "folds.csv", pd.DataFrame({cfg.data.id_column: frame[cfg.data.id_column],
                                                          "fold": fold_of}))
    return fold_of


def saved_folds(cfg: Config, run_dir: Path, frame: pd.DataFrame) -> np.ndarray:
    """The fold of each row as the run recorded it; the rows must be the same."""
    saved = read_run_csv(run_dir / "folds.csv", cfg.data.id_column)
    if saved[cfg.data.id_column].tolist() != frame[cfg.data.id_column].tolist():
        raise ConfigError(f"{cfg.data.train_file} does not hold the rows of {run_dir / 'folds.csv'}: "
                          "the run cannot continue on other data")
    return saved["fold"].to_numpy(dtype=np.int64)


def run_cross_validation(cfg: Config, run_dir: Path, folds_to_run: Sequence[int] | None = None,
                         frame: pd.DataFrame | None = None, resume: bool = False,
                         fold_parallel: bool = False) -> dict | None:
    """Train the chosen folds of `cfg` into `run_dir`; return the scores written to scores.json.

    With resume, the run folder's folds are reused, finished folds (checked by their
    files) are read back instead of trained, and an interrupted fold continues from its
    newest training state. Under accelerate launch each fold is trained data-parallel by
    every process, or (fold_parallel) each process trains its share of the folds; the
    main process scores the run and the others return None.
    """
    if frame is None:
        frame = load_inputs(cfg, fold_parallel)
    run_dir = Path(run_dir)
    folds_to_run = list(range(cfg.folds.n_splits)) if folds_to_run is None else list(folds_to_run)
    launch = current_launch()
    launch_info = ({"processes": launch.world_size, "process_mode": "fold_parallel" if fold_parallel
                    else "data_parallel"} if launch.world_size > 1 else None)
    fold_of = launch.run_on_main(lambda: saved_folds(cfg, run_dir, frame) if resume
                                 else start_run(cfg, run_dir, frame, folds_to_run, launch=launch_info))
    if launch.world_size > 1:
        results = _train_launched(cfg, run_dir, frame, fold_of, folds_to_run, resume, fold_parallel, launch)
        if not launch.is_main:
            wait_for_removals()       # its folds' training states, when it trained them in threads
            return None
    elif cfg.model.type == "tfidf_ridge":
        # seconds per fold on a CPU: every fold is fitted again, resumed or not
        from foldtune.models.tfidf_ridge import train_tfidf_folds

        results = train_tfidf_folds(cfg, run_dir, frame, fold_of, folds_to_run)
    else:
        results = _train_transformer_folds(cfg, run_dir, frame, fold_of, folds_to_run, resume)
    targets = frame[list(cfg.data.target_columns)].to_numpy(dtype=np.float32)
    scores = summarize(cfg, run_dir, frame, fold_of, targets, dict(sorted(results.items())))
    write_report_or_warn(run_dir)     # report.md and plots; a failure there only warns
    wait_for_removals()               # finished folds' training states, removed meanwhile
    return scores


def _tokenized_run(cfg: Config, run_dir: Path, frame: pd.DataFrame, fold_of: np.ndarray) -> PreparedRun:
    tokenizer = load_tokenizer(cfg.model.name)
    encoded = encode_texts(tokenizer, frame[cfg.data.text_column].tolist(), cfg.data.max_len, cfg.data.truncation,
                           cfg.data.head_fraction)
    return PreparedRun(cfg, run_dir, frame, fold_of, encoded.input_ids, tokenizer)


def _finished_folds(prep: PreparedRun, folds_to_run: Sequence[int],
                    resume: bool) -> tuple[dict[int, FoldResult], list[int]]:
    """(the folds finished before, read back; the folds to train)."""
    results: dict[int, FoldResult] = {}
    to_train = []
    for fold in folds_to_run:
        reason = prep.unfinished_reason(fold) if resume else "new run"
        if reason is None:
            log.info("fold %d: finished before, its files check out: skipped", fold)
            results[fold] = prep.load_fold_result(fold)
        else:
            if resume:
                log.info("fold %d: to train (%s)", fold, reason)
            # a fold is finished when its result is written (inference relies on it): none is left from before
            (prep.run_dir / f"fold_{fold}" / RESULT_FILE).unlink(missing_ok=True)
            to_train.append(fold)
    return results, to_train


def _train_transformer_folds(cfg: Config, run_dir: Path, frame: pd.DataFrame, fold_of: np.ndarray,
                             folds_to_run: Sequence[int], resume: bool) -> dict[int, FoldResult]:
    """Tokenize once, then train (or, resuming, read back) each fold."""
    prep = _tokenized_run(cfg, run_dir, frame, fold_of)
    results, to_train = _finished_folds(prep, folds_to_run, resume)
    results.update(_train_in_this_process(prep, to_train))
    return results


def _train_in_this_process(prep: PreparedRun, folds: Sequence[int]) -> dict[int, FoldResult]:
    """Train `folds` here: one after another, or training.parallel_folds at a time."""
    parallel = prep.cfg.training.parallel_folds
    if parallel > 1 and len(folds) > 1:
        side_by_side = train_folds_in_threads if prep.cfg.training.parallel_mode == "threads" else \
            train_folds_in_processes
        return side_by_side(prep, folds, parallel)
    progress = prep.progress(folds)
    return {fold: prep.train_fold(fold, progress=progress) for fold in folds}


def _train_launched(cfg: Config, run_dir: Path, frame: pd.DataFrame, fold_of: np.ndarray,
                    folds_to_run: Sequence[int], resume: bool, fold_parallel: bool,
                    launch: OneProcess) -> dict[int, FoldResult]:
    """The folds of a run under accelerate launch; the main process gets every result.

    The main process tokenizes and decides which folds to train; the others read the
    token ids back, as the fold processes of training.parallel_folds do. Data-parallel,
    every process trains every fold together. Fold-parallel, process r trains every
    world_size-th fold from r, alone and on its own device, seeded as a sequential run
    is; the main process then reads the others' folds from their files. Nobody waits
    in a collective call while folds train, so a long fold meets no timeout.
    """
    on_main: dict = {}

    def prepare() -> list[int]:
        prep = _tokenized_run(cfg, run_dir, frame, fold_of)
        prep.save_tokens()
        on_main["prep"] = prep
        on_main["results"], to_train = _finished_folds(prep, folds_to_run, resume)
        return to_train

    to_train = launch.run_on_main(prepare)
    prep = on_main["prep"] if launch.is_main else PreparedRun.load(run_dir)
    prep.group = fold_group(launch, fold_parallel)
    if not fold_parallel:
        progress = prep.progress(to_train)
        trained = {fold: prep.train_fold(fold, progress=progress) for fold in to_train}
        return {**on_main.get("results", {}), **trained}
    mine = folds_of_process(to_train, launch)
    side_by_side = cfg.training.parallel_folds > 1 and len(mine) > 1
    log.info("process %d of %d: fold(s) %s%s", launch.rank, launch.world_size, mine or "none",
             f", {min(cfg.training.parallel_folds, len(mine))} at a time in threads" if side_by_side else "")
    _train_in_this_process(prep, mine)
    if not launch.is_main:
        return {}
    _wait_for_folds(prep, [fold for fold in to_train if fold not in mine])
    return {**on_main["results"], **{fold: prep.load_fold_result(fold) for fold in to_train}}


def _wait_for_folds(prep: PreparedRun, folds: Sequence[int]) -> None:
    """Until the other processes' folds check out by their files. A process that fails
    ends the launch (the launcher stops the others); a stop signal ends the wait."""
    waiting = list(folds)
    if waiting:
        log.info("waiting for fold(s) %s of the other processes", waiting)
    while waiting:
        stop = stop_requested()
        if stop is not None:
            raise TrainingInterrupted(stop)
        waiting = [fold for fold in waiting if prep.unfinished_reason(fold) is not None]
        if waiting:
            time.sleep(1.0)


def resume_run(run_dir: str | Path, overrides: Sequence[str] = (), folds_arg: str | None = None,
               force: bool = False, fold_parallel: bool = False) -> dict | None:
    """Continue a stopped run: its saved config (overrides must not change it, unless
    force), the same data, the folds it was asked to train."""
    run_dir = Path(run_dir)
    problem = path_problem(run_dir, "a run folder")
    if problem is not None:
        raise ConfigError(f"--resume: {problem}: nothing to resume")
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"--resume: {run_dir.resolve()} is not a run folder (no config.yaml): nothing to resume")
    saved = load_config(run_dir / "config.yaml")
    if saved.distill.teacher is not None:
        raise ConfigError(f"{run_dir} is a distillation run: it cannot be resumed; train it again")
    cfg = load_config(run_dir / "config.yaml", overrides)
    changes = config_diff(saved, cfg)
    if changes and not force:
        lines = "; ".join(f"{key}: {old!r} (saved) -> {new!r}" for key, old, new in changes)
        raise ConfigError(f"the config differs from the one {run_dir} was trained with: {lines}. "
                          "Resuming would mix two configs in one run; pass --force to do it anyway")
    frame = load_inputs(cfg, fold_parallel, ConfigOrigin(run_dir / "config.yaml", tuple(overrides)))
    run_info = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    recorded = run_info.get("train_file_sha256")
    if recorded and recorded != file_sha256(cfg.data.train_file) and not force:
        raise ConfigError(f"{cfg.data.train_file} has changed since {run_dir} started (its SHA-256 differs); "
                          "pass --force to continue on the new file")
    if changes:
        log.warning("resuming %s with a changed config (--force): %s", run_dir,
                    ", ".join(key for key, _, _ in changes))
        current_launch().run_on_main(lambda: save_config(cfg, run_dir / "config.yaml"))
    folds = parse_folds_arg(folds_arg, cfg.folds.n_splits) if folds_arg else run_info["folds"]
    current_launch().run_on_main(lambda: remove_orphans(run_dir))      # what a killed process left
    return run_cross_validation(cfg, run_dir, folds, frame, resume=True, fold_parallel=fold_parallel)


def summarize(cfg: Config, run_dir: Path, frame: pd.DataFrame, fold_of: np.ndarray, targets: np.ndarray,
              results: dict[int, FoldResult]) -> dict:
    names = list(cfg.data.target_columns)
    scored = np.concatenate([r.valid_index for r in results.values()])
    scored.sort()
    oof = np.full(targets.shape, np.nan, dtype=np.float32)
    baseline = np.full(targets.shape, np.nan, dtype=np.float32)
    for fold, result in results.items():
        oof[result.valid_index] = result.oof
        baseline[result.valid_index] = targets[fold_of != fold].mean(axis=0)
    oof_report = score_report(targets[scored], oof[scored], names)
    baseline_score = score_report(targets[scored], baseline[scored], names)["mcrmse"]
    fold_reports = {f: {"mcrmse": r.score, "per_target": r.per_target} for f, r in results.items()}
    # training time of the folds (their own clocks, resumed sessions included): the same
    # however often the run is resumed afterwards
    seconds = sum(r.seconds for r in results.values())

    oof_frame = pd.DataFrame(oof[scored], columns=names)
    oof_frame.insert(0, "fold", fold_of[scored])
    oof_frame.insert(0, cfg.data.id_column, frame[cfg.data.id_column].to_numpy()[scored])
    atomic_write_csv(run_dir / "oof.csv", oof_frame)
    scores = {
        "oof": oof_report,
        "folds": {str(f): {**rep, "best_step": results[f].best_step, "seconds": round(results[f].seconds, 1)}
                  for f, rep in fold_reports.items()},
        "mean_predictor_mcrmse": baseline_score,
        "n_rows": int(len(scored)),
        "seconds": round(seconds, 1),
    }
    atomic_write_json(run_dir / "scores.json", scores)
    table = format_table(fold_reports, oof_report, baseline_score, names)
    log.info("run %s: %d fold(s), %.0f s of training\n%s", run_dir, len(results), seconds, table)
    return scores
