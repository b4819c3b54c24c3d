"""Every fold of a run: check the input, split, tokenize once, train each fold, score the OOF.

    runs/<name>/
      config.yaml   the resolved config          folds.csv   id -> fold
      run.json      versions, device, command    oof.csv     id, fold, predictions
      scores.json   per fold and OOF, per target
      fold_<k>/     best/ (checkpoint), oof.csv, metrics.csv, train.log
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
import transformers

from foldtune import __version__
from foldtune.config import Config, ConfigError, load_config, save_config
from foldtune.data.dataset import TextDataset, encode_texts
from foldtune.data.folds import assign_folds
from foldtune.data.validate import load_test, load_train
from foldtune.files import atomic_path, atomic_write_csv, atomic_write_json
from foldtune.losses import LOSSES
from foldtune.metrics import score_report
from foldtune.models.pooling import POOLINGS
from foldtune.models.regressor import load_tokenizer
from foldtune.optim.factory import check_optimizer
from foldtune.training.precision import resolve_device, resolve_precision
from foldtune.training.trainer import FoldData, FoldResult, FoldTrainer

log = logging.getLogger("foldtune")

RESULT_FILE = "result.json"      # per fold: its scores, written when it finishes
TOKENS_FILE = "tokens.npz"       # token ids of every row, for fold processes


def check_names(cfg: Config) -> None:
    """Every name the config picks from a registry exists (fails before any loading)."""
    POOLINGS.get(cfg.model.pooling)
    LOSSES.get(cfg.training.loss)
    device = resolve_device(cfg.training.device)
    check_optimizer(cfg.training, device)
    resolve_precision(cfg.training.precision, device)
    if cfg.training.target_weights is not None and len(cfg.training.target_weights) != len(cfg.data.target_columns):
        raise ConfigError(f"training.target_weights has {len(cfg.training.target_weights)} values for "
                          f"{len(cfg.data.target_columns)} targets ({', '.join(cfg.data.target_columns)})")


def ensure_demo_files(cfg: Config) -> None:
    """Write the built-in demo essays where the config expects its files, if absent."""
    from foldtune.data.demo import make_demo

    train_path = Path(cfg.data.train_file)
    test_path = Path(cfg.data.test_file) if cfg.data.test_file else None
    if train_path.exists() and (test_path is None or test_path.exists()):
        return
    train, test = make_demo()
    atomic_write_csv(train_path, train)
    if test_path is not None:
        atomic_write_csv(test_path, test)
    log.info("wrote the demo data set: %s (%d rows)%s", train_path, len(train),
             f", {test_path} ({len(test)} rows)" if test_path else "")


def new_run_dir(cfg: Config, config_name: str) -> Path:
    name = cfg.output.name or f"{config_name}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.output.dir) / name
    if (run_dir / "config.yaml").exists():
        raise ConfigError(f"run folder {run_dir} already holds a run; choose another output.name (or --name)")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


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


def load_inputs(cfg: Config) -> pd.DataFrame:
    """Check the config's names and both data files; return the training rows.

    Everything a user can get wrong in the inputs fails here, before a run folder is
    made or a model is loaded.
    """
    check_names(cfg)
    if cfg.data.demo:
        ensure_demo_files(cfg)
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

    def train_fold(self, fold: int) -> FoldResult:
        fold_dir = self.run_dir / f"fold_{fold}"
        result = FoldTrainer(self.cfg, self.fold_data(fold), self.tokenizer, fold_dir).setup().train()
        atomic_write_json(fold_dir / RESULT_FILE, {
            "fold": fold, "mcrmse": result.score, "per_target": result.per_target,
            "best_step": result.best_step, "seconds": result.seconds,
        })
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return result

    def load_fold_result(self, fold: int) -> FoldResult:
        """A fold trained by another process, read back from its folder."""
        fold_dir = self.run_dir / f"fold_{fold}"
        summary = json.loads((fold_dir / RESULT_FILE).read_text(encoding="utf-8"))
        oof = pd.read_csv(fold_dir / "oof.csv")[list(self.cfg.data.target_columns)].to_numpy(dtype=np.float32)
        return FoldResult(fold, summary["mcrmse"], summary["per_target"], summary["best_step"], oof,
                          np.flatnonzero(self.fold_of == fold), fold_dir / "best", summary["seconds"])

    @classmethod
    def load(cls, run_dir: str | Path) -> "PreparedRun":
        """Rebuild a run's shared inputs from its folder (config, folds, token ids)."""
        run_dir = Path(run_dir)
        cfg = load_config(run_dir / "config.yaml")
        frame = load_train(cfg.data.train_file, cfg.data, cfg.folds)
        fold_of = pd.read_csv(run_dir / "folds.csv")["fold"].to_numpy(dtype=np.int64)
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
    results are the same; they only share the device.
    """
    prep.save_tokens()
    pending, running, failed = list(folds), {}, []
    while pending or running:
        while pending and len(running) < parallel:
            fold = pending.pop(0)
            log.info("fold %d: started in its own process", fold)
            running[fold] = subprocess.Popen(
                [sys.executable, "-m", "foldtune.training.fold_worker", str(prep.run_dir), str(fold)])
        time.sleep(0.2)
        for fold, process in list(running.items()):
            if process.poll() is not None:
                del running[fold]
                if process.returncode != 0:
                    failed.append(fold)
    if failed:
        logs = ", ".join(str(prep.run_dir / f"fold_{f}" / "train.log") for f in failed)
        raise RuntimeError(f"fold(s) {failed} failed in their processes; see {logs}")
    return {fold: prep.load_fold_result(fold) for fold in folds}


def run_cross_validation(cfg: Config, run_dir: Path, folds_to_run: Sequence[int] | None = None,
                         frame: pd.DataFrame | None = None) -> dict:
    """Train the chosen folds of `cfg` into `run_dir`; return the scores written to scores.json."""
    started = time.perf_counter()
    if frame is None:
        frame = load_inputs(cfg)
    run_dir = Path(run_dir)
    folds_to_run = list(range(cfg.folds.n_splits)) if folds_to_run is None else list(folds_to_run)

    save_config(cfg, run_dir / "config.yaml")
    atomic_write_json(run_dir / "run.json", {
        "started": dt.datetime.now().isoformat(timespec="seconds"),
        "command": sys.argv,
        "folds": folds_to_run,
        "foldtune": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
    })
    fold_of = make_fold_column(frame, cfg)
    atomic_write_csv(run_dir / "folds.csv", pd.DataFrame({cfg.data.id_column: frame[cfg.data.id_column],
                                                          "fold": fold_of}))
    tokenizer = load_tokenizer(cfg.model.name)
    encoded = encode_texts(tokenizer, frame[cfg.data.text_column].tolist(), cfg.data.max_len, cfg.data.truncation,
                           cfg.data.head_fraction)
    prep = PreparedRun(cfg, run_dir, frame, fold_of, encoded.input_ids, tokenizer)

    if cfg.training.parallel_folds > 1 and len(folds_to_run) > 1:
        results = train_folds_in_processes(prep, folds_to_run, cfg.training.parallel_folds)
    else:
        results = {fold: prep.train_fold(fold) for fold in folds_to_run}
    return summarize(cfg, run_dir, frame, fold_of, prep.targets, results, time.perf_counter() - started)


def summarize(cfg: Config, run_dir: Path, frame: pd.DataFrame, fold_of: np.ndarray, targets: np.ndarray,
              results: dict[int, FoldResult], seconds: float) -> dict:
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
    log.info("run %s finished in %.0f s\n%s", run_dir, seconds, table)
    return scores
