"""What every fold of a run shares, made once: the rows, their folds and their token ids.

A fold trains from a `PreparedRun`, in this process or another one (which reads the
token ids back from the run folder), and reads back the folds finished before.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from safetensors import SafetensorError, safe_open

from foldtune.checkpoint import WEIGHTS_FILE, CheckpointError, changed_files, read_meta
from foldtune.config import Config, load_config
from foldtune.data.dataset import TextDataset, encode_data
from foldtune.data.validate import load_train
from foldtune.files import atomic_path
from foldtune.models.regressor import load_tokenizer
from foldtune.pseudo import PseudoLabels, read_pseudo_labels
from foldtune.run_layout import (CONFIG_FILE, FOLDS_FILE, OOF_FILE, RESULT_FILE, TOKENS_FILE, FoldResult, FoldSeed,
                                 read_fold_result, read_run_csv, write_fold_result)
from foldtune.runtime.launch_lock import CUDA_LAUNCH_LOCK
from foldtune.training.distributed import ONE_PROCESS, DataParallel, OneProcess, current_launch
from foldtune.training.progress import RunProgress
from foldtune.training.state import load_state, remove_states, state_files
from foldtune.training.trainer import FoldData, FoldTrainer, steps_per_epoch

log = logging.getLogger("foldtune")

# One fold is built at a time in this process: seeding and building a model use the
# process's global random generators, which folds trained in threads share.
BUILDING = threading.Lock()


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
    # pseudo.file's texts and each fold's targets for them (foldtune.pseudo), tokenized
    pseudo: PseudoLabels | None = None
    pseudo_ids: list[list[int]] = field(default_factory=list)

    @property
    def targets(self) -> np.ndarray:
        return self.frame[list(self.cfg.data.target_columns)].to_numpy(dtype=np.float32)

    def fold_data(self, fold: int) -> FoldData:
        """The fold's training rows (with pseudo.file's texts and the fold's targets for them, if
        any) and its validation rows."""
        targets = self.targets
        train_idx = np.flatnonzero(self.fold_of != fold)
        valid_idx = np.flatnonzero(self.fold_of == fold)
        ids = self.frame[self.cfg.data.id_column].tolist()
        train_ids, train_targets = [self.input_ids[i] for i in train_idx], targets[train_idx]
        if self.pseudo is not None:
            train_ids += self.pseudo_ids
            train_targets = np.concatenate([train_targets, self.pseudo.targets[fold]])
        return FoldData(
            fold=fold,
            train=TextDataset(train_ids, train_targets),
            valid=TextDataset([self.input_ids[i] for i in valid_idx], targets[valid_idx]),
            valid_ids=[ids[i] for i in valid_idx],
            valid_index=valid_idx,
            target_columns=self.cfg.data.target_columns,
            target_range=(float(targets.min()), float(targets.max())),
        )

    def seeded(self, unit: FoldSeed) -> Config:
        """The config `unit` trains with: the run's, its training.seed the unit's seed (if it has one)."""
        if unit.seed is None:
            return self.cfg
        return dataclasses.replace(self.cfg, training=dataclasses.replace(self.cfg.training, seed=unit.seed))

    def progress(self, units: Sequence[FoldSeed]) -> RunProgress:
        """How this process shows the training of `units`, and each one's steps for the run's
        time left. Bars only where one process draws on the terminal: under a fold-parallel
        launch each process writes lines."""
        tcfg = self.cfg.training
        extra = 0 if self.pseudo is None else len(self.pseudo)
        steps = {unit: steps_per_epoch(int(np.sum(self.fold_of != unit.fold)) + extra, tcfg) * tcfg.epochs
                 for unit in units}
        one_display = current_launch().world_size == 1 or self.group.world_size > 1
        return RunProgress.from_environment(bars=one_display, steps_of_fold=steps)

    def train_fold(self, unit: FoldSeed, in_threads: bool = False, on_running: Callable[[], None] | None = None,
                   progress: RunProgress | None = None) -> FoldResult:
        """Train the fold (with its seed, in a run with training.seeds), continuing from its
        newest training state if it has one.

        in_threads: other folds train beside this one, in threads of this process: the
        fold's training states are removed in the background. At the end the GPU memory torch
        has cached is handed back to the driver, threads or not. on_running: called once
        the fold's first steps have run (see FoldTrainer.train). progress: how the run shows
        its folds (default: as the environment asks, this fold alone).
        """
        fold_dir = unit.folder(self.run_dir)
        states = state_files(fold_dir)
        state = load_state(states[-1]) if states else None
        if state is not None:
            log.info("fold %s: continuing from %s", unit, states[-1])
        with BUILDING:          # seeding and building a model use the global generators
            trainer = FoldTrainer(self.seeded(unit), self.fold_data(unit.fold), self.tokenizer, fold_dir, self.group,
                                  progress).setup()
        try:
            result = trainer.train(state, on_running)
        finally:
            trainer.graphs.close()
            del trainer
        if torch.cuda.is_available():
            # The fold's model, optimizer and graphs (reference cycles) are freed now, and torch's
            # cache handed back: a graph's memory pool is not reused by another fold's, so in
            # threads the pools of finished folds piled up until the GPU was full (25 graphed
            # fold-seeds of windows). Under the launch lock: no fold is capturing meanwhile.
            gc.collect()
            with CUDA_LAUNCH_LOCK:
                torch.cuda.empty_cache()
        if not self.group.is_main:
            return result
        write_fold_result(fold_dir, result)
        remove_states(fold_dir, wait=not in_threads)    # finished: the best checkpoint is what stays
        return result

    def unfinished_reason(self, unit: FoldSeed) -> str | None:
        """None if the files of the fold (its seed's) show it finished; else what is missing or wrong."""
        fold, fold_dir = unit.fold, unit.folder(self.run_dir)
        try:
            summary = read_fold_result(fold_dir)
            float(summary["mcrmse"]), int(summary["best_step"])
        except FileNotFoundError:
            return f"no {RESULT_FILE}"
        except (ValueError, KeyError, TypeError) as err:
            return f"{RESULT_FILE} unreadable ({err})"
        try:
            oof = read_run_csv(fold_dir / OOF_FILE, self.cfg.data.id_column)
        except (FileNotFoundError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
            return f"{OOF_FILE} missing or unreadable ({err})"
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

    def load_fold_result(self, unit: FoldSeed) -> FoldResult:
        """A fold (its seed's model) trained by another process, read back from its folder."""
        fold, fold_dir = unit.fold, unit.folder(self.run_dir)
        summary = read_fold_result(fold_dir)
        oof = read_run_csv(fold_dir / OOF_FILE, self.cfg.data.id_column)
        oof = oof[list(self.cfg.data.target_columns)].to_numpy(dtype=np.float32)
        return FoldResult(fold, summary["mcrmse"], summary["per_target"], summary["best_step"], oof,
                          np.flatnonzero(self.fold_of == fold), fold_dir / "best", summary["seconds"])

    @classmethod
    def load(cls, run_dir: str | Path) -> "PreparedRun":
        """Rebuild a run's shared inputs from its folder (config, folds, token ids)."""
        run_dir = Path(run_dir)
        cfg = load_config(run_dir / CONFIG_FILE)
        frame = load_train(cfg.data.train_file, cfg.data, cfg.folds)
        fold_of = read_run_csv(run_dir / FOLDS_FILE, cfg.data.id_column)["fold"].to_numpy(dtype=np.int64)
        with np.load(run_dir / TOKENS_FILE) as saved:
            flat, offsets = saved["ids"], saved["offsets"]
        input_ids = [flat[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]
        tokenizer = load_tokenizer(cfg.model.name)
        pseudo = read_pseudo_labels(cfg, run_dir) if cfg.pseudo.teacher is not None else None
        return cls(cfg, run_dir, frame, fold_of, input_ids, tokenizer, pseudo=pseudo,
                   pseudo_ids=_tokens(cfg, tokenizer, pseudo))

    def save_tokens(self) -> None:
        """Token ids for fold processes: the texts are tokenized once per run."""
        offsets = np.cumsum([0] + [len(ids) for ids in self.input_ids])
        with atomic_path(self.run_dir / TOKENS_FILE) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, ids=np.concatenate([np.asarray(ids, dtype=np.int64) for ids in self.input_ids]),
                         offsets=offsets)


def _tokens(cfg: Config, tokenizer, pseudo: PseudoLabels | None) -> list[list[int]]:
    return [] if pseudo is None else encode_data(tokenizer, pseudo.texts, cfg.data).input_ids


def tokenized_run(cfg: Config, run_dir: Path, frame: pd.DataFrame, fold_of: np.ndarray,
                  pseudo: PseudoLabels | None = None) -> PreparedRun:
    """The run's texts (and pseudo.file's) tokenized once, for all its folds."""
    tokenizer = load_tokenizer(cfg.model.name)
    encoded = encode_data(tokenizer, frame[cfg.data.text_column].tolist(), cfg.data)
    return PreparedRun(cfg, run_dir, frame, fold_of, encoded.input_ids, tokenizer, pseudo=pseudo,
                       pseudo_ids=_tokens(cfg, tokenizer, pseudo))


def finished_folds(prepared: PreparedRun, units: Sequence[FoldSeed],
                   resume: bool) -> tuple[dict[FoldSeed, FoldResult], list[FoldSeed]]:
    """(the folds, or (fold, seed) models, finished before, read back; those to train)."""
    results: dict[FoldSeed, FoldResult] = {}
    to_train = []
    for unit in units:
        reason = prepared.unfinished_reason(unit) if resume else "new run"
        if reason is None:
            log.info("fold %s: finished before, its files check out: skipped", unit)
            results[unit] = prepared.load_fold_result(unit)
        else:
            if resume:
                log.info("fold %s: to train (%s)", unit, reason)
            # a fold is finished when its result is written (inference relies on it): none is left from before
            (unit.folder(prepared.run_dir) / RESULT_FILE).unlink(missing_ok=True)
            to_train.append(unit)
    return results, to_train
