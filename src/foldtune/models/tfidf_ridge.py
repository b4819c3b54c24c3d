"""The classical member of a blend: TF-IDF n-grams and ridge regression (model.type: tfidf_ridge).

A run of this type has the layout of a transformer run (config.yaml, run.json,
folds.csv, oof.csv, scores.json, fold_k/{best/, oof.csv, metrics.csv, result.json}) on
the same folds machinery, so it joins a blend like any other run. Each fold's `best/`
holds the fitted pipeline (model.joblib: a pickle, so load only runs you trust), the
resolved config and foldtune.json; `infer.py --run` averages the folds.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Sequence

import joblib
import numpy as np
import pandas as pd
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import Ridge
from sklearn.pipeline import FeatureUnion, Pipeline

from foldtune import __version__
from foldtune.checkpoint import CONFIG_FILE, META_FILE, CheckpointError
from foldtune.config import Config, TfidfConfig, dump_config
from foldtune.files import atomic_directory, atomic_write_csv, atomic_write_json
from foldtune.metrics import score_report

log = logging.getLogger("foldtune")

MODEL_TYPE = "tfidf_ridge"
MODEL_FILE = "model.joblib"


def build_tfidf_ridge(cfg: TfidfConfig, seed: int = 0) -> Pipeline:
    """Word and character n-gram TF-IDF side by side, then one ridge for every target."""
    common = dict(min_df=cfg.min_df, max_features=cfg.max_features, sublinear_tf=cfg.sublinear_tf,
                  dtype=np.float64)
    features = FeatureUnion([
        ("word", TfidfVectorizer(analyzer="word", ngram_range=tuple(cfg.word_ngram_range), **common)),
        ("char", TfidfVectorizer(analyzer="char_wb", ngram_range=tuple(cfg.char_ngram_range), **common)),
    ])
    return Pipeline([("tfidf", features), ("ridge", Ridge(alpha=cfg.alpha, random_state=seed))])


def save_model(folder: Path, pipeline: Pipeline, cfg: Config, meta: dict) -> None:
    for _, vectorizer in pipeline.named_steps["tfidf"].transformer_list:
        if hasattr(vectorizer, "stop_words_"):
            vectorizer.stop_words_ = None        # every pruned term: large, and not needed to predict
    with atomic_directory(folder) as tmp:
        joblib.dump(pipeline, tmp / MODEL_FILE)
        (tmp / CONFIG_FILE).write_text(dump_config(cfg), encoding="utf-8")
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def load_model(folder: Path) -> Pipeline:
    path = Path(folder) / MODEL_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; retrain this fold")
    try:
        return joblib.load(path)
    except Exception as err:       # a damaged pickle raises anything from EOFError to KeyError
        raise CheckpointError(f"{path} cannot be read ({type(err).__name__}: {err}); retrain this fold") from None


def train_tfidf_folds(cfg: Config, run_dir: Path, frame: pd.DataFrame, fold_of: np.ndarray,
                      folds: Sequence[int]):
    """Fit each fold's pipeline on the other folds' rows; write its files; return the results."""
    from foldtune.training.cross_validation import RESULT_FILE
    from foldtune.training.trainer import FoldResult

    names = list(cfg.data.target_columns)
    texts = frame[cfg.data.text_column].to_numpy(dtype=object)
    ids = frame[cfg.data.id_column].to_numpy()
    targets = frame[names].to_numpy(dtype=np.float64)
    results = {}
    for fold in folds:
        started = time.perf_counter()
        fold_dir = run_dir / f"fold_{fold}"
        train_idx, valid_idx = np.flatnonzero(fold_of != fold), np.flatnonzero(fold_of == fold)
        pipeline = build_tfidf_ridge(cfg.tfidf, cfg.training.seed).fit(list(texts[train_idx]), targets[train_idx])
        train_loss = float(np.mean((pipeline.predict(list(texts[train_idx])) - targets[train_idx]) ** 2))
        preds = pipeline.predict(list(texts[valid_idx])).reshape(len(valid_idx), len(names))
        report = score_report(targets[valid_idx], preds, names)
        seconds = time.perf_counter() - started
        n_features = sum(len(v.vocabulary_) for _, v in pipeline.named_steps["tfidf"].transformer_list)
        meta = {
            "model_type": MODEL_TYPE, "fold": fold, "step": 1, "val_mcrmse": report["mcrmse"],
            "val_per_target": report["per_target"], "target_columns": names,
            "target_range": [float(targets[train_idx].min()), float(targets[train_idx].max())],
            "n_features": n_features, "foldtune_version": __version__,
        }
        save_model(fold_dir / "best", pipeline, cfg, meta)
        oof = pd.DataFrame(preds, columns=names)
        oof.insert(0, "fold", fold)
        oof.insert(0, cfg.data.id_column, ids[valid_idx])
        atomic_write_csv(fold_dir / "oof.csv", oof)
        row = {"step": 1, "epoch": 1.0, "lr": float("nan"), "train_loss": train_loss, "val_mcrmse": report["mcrmse"]}
        row.update({f"val_{t}": v for t, v in report["per_target"].items()})
        row["best"] = "trained"
        atomic_write_csv(fold_dir / "metrics.csv", pd.DataFrame([row]))
        atomic_write_json(fold_dir / RESULT_FILE, {"fold": fold, "mcrmse": report["mcrmse"],
                                                   "per_target": report["per_target"], "best_step": 1,
                                                   "seconds": seconds})
        log.info("fold %d: %d train / %d valid rows, %d n-gram features, valid MCRMSE %.4f (%.1f s)", fold,
                 len(train_idx), len(valid_idx), n_features, report["mcrmse"], seconds)
        results[fold] = FoldResult(fold, report["mcrmse"], report["per_target"], 1, preds.astype(np.float32),
                                   valid_idx, fold_dir / "best", seconds)
    return results


def predict_tfidf_folds(folders: Sequence[Path], texts: Sequence[str]) -> np.ndarray:
    """The average of the folds' pipelines' predictions for `texts`."""
    total = None
    for folder in folders:
        preds = np.asarray(load_model(folder).predict(list(texts)), dtype=np.float64)
        preds = preds.reshape(len(texts), -1)
        total = preds if total is None else total + preds
        log.info("predicted %d texts with %s", len(texts), folder)
    return (total / len(folders)).astype(np.float32)
