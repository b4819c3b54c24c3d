"""Predict with every fold checkpoint of a run, average the folds, write a submission.

A run with training.seeds has a checkpoint per fold and seed (fold_k/seed_<s>/best): each
fold's seeds are averaged first, then the folds as for a run of one model a fold.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from transformers import AutoTokenizer

from foldtune.checkpoint import (CONFIG_FILE, META_FILE, CheckpointError, check_same_tokenizer, load_checkpoint,
                                 read_meta)
from foldtune.config import ConfigError, DataConfig, load_config, path_problem
from foldtune.data.collate import STATIC_PAD_MULTIPLE
from foldtune.data.dataset import TextDataset, encode_data
from foldtune.data.windows import Windows
from foldtune.files import atomic_write_csv, remove_orphans
from foldtune.models.deberta_attention import fused_on
from foldtune.models.regressor import load_backbone_config
from foldtune.run_layout import CONFIG_FILE as RUN_CONFIG_FILE
from foldtune.run_layout import RESULT_FILE, RUN_FILE, fold_finished, fold_seeds, read_provenance
from foldtune.runtime.precision import Precision, resolve_device, resolve_precision
from foldtune.runtime.predict import predict

log = logging.getLogger("foldtune")


def run_folds(run_dir: str | Path) -> list[int]:
    """The folds a run was asked to train (run.json), else those with a fold_k/best folder."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run folder {run_dir} does not exist")
    if (run_dir / RUN_FILE).is_file():
        return list(read_provenance(run_dir)["folds"])
    return sorted(int(p.parent.name.split("_")[1]) for p in run_dir.glob("fold_*/best"))


class UnfinishedFolds(CheckpointError):
    """Folds a run was asked to train that have not finished; `reasons` says why, per fold.

    The message says how to finish them; a command that can leave them out (infer.py
    --run, export) adds its own option for that.
    """

    def __init__(self, run_dir: Path, reasons: dict[int, str]):
        self.run_dir, self.reasons = run_dir, reasons
        why = "; ".join(f"fold {fold}: {reason}" for fold, reason in reasons.items())
        # an export holds only what its run had finished (older exports lack result.json): export it again
        remedy = (f"export its run again into {run_dir} (foldtune export --run RUN --out {run_dir})"
                  if (Path(run_dir) / "export.json").is_file()
                  else f"finish them with `python train.py --resume {run_dir}`")
        super().__init__(f"fold(s) {sorted(reasons)} of {run_dir} have no finished checkpoint ({why}): {remedy}")


def run_seeds(run_dir: str | Path) -> tuple[int, ...] | None:
    """The seeds each fold of the run trained (training.seeds of its config.yaml); None: one
    model a fold, in fold_k/best (so too for a folder without a config.yaml)."""
    path = Path(run_dir) / RUN_CONFIG_FILE
    return load_config(path).training.seeds if path.is_file() else None


def _why_unfinished(run_dir: Path, fold: int, seeds: Sequence[int] | None) -> str | None:
    """None for a finished fold with a checkpoint (of each seed); else what is missing."""
    for unit in fold_seeds([fold], seeds):
        folder = unit.folder(run_dir).relative_to(run_dir).as_posix()
        if not (run_dir / folder / "best" / META_FILE).is_file():
            return f"no checkpoint {folder}/best"
        if not fold_finished(run_dir, fold, unit.seed):
            return f"no {folder}/{RESULT_FILE}, so still training or stopped"
    return None


def _checkpoints_of_fold(run_dir: Path, fold: int, seeds: Sequence[int] | None) -> list[Path]:
    """The fold's best checkpoint folder, or one per seed in the config's order."""
    return [unit.folder(run_dir) / "best" for unit in fold_seeds([fold], seeds)]


def checkpoint_fold(run_dir: str | Path, folder: Path) -> int:
    """The fold of a checkpoint folder of the run (fold_k/best or fold_k/seed_<s>/best)."""
    return int(folder.relative_to(run_dir).parts[0].removeprefix("fold_"))


def _finished_checkpoints(run_dir: Path, allow_missing: bool,
                          only: Sequence[int] | None) -> tuple[list[Path], dict[int, str]]:
    """(the finished folds' checkpoint folders, the unfinished folds left out with why);
    raises for an unfinished fold unless allow_missing. Says nothing: see fold_checkpoints."""
    expected = run_folds(run_dir)
    if only is not None:
        absent = sorted(set(only) - set(expected))
        if absent:
            raise CheckpointError(f"{run_dir} did not train fold(s) {absent} (it has {expected})")
        expected = sorted(only)
    seeds = run_seeds(run_dir)
    unfinished = {fold: why for fold in expected if (why := _why_unfinished(run_dir, fold, seeds)) is not None}
    if unfinished and not allow_missing:
        raise UnfinishedFolds(run_dir, unfinished)
    folders = [folder for fold in expected if fold not in unfinished
               for folder in _checkpoints_of_fold(run_dir, fold, seeds)]
    if not folders:
        where = "fold_k/best" if seeds is None else "fold_k/seed_<s>/best"
        raise CheckpointError(f"{run_dir} holds no finished fold ({where} and its {RESULT_FILE}): "
                              "has the run finished a fold?")
    return folders, unfinished


def fold_checkpoints(run_dir: str | Path, allow_missing: bool = False,
                     only: Sequence[int] | None = None) -> list[Path]:
    """The best checkpoint folder of every fold the run trains (or of the folds `only`),
    in fold order; with training.seeds, each fold's of every seed.

    Only a finished fold is used: one whose fold_k/result.json exists, written once the
    fold has ended (its fold_k/best alone may be an early epoch's while it trains). A fold
    the run was asked to train (run.json) that has not finished stops inference, naming
    it (UnfinishedFolds); with allow_missing it is left out with a warning.
    """
    run_dir = Path(run_dir)
    folders, unfinished = _finished_checkpoints(run_dir, allow_missing, only)
    for fold, why in unfinished.items():
        log.warning("fold %d of %s is left out (%s)", fold, run_dir, why)
    return folders


def run_finished(run_dir: str | Path) -> bool:
    """Every fold the run was asked to train (run.json) has finished (see fold_checkpoints)."""
    run_dir = Path(run_dir)
    try:
        folds = run_folds(run_dir)
    except (OSError, ValueError, KeyError, TypeError):      # run.json unreadable: not a run to use
        return False
    seeds = run_seeds(run_dir)
    return bool(folds) and all(_why_unfinished(run_dir, fold, seeds) is None for fold in folds)


def latest_run(runs_dir: str | Path = "runs") -> Path:
    """The most recently started finished run (run_finished: every fold of its run.json has
    its fold_k/result.json); a run still training, or stopped, is passed over."""
    runs_dir = Path(runs_dir)
    runs = [p.parent for p in runs_dir.glob("*/config.yaml")]
    finished = [run for run in runs if run_finished(run)]
    if not finished:
        others = f" ({len(runs)} unfinished: finish one with `python train.py --resume RUN`)" if runs else ""
        raise CheckpointError(f"no finished run under {runs_dir}/{others}: run `python train.py` first, or pass "
                              "--run")
    return max(finished, key=lambda p: (p / "config.yaml").stat().st_mtime)


def normalized_weights(weights: Sequence[float] | np.ndarray, n: int, what: str) -> np.ndarray:
    """`weights` as float64 summing to one (per column for a matrix), checked.

    One weight per item (n rows); a matrix has a column per target. `what` names the
    option in the messages, e.g. "--weights (one per --run)".
    """
    w = np.asarray(weights, dtype=np.float64)
    count = w.shape[0] if w.ndim else 1
    if w.ndim not in (1, 2) or count != n:
        raise ValueError(f"{what}: {count} weight(s) given, {n} expected")
    if not np.isfinite(w).all():
        raise ValueError(f"{what}: weights must be finite numbers, got {w.tolist()}")
    if (w < 0).any():
        raise ValueError(f"{what}: weights must not be negative, got {w.tolist()}")
    total = w.sum(axis=0)
    if (total <= 0).any():
        raise ValueError(f"{what}: weights sum to zero, got {w.tolist()}")
    return w / total


def parse_weights(text: str, option: str) -> list[float]:
    """'0.6,0.4' -> [0.6, 0.4]; anything else fails naming the option."""
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"{option} '{text}': expected numbers separated by commas, e.g. 0.6,0.4") from None


def inference_precision(name: str, device: torch.device) -> Precision:
    """fp32, fp16 or bf16 autocast on a GPU; fp32 only on CPU (auto: bf16 where the GPU has it)."""
    if device.type != "cuda" and name not in ("auto", "fp32"):
        raise ValueError(f"precision '{name}' needs a CUDA device; on {device.type} inference runs in fp32")
    return resolve_precision(name, device)


def check_max_len(backbone_config, max_len: int) -> None:
    """A backbone with learned absolute positions cannot read past its position table."""
    limit = getattr(backbone_config, "max_position_embeddings", None)
    absolute = getattr(backbone_config, "position_biased_input", True)  # DeBERTa-v3: relative only
    if absolute and limit is not None and max_len > limit:
        raise ValueError(f"max_len {max_len} exceeds the {limit} positions of this {backbone_config.model_type} "
                         "backbone; use a max_len of at most that")


def predict_run(run_dir: str | Path, texts: Sequence[str], batch_size: int = 32, device: str = "auto",
                precision: str = "auto", allow_missing_folds: bool = False, max_len: int | None = None,
                fold_weights: Sequence[float] | None = None,
                folds: Sequence[int] | None = None) -> tuple[np.ndarray, dict]:
    """The fold-averaged predictions of a run (or of its folds `folds`) for `texts`, and
    the first fold's metadata. With training.seeds, a fold's prediction is the mean of its
    seeds' checkpoints' (those that could be read, with allow_missing_folds).

    max_len: tokens per text at inference (default: the run's data.max_len; longer is
    allowed, cut the way training cut). fold_weights: one per fold of the run (run.json
    order), normalised to sum to one over the folds that are used.
    """
    expected = run_folds(run_dir)
    if fold_weights is not None:
        fold_weights = normalized_weights(fold_weights, len(expected), f"fold weights of {run_dir} (one per fold "
                                          f"{expected})")
    folders, metas = [], []
    for folder in fold_checkpoints(run_dir, allow_missing_folds, folds):
        try:
            metas.append(read_meta(folder))
            folders.append(folder)
        except CheckpointError as err:
            if not allow_missing_folds:
                raise
            log.warning("%s: left out of the average", err)
    if not folders:
        raise CheckpointError(f"no readable fold checkpoint in {run_dir}")
    targets = metas[0]["target_columns"]
    for folder, meta in zip(folders, metas):
        if meta["target_columns"] != targets:
            raise CheckpointError(f"{folder} predicts {meta['target_columns']}, {folders[0]} predicts {targets}: "
                                  "folds of different runs cannot be averaged")
        if meta.get("model_type") != metas[0].get("model_type"):
            raise CheckpointError(f"{folder} is a {meta.get('model_type', 'transformer')} model, {folders[0]} a "
                                  f"{metas[0].get('model_type', 'transformer')} one: folds of different runs "
                                  "cannot be averaged")
    if metas[0].get("model_type") == "tfidf_ridge":
        from foldtune.models.tfidf_ridge import predict_tfidf_folds

        if fold_weights is not None:
            raise ValueError(f"{run_dir} is a tfidf_ridge run: its folds are averaged equally (no fold weights)")
        return predict_tfidf_folds(folders, texts), {**metas[0], "n_folds": len(folders)}
    check_same_tokenizer(folders)
    device_ = resolve_device(device)
    precision_ = inference_precision(precision, device_)
    tokenizer = AutoTokenizer.from_pretrained(str(folders[0]))
    run_cfg = load_config(folders[0] / CONFIG_FILE)
    data = run_cfg.data                                   # cut texts as training did
    # A fused attention compiles per width: round widths up as training did.
    # flex compiles a kernel per width: the widths it trained with (training.pad_to_multiple_of)
    pad_multiple = ((run_cfg.training.pad_to_multiple_of or STATIC_PAD_MULTIPLE)
                    if run_cfg.model.attention == "flex" and fused_on(device_) else 1)
    max_len = max_len or data.max_len
    check_max_len(load_backbone_config(folders[0]), max_len)
    data = dataclasses.replace(data, max_len=max_len)     # windows: of max_len tokens too
    windows = Windows.of(tokenizer, data)
    dataset = TextDataset(encode_data(tokenizer, list(texts), data).input_ids)
    weight_of = dict(zip(expected, fold_weights if fold_weights is not None else np.ones(len(expected))))
    # per fold: the sum of its checkpoints' predictions (its seeds'), and how many were read
    fold_sums: dict[int, np.ndarray] = {}
    fold_counts: dict[int, int] = {}
    for folder in folders:
        fold = checkpoint_fold(run_dir, folder)
        try:
            model, _ = load_checkpoint(folder, device_)
        except CheckpointError as err:
            if not allow_missing_folds:
                raise
            log.warning("%s: left out of the average", err)
            continue
        preds = predict(model, dataset, batch_size, tokenizer.pad_token_id, device_, precision_, pad_multiple,
                        windows)
        fold_sums[fold] = fold_sums[fold] + preds if fold in fold_sums else preds.astype(np.float64)
        fold_counts[fold] = fold_counts.get(fold, 0) + 1
        log.info("predicted %d texts with %s", len(texts), folder)
        del model
    if not fold_sums:
        raise CheckpointError(f"no readable fold checkpoint in {run_dir}")
    total = np.zeros((len(texts), len(targets)), dtype=np.float64)
    used = 0.0
    for fold, fold_sum in fold_sums.items():
        total += weight_of[fold] * (fold_sum / fold_counts[fold])
        used += weight_of[fold]
    if used <= 0:
        raise ValueError(f"fold weights of {run_dir}: the folds that could be read all have weight zero")
    return (total / used).astype(np.float32), {**metas[0], "n_folds": len(fold_sums),
                                               "n_models": sum(fold_counts.values())}


def run_target_columns(run_dir: str | Path, allow_missing_folds: bool = False) -> list[str]:
    """The targets a run predicts, read from its first fold checkpoint (nothing loaded;
    the folds left out are named once, by predict_run)."""
    folders, _ = _finished_checkpoints(Path(run_dir), allow_missing_folds, None)
    return list(read_meta(folders[0])["target_columns"])


def predict_runs(run_dirs: Sequence[str | Path], texts: Sequence[str], weights=None,
                 batch_size: int | None = None, device: str = "auto", precision: str = "auto",
                 allow_missing_folds: bool = False, max_len: int | None = None,
                 fold_weights: Sequence[Sequence[float] | None] | None = None) -> tuple[np.ndarray, dict]:
    """The weighted average of several runs' fold-averaged predictions.

    weights: one per run (default: equal), or a runs x targets matrix of per-target
    blend weights; each target's weights are normalised to sum to one. Every run must
    predict the same targets in the same order; each reads the texts with its own
    tokenizer and truncation. batch_size None: each run's training.eval_batch_size.
    fold_weights: None, or one entry (None or a weight per fold) per run.
    """
    run_dirs = [Path(r) for r in run_dirs]
    if not run_dirs:
        raise ValueError("no run to predict with")
    targets = run_target_columns(run_dirs[0], allow_missing_folds)
    for run_dir in run_dirs[1:]:
        other = run_target_columns(run_dir, allow_missing_folds)
        if other != targets:
            raise ValueError(f"runs with different target columns cannot be averaged: {run_dirs[0]} predicts "
                             f"{targets}, {run_dir} predicts {other}")
    weights = normalized_weights(np.ones(len(run_dirs)) if weights is None else weights, len(run_dirs),
                                 f"run weights (one per run: {len(run_dirs)})")
    if weights.ndim == 2 and weights.shape[1] != len(targets):
        raise ValueError(f"per-target run weights need one column per target ({len(targets)}: "
                         f"{', '.join(targets)}), got {weights.shape[1]}")
    fold_weights = [None] * len(run_dirs) if fold_weights is None else list(fold_weights)
    if len(fold_weights) != len(run_dirs):
        raise ValueError(f"fold weights: {len(fold_weights)} list(s) given for {len(run_dirs)} run(s); "
                         "give one per run, in the order of the runs")
    total = np.zeros((len(texts), len(targets)), dtype=np.float64)
    metas = []
    for run_dir, weight, folds_w in zip(run_dirs, weights, fold_weights):
        size = batch_size or load_config(run_dir / "config.yaml").training.eval_batch_size
        preds, meta = predict_run(run_dir, texts, size, device, precision, allow_missing_folds, max_len, folds_w)
        total += weight * preds
        metas.append(meta)
    lows, highs = zip(*(m["target_range"] for m in metas))
    return total.astype(np.float32), {**metas[0], "n_folds": sum(m["n_folds"] for m in metas),
                                      "target_range": [min(lows), max(highs)], "weights": weights.tolist()}


def write_submission(path: str | Path, ids: Sequence[str], preds: np.ndarray, target_columns: Sequence[str],
                     id_column: str) -> pd.DataFrame:
    """Check the submission (submission_frame) and write it atomically; a failed check writes nothing."""
    frame = submission_frame(ids, preds, target_columns, id_column)
    remove_orphans(Path(path).parent, Path(path).name)     # the temporaries of an earlier, killed write
    atomic_write_csv(path, frame)
    return frame


def submission_frame(ids: Sequence, preds: np.ndarray, target_columns: Sequence[str], id_column: str) -> pd.DataFrame:
    """The id column and the targets, checked: one row per id, a column per target, finite values."""
    if len(ids) != len(preds) or len(set(ids)) != len(ids):
        raise ValueError(f"submission needs one row per id: {len(ids)} ids ({len(set(ids))} distinct), "
                         f"{len(preds)} prediction rows")
    if preds.ndim != 2 or preds.shape[1] != len(target_columns):
        raise ValueError(f"submission needs {len(target_columns)} target columns "
                         f"({', '.join(target_columns)}), the predictions have shape {preds.shape}")
    if not np.isfinite(preds).all():
        bad = int((~np.isfinite(preds)).any(axis=1).sum())
        raise ValueError(f"predictions of {bad} row(s) are NaN or infinite; the submission was not written")
    frame = pd.DataFrame(preds, columns=list(target_columns))
    frame.insert(0, id_column, list(ids))
    return frame


def clip_range(data: DataConfig, meta: dict) -> tuple[float, float]:
    """Where predictions are clipped: the config's declared data.target_range if it has
    one, else the range the training targets spanned (the fold checkpoints' metadata)."""
    low, high = data.target_range or meta["target_range"]
    return low, high


def predict_clipped(run_dirs: Sequence[str | Path], texts: Sequence[str], clip: bool = True, weights=None,
                    batch_size: int | None = None, device: str = "auto", precision: str = "auto",
                    allow_missing_folds: bool = False, max_len: int | None = None,
                    fold_weights: Sequence[Sequence[float] | None] | None = None) -> tuple[np.ndarray, dict]:
    """predict_runs, clipped to clip_range of the first run's config (clip False: raw);
    the metadata's "clip_range" says where (None when not clipped)."""
    cfg = load_config(Path(run_dirs[0]) / "config.yaml")
    preds, meta = predict_runs(run_dirs, texts, weights, batch_size, device, precision, allow_missing_folds, max_len,
                               fold_weights)
    if not clip:
        return preds, {**meta, "clip_range": None}
    low, high = clip_range(cfg.data, meta)
    return np.clip(preds, low, high), {**meta, "clip_range": (low, high)}


def run_inference(run_dir: str | Path | Sequence[str | Path], test_file: str | Path | None, out: str | Path | None,
                  batch_size: int | None = None, clip: bool = True, device: str = "auto",
                  allow_missing_folds: bool = False, weights=None,
                  fold_weights: Sequence[Sequence[float] | None] | None = None, max_len: int | None = None,
                  precision: str = "auto") -> Path:
    """The whole of `infer.py`: read the test file, predict with every fold of every
    run, average (with `weights`, see predict_runs), write the CSV.

    The first run's config names the test file (by default), its columns and the
    default output (<run>/submission.csv).
    """
    run_dirs = [Path(run_dir)] if isinstance(run_dir, (str, Path)) else [Path(r) for r in run_dir]
    if not run_dirs:
        raise ValueError("no run to predict with")
    for folder in run_dirs:
        problem = path_problem(folder, "a run folder")
        if problem is not None:
            raise ConfigError(f"--run: {problem}")
    cfg = load_config(run_dirs[0] / "config.yaml")
    test = _read_test(test_file, run_dirs[0], cfg.data)
    started = time.perf_counter()
    preds, meta = predict_clipped(run_dirs, test[cfg.data.text_column].tolist(), clip, weights, batch_size, device,
                                  precision, allow_missing_folds, max_len, fold_weights)
    _log_speed(len(test), time.perf_counter() - started,
               f"{meta['n_folds']} fold(s) of {', '.join(map(str, run_dirs))}")
    out = Path(out) if out else run_dirs[0] / "submission.csv"
    write_submission(out, test[cfg.data.id_column].tolist(), preds, meta["target_columns"], cfg.data.id_column)
    clipped = meta["clip_range"]
    log.info("wrote %s: %d rows, %d run(s), %d fold(s) averaged%s", out, len(test), len(run_dirs), meta["n_folds"],
             f", clipped to [{clipped[0]:g}, {clipped[1]:g}]" if clipped else "")
    return out


def _read_test(test_file: str | Path | None, run_dir: Path, data: DataConfig) -> pd.DataFrame:
    """The rows to predict: --test's file, else the one the run's config names; a file
    that is absent is named with its absolute path and where it was named."""
    from foldtune.data.validate import load_test

    named_by = "--test"
    if not test_file:
        if data.test_file is None:
            raise ValueError(f"no test file given and {run_dir}/config.yaml names none: pass --test FILE")
        test_file, named_by = data.test_file, f"data.test_file of {run_dir / 'config.yaml'} (no --test given)"
    problem = path_problem(test_file, "a CSV file")
    if problem is not None:
        raise ConfigError(f"{named_by}: {problem}")
    return load_test(test_file, data)


def _log_speed(n_texts: int, seconds: float, what: str) -> None:
    log.info("predicted %d texts with %s in %.1f s (%.1f s per 1,000 texts; tokenizing and loading included)",
             n_texts, what, seconds, 1000 * seconds / max(n_texts, 1))


def _member_predictions(runs: Sequence[Path], cfgs: Sequence, texts: Sequence[str], targets: Sequence[str],
                        source: str | Path, batch_size: int | None, device: str) -> list[tuple[np.ndarray, dict]]:
    """Each member run's fold average for `texts` and its metadata, raw; a run predicting
    other targets than `source` (a blend or stack file) expects is refused."""
    from foldtune.blend import EnsembleError

    members = []
    for run, cfg in zip(runs, cfgs):
        member_started = time.perf_counter()
        preds, meta = predict_run(run, texts, batch_size or cfg.training.eval_batch_size, device)
        if meta["target_columns"] != list(targets):
            raise EnsembleError(f"{run} predicts {meta['target_columns']}, {source} expects {list(targets)}")
        members.append((preds, meta))
        _log_speed(len(texts), time.perf_counter() - member_started, f"{meta['n_folds']} fold(s) of {run}")
    return members


def run_blend_inference(blend_file: str | Path, test_file: str | Path | None, out: str | Path | None,
                        batch_size: int | None = None, clip: bool = True, device: str = "auto") -> Path:
    """`infer.py --blend`: each member run's fold average (clipped as `infer.py --run`
    clips it), then per target the weighted sum with the blend file's weights. A stack
    (a folder, or its stack.json) goes to run_stack_inference."""
    from foldtune.blend import apply_weights, blend_weights, read_blend
    from foldtune.stack import is_stack

    if is_stack(blend_file):
        return run_stack_inference(blend_file, test_file, out, batch_size, clip, device)
    blend, runs = read_blend(blend_file)
    cfgs = [load_config(run / "config.yaml") for run in runs]
    data = cfgs[0].data
    test = _read_test(test_file, runs[0], data)
    texts = test[data.text_column].tolist()
    members = []
    started = time.perf_counter()
    for cfg, (preds, meta) in zip(cfgs, _member_predictions(runs, cfgs, texts, blend["target_columns"], blend_file,
                                                              batch_size, device)):
        members.append(np.clip(preds, *clip_range(cfg.data, meta)) if clip else preds)
    blended = apply_weights(np.stack(members), blend_weights(blend)).astype(np.float32)
    _log_speed(len(texts), time.perf_counter() - started, f"the blend of {len(runs)} runs")
    out = Path(out) if out else Path(blend_file).with_name("submission.csv")
    write_submission(out, test[data.id_column].tolist(), blended, blend["target_columns"], data.id_column)
    log.info("wrote %s: %d rows, %d runs blended with the weights of %s", out, len(test), len(runs), blend_file)
    return out


def run_stack_inference(stack_path: str | Path, test_file: str | Path | None, out: str | Path | None,
                        batch_size: int | None = None, clip: bool = True, device: str = "auto") -> Path:
    """`infer.py --blend STACK`: each member run's fold average, raw (the stack was fitted
    on raw OOF predictions), the test texts' statistics, the stack's model per target;
    the result clipped as `infer.py --run` clips the first member's predictions."""
    from foldtune.stack import read_stack

    stack = read_stack(stack_path)
    cfgs = [load_config(run / "config.yaml") for run in stack.runs]
    data = cfgs[0].data
    test = _read_test(test_file, stack.runs[0], data)
    texts = test[data.text_column].tolist()
    started = time.perf_counter()
    members = _member_predictions(stack.runs, cfgs, texts, stack.target_columns, stack_path, batch_size, device)
    preds = stack.predict(np.stack([p for p, _ in members]), texts)
    if clip:
        preds = np.clip(preds, *clip_range(data, members[0][1]))
    _log_speed(len(texts), time.perf_counter() - started, f"the stack of {len(stack.runs)} runs")
    out = Path(out) if out else stack.folder / "submission.csv"
    write_submission(out, test[data.id_column].tolist(), preds.astype(np.float32), stack.target_columns,
                     data.id_column)
    log.info("wrote %s: %d rows, %d runs stacked by the %s models of %s", out, len(test), len(stack.runs),
             stack.record["model"], stack_path)
    return out
