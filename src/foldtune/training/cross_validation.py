"""A run's folds trained: its inputs checked and read, its folder started (or, resuming,
read back), each fold trained by the fold scheduler, the run scored.

The run folder's layout is run_layout.py's; the checks, checks.py's; the shared inputs,
prepared.py's; how folds are scheduled, schedulers.py's; the scores, summary.py's.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from foldtune.config import Config, ConfigError, ConfigOrigin
from foldtune.data.demo import write_demo_files
from foldtune.data.folds import assign_folds
from foldtune.data.validate import check_data_files, load_test, load_train
from foldtune.files import remove_orphans
from foldtune.pseudo import PseudoLabels, pseudo_labels_of_run
from foldtune.report import write_report_or_warn
from foldtune.run_layout import (CONFIG_FILE, FOLDS_FILE, FoldResult, FoldSeed, fold_seeds, read_run_csv,
                                 start_run_folder)
from foldtune.run_lock import RunLock
from foldtune.runtime.precision import resolve_device
from foldtune.training.checks import check_run, resolve_attention
from foldtune.training.distributed import OneProcess, current_launch, launched_world_size
from foldtune.training.graphs import too_many_shapes
from foldtune.training.prepared import PreparedRun, finished_folds, tokenized_run
from foldtune.training.schedulers import AfterFold, Sequential, fold_scheduler
from foldtune.training.state import wait_for_removals
from foldtune.training.stopping import TrainingInterrupted, stop_requested
from foldtune.training.summary import summarize

log = logging.getLogger("foldtune")

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
    if (run_dir / CONFIG_FILE).exists():
        lock.release()
        raise ConfigError(f"run folder {run_dir} already holds a run; choose another output.name (or --name)")
    # Fold folders without config.yaml: a stopping run's last writes after its folder was
    # removed, or folders copied in. A new run would continue their training states.
    left = sorted(path.name for path in run_dir.glob("fold_*"))
    if left:
        lock.release()
        raise ConfigError(f"run folder {run_dir} holds {', '.join(left)} but no {CONFIG_FILE}: the folds of another "
                          "run, which a new run would continue; move them away, or choose another output.name "
                          "(or --name)")
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


def load_inputs(cfg: Config, fold_parallel: bool = False, origin: ConfigOrigin | None = None) -> pd.DataFrame:
    """Check the config against the device and the launch (checks.check_run), then both
    data files; return the training rows.

    Everything a user can get wrong in the inputs fails here, before a run folder is
    made or a model is loaded. Under accelerate launch every process checks the same
    inputs, so all of them fail together. origin: where the config came from, for the
    error of a missing data file.
    """
    check_run(cfg, resolve_device(cfg.training.device), launched_world_size(), fold_parallel)
    check_data_files(cfg.data, origin)
    if cfg.data.demo:
        current_launch().run_on_main(lambda: ensure_demo_files(cfg))
    frame = load_train(cfg.data.train_file, cfg.data, cfg.folds)
    if cfg.data.test_file is not None:
        load_test(cfg.data.test_file, cfg.data)  # a bad test file fails now, not after training
    return frame


def start_run(cfg: Config, run_dir: Path, frame: pd.DataFrame, folds_to_run: Sequence[int],
              launch: dict | None = None) -> np.ndarray:
    """Split the rows into the config's folds and write what a new run records before
    training (run_layout.start_run_folder); the fold of each row."""
    fold_of = make_fold_column(frame, cfg)
    start_run_folder(cfg, run_dir, frame[cfg.data.id_column], fold_of, folds_to_run, launch)
    return fold_of


def saved_folds(cfg: Config, run_dir: Path, frame: pd.DataFrame) -> np.ndarray:
    """The fold of each row as the run recorded it; the rows must be the same."""
    saved = read_run_csv(run_dir / FOLDS_FILE, cfg.data.id_column)
    if saved[cfg.data.id_column].tolist() != frame[cfg.data.id_column].tolist():
        raise ConfigError(f"{cfg.data.train_file} does not hold the rows of {run_dir / 'folds.csv'}: "
                          "the run cannot continue on other data")
    return saved["fold"].to_numpy(dtype=np.int64)


def run_cross_validation(cfg: Config, run_dir: Path, folds_to_run: Sequence[int] | None = None,
                         frame: pd.DataFrame | None = None, resume: bool = False,
                         fold_parallel: bool = False, after_fold: AfterFold | None = None) -> dict | None:
    """Train the chosen folds of `cfg` into `run_dir`; return the scores written to scores.json.

    With resume, the run folder's folds are reused, finished folds (checked by their
    files) are read back instead of trained, and an interrupted fold continues from its
    newest training state. With training.seeds each fold is trained once per seed: each
    (fold, seed) model is a fold to the schedulers and to resume. Under accelerate launch each fold is trained data-parallel by
    every process, or (fold_parallel) each process trains its share of the folds; the
    main process scores the run and the others return None.

    after_fold: called after each fold (fold, seed model) that trains, with its result;
    the folds then train one after another in this process (a search prunes there).
    """
    if frame is None:
        frame = load_inputs(cfg, fold_parallel)
    launch = current_launch()
    # before config.yaml is written: the run records the attention it trains with
    cfg = resolve_attention(cfg, launch.local_device(resolve_device(cfg.training.device)))
    shapes = too_many_shapes(cfg)
    if shapes is not None and launch.is_main:
        log.warning(shapes)
    run_dir = Path(run_dir)
    folds_to_run = list(range(cfg.folds.n_splits)) if folds_to_run is None else list(folds_to_run)
    launch_info = ({"processes": launch.world_size, "process_mode": "fold_parallel" if fold_parallel
                    else "data_parallel"} if launch.world_size > 1 else None)
    fold_of = launch.run_on_main(lambda: saved_folds(cfg, run_dir, frame) if resume
                                 else start_run(cfg, run_dir, frame, folds_to_run, launch=launch_info))
    if cfg.pseudo.teacher is not None and launch.world_size > 1:
        raise ConfigError("pseudo.teacher: a run with pseudo-labels trains in one process (its folds may still "
                          "run side by side: training.parallel_folds); run it as python train.py, not under "
                          "accelerate launch")
    pseudo = pseudo_labels_of_run(cfg, run_dir, frame, fold_of)
    if cfg.model.type == "tfidf_ridge" and launch.world_size == 1:
        # seconds per fold on a CPU: every fold is fitted again, resumed or not
        from foldtune.models.tfidf_ridge import train_tfidf_folds

        def stop_between_folds(fold: int) -> None:      # SIGINT or SIGTERM: a fold is one fit
            stop = stop_requested()
            if stop:
                raise TrainingInterrupted(stop)

        results = {FoldSeed(fold): result for fold, result in
                   train_tfidf_folds(cfg, run_dir, frame, fold_of, folds_to_run, pseudo, stop_between_folds).items()}
    else:
        units = fold_seeds(folds_to_run, cfg.training.seeds)
        prepared, results, to_train = _prepare(cfg, run_dir, frame, fold_of, units, resume, launch, pseudo)
        scheduler = fold_scheduler(cfg, launch, fold_parallel) if after_fold is None else Sequential(after_fold)
        results.update(scheduler.run_folds(prepared, to_train))
        if not launch.is_main:
            wait_for_removals()       # its folds' training states, when it trained them in threads
            return None
    targets = frame[list(cfg.data.target_columns)].to_numpy(dtype=np.float32)
    scores = summarize(cfg, run_dir, frame, fold_of, targets, dict(sorted(results.items())))
    write_report_or_warn(run_dir)     # report.md and plots; a failure there only warns
    wait_for_removals()               # finished folds' training states, removed meanwhile
    return scores


def _prepare(cfg: Config, run_dir: Path, frame: pd.DataFrame, fold_of: np.ndarray, units: Sequence[FoldSeed],
             resume: bool, launch: OneProcess, pseudo: PseudoLabels | None = None,
             ) -> tuple[PreparedRun, dict[FoldSeed, FoldResult], list[FoldSeed]]:
    """(the prepared run, the folds (fold, seed models) finished before, read back; those to train).

    Under a launch the main process tokenizes and decides which folds to train; the
    others read the token ids back, as the fold processes of training.parallel_folds do.
    """
    if launch.world_size == 1:
        prepared = tokenized_run(cfg, run_dir, frame, fold_of, pseudo)
        return (prepared, *finished_folds(prepared, units, resume))
    on_main: dict = {}

    def prepare() -> list[int]:
        prepared = tokenized_run(cfg, run_dir, frame, fold_of)
        prepared.save_tokens()
        on_main["prepared"] = prepared
        on_main["finished"], to_train = finished_folds(prepared, units, resume)
        return to_train

    to_train = launch.run_on_main(prepare)
    prepared = on_main["prepared"] if launch.is_main else PreparedRun.load(run_dir)
    return prepared, on_main.get("finished", {}), to_train
