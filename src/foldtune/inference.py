"""Predict with every fold checkpoint of a run, average the folds, write a submission."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from transformers import AutoTokenizer

from foldtune.checkpoint import CONFIG_FILE, META_FILE, CheckpointError, load_checkpoint, read_meta
from foldtune.config import load_config
from foldtune.data.collate import DynamicPadding, length_sorted_batches
from foldtune.data.dataset import TextDataset, encode_texts
from foldtune.files import atomic_write_csv
from foldtune.training.precision import Precision, resolve_device, resolve_precision

log = logging.getLogger("foldtune")


def fold_checkpoints(run_dir: str | Path, allow_missing: bool = False,
                     only: Sequence[int] | None = None) -> list[Path]:
    """The best checkpoint folder of every fold the run trains (or of the folds `only`),
    in fold order.

    A fold the run was asked to train (run.json) without a finished checkpoint stops
    inference, naming it; with allow_missing it is left out with a warning.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run folder {run_dir} does not exist")
    run_file = run_dir / "run.json"
    if run_file.is_file():
        expected = json.loads(run_file.read_text(encoding="utf-8"))["folds"]
    else:
        expected = sorted(int(p.parent.name.split("_")[1]) for p in run_dir.glob("fold_*/best"))
    if only is not None:
        absent = sorted(set(only) - set(expected))
        if absent:
            raise CheckpointError(f"{run_dir} did not train fold(s) {absent} (it has {expected})")
        expected = sorted(only)
    folders = [run_dir / f"fold_{f}" / "best" for f in expected]
    missing = [f for f, folder in zip(expected, folders) if not (folder / META_FILE).is_file()]
    if missing and not allow_missing:
        raise CheckpointError(f"fold(s) {missing} of {run_dir} have no finished checkpoint (fold_k/best): finish "
                              f"them with `python train.py --resume {run_dir}`, or pass --allow-missing-folds to "
                              "average the others")
    for fold in missing:
        log.warning("fold %d of %s has no checkpoint: left out of the average", fold, run_dir)
    folders = [folder for f, folder in zip(expected, folders) if f not in missing]
    if not folders:
        raise CheckpointError(f"{run_dir} holds no fold checkpoint (fold_*/best): has the run trained a fold?")
    return folders


def tokenizer_fingerprint(folder: Path) -> str:
    """SHA-256 of the tokenizer files a checkpoint folder holds."""
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.name.startswith(("tokenizer", "special_tokens", "vocab", "spm")) or path.suffix == ".model":
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def latest_run(runs_dir: str | Path = "runs") -> Path:
    """The most recently started run that has at least one fold checkpoint."""
    runs_dir = Path(runs_dir)
    candidates = [p.parent for p in runs_dir.glob("*/config.yaml") if any(p.parent.glob("fold_*/best"))]
    if not candidates:
        raise CheckpointError(f"no trained run under {runs_dir}/: run `python train.py` first, or pass --run")
    return max(candidates, key=lambda p: (p / "config.yaml").stat().st_mtime)


@torch.inference_mode()
def predict(model, dataset: TextDataset, batch_size: int, pad_token_id: int, device: torch.device,
            precision: Precision, pad_to_multiple_of: int = 1) -> np.ndarray:
    """Predictions in row order, from batches sorted by length (almost no padding).

    Leaves the model in eval mode.
    """
    model.eval()
    batches = length_sorted_batches(dataset.lengths, batch_size)
    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=DynamicPadding(pad_token_id, pad_to_multiple_of),
                        pin_memory=device.type == "cuda")
    out = None
    for rows, batch in zip(batches, loader):
        with precision.autocast():
            preds = model(batch["input_ids"].to(device, non_blocking=True),
                          batch["attention_mask"].to(device, non_blocking=True))
        preds = preds.float().cpu().numpy()
        if out is None:
            out = np.empty((len(dataset), preds.shape[1]), dtype=np.float32)
        out[rows] = preds
    return out


def predict_run(run_dir: str | Path, texts: Sequence[str], batch_size: int = 32, device: str = "auto",
                precision: str = "auto", allow_missing_folds: bool = False,
                folds: Sequence[int] | None = None) -> tuple[np.ndarray, dict]:
    """The fold-averaged predictions of a run (or of its folds `folds`) for `texts`, and
    the first fold's metadata."""
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

        return predict_tfidf_folds(folders, texts), {**metas[0], "n_folds": len(folders)}
    fingerprint = tokenizer_fingerprint(folders[0])
    for folder, meta in zip(folders, metas):
        if tokenizer_fingerprint(folder) != fingerprint:
            raise CheckpointError(f"{folder} was trained with another tokenizer than {folders[0]}: "
                                  "folds of different runs cannot be averaged")
    device_ = resolve_device(device)
    precision_ = resolve_precision(precision, device_)
    tokenizer = AutoTokenizer.from_pretrained(str(folders[0]))
    data = load_config(folders[0] / CONFIG_FILE).data     # cut texts as training did
    dataset = TextDataset(encode_texts(tokenizer, list(texts), data.max_len, data.truncation,
                                       data.head_fraction).input_ids)
    total = np.zeros((len(texts), len(targets)), dtype=np.float64)
    used = 0
    for folder in folders:
        try:
            model, _ = load_checkpoint(folder, device_)
        except CheckpointError as err:
            if not allow_missing_folds:
                raise
            log.warning("%s: left out of the average", err)
            continue
        total += predict(model, dataset, batch_size, tokenizer.pad_token_id, device_, precision_)
        used += 1
        log.info("predicted %d texts with %s", len(texts), folder)
        del model
    if used == 0:
        raise CheckpointError(f"no readable fold checkpoint in {run_dir}")
    return (total / used).astype(np.float32), {**metas[0], "n_folds": used}


def write_submission(path: str | Path, ids: Sequence[str], preds: np.ndarray, target_columns: Sequence[str],
                     id_column: str) -> pd.DataFrame:
    """Check the submission (one row per id, the id and target header, finite values)
    and write it atomically; a failed check writes nothing."""
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
    atomic_write_csv(path, frame)
    return frame


def run_inference(run_dir: str | Path, test_file: str | Path | None, out: str | Path | None,
                  batch_size: int | None = None, clip: bool = True, device: str = "auto",
                  allow_missing_folds: bool = False) -> Path:
    """The whole of `infer.py`: read the test file, predict with every fold, write the CSV."""
    from foldtune.data.validate import load_test

    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    test_file = test_file or cfg.data.test_file
    if test_file is None:
        raise ValueError(f"no test file given and {run_dir}/config.yaml names none: pass --test FILE")
    test = load_test(test_file, cfg.data)
    started = time.perf_counter()
    preds, meta = predict_run(run_dir, test[cfg.data.text_column].tolist(),
                              batch_size or cfg.training.eval_batch_size, device,
                              allow_missing_folds=allow_missing_folds)
    _log_speed(len(test), time.perf_counter() - started, f"{meta['n_folds']} fold(s) of {run_dir}")
    # the declared range if the config has one, else the range the training targets spanned
    low, high = cfg.data.target_range or meta["target_range"]
    if clip:
        preds = np.clip(preds, low, high)
    out = Path(out) if out else run_dir / "submission.csv"
    write_submission(out, test[cfg.data.id_column].tolist(), preds, meta["target_columns"], cfg.data.id_column)
    log.info("wrote %s: %d rows, %d fold(s) averaged%s", out, len(test), meta["n_folds"],
             f", clipped to [{low:g}, {high:g}]" if clip else "")
    return out


def _log_speed(n_texts: int, seconds: float, what: str) -> None:
    log.info("predicted %d texts with %s in %.1f s (%.1f s per 1,000 texts; tokenizing and loading included)",
             n_texts, what, seconds, 1000 * seconds / max(n_texts, 1))


def run_blend_inference(blend_file: str | Path, test_file: str | Path | None, out: str | Path | None,
                        batch_size: int | None = None, clip: bool = True, device: str = "auto") -> Path:
    """`infer.py --blend`: each member run's fold average (clipped as `infer.py --run`
    clips it), then per target the weighted sum with the blend file's weights."""
    from foldtune.data.validate import load_test
    from foldtune.ensemble import EnsembleError, apply_weights, blend_weights, read_blend

    blend, runs = read_blend(blend_file)
    cfgs = [load_config(run / "config.yaml") for run in runs]
    data = cfgs[0].data
    test_file = test_file or data.test_file
    if test_file is None:
        raise ValueError(f"no test file given and {runs[0]}/config.yaml names none: pass --test FILE")
    test = load_test(test_file, data)
    texts = test[data.text_column].tolist()
    members = []
    started = time.perf_counter()
    for run, cfg in zip(runs, cfgs):
        member_started = time.perf_counter()
        preds, meta = predict_run(run, texts, batch_size or cfg.training.eval_batch_size, device)
        if meta["target_columns"] != blend["target_columns"]:
            raise EnsembleError(f"{run} predicts {meta['target_columns']}, the blend {blend_file} expects "
                                f"{blend['target_columns']}")
        if clip:
            preds = np.clip(preds, *(cfg.data.target_range or meta["target_range"]))
        members.append(preds)
        _log_speed(len(texts), time.perf_counter() - member_started, f"{meta['n_folds']} fold(s) of {run}")
    blended = apply_weights(np.stack(members), blend_weights(blend)).astype(np.float32)
    _log_speed(len(texts), time.perf_counter() - started, f"the blend of {len(runs)} runs")
    out = Path(out) if out else Path(blend_file).with_name("submission.csv")
    write_submission(out, test[data.id_column].tolist(), blended, blend["target_columns"], data.id_column)
    log.info("wrote %s: %d rows, %d runs blended with the weights of %s", out, len(test), len(runs), blend_file)
    return out
