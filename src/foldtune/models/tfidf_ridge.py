"""The classical member of a blend: TF-IDF n-grams and ridge regression (model.type: tfidf_ridge).

A run of this type has the layout of a transformer run (config.yaml, run.json,
folds.csv, oof.csv, scores.json, fold_k/{best/, oof.csv, metrics.csv, result.json}) on
the same folds machinery, so it joins a blend like any other run. Each fold's `best/`
holds the fitted model as data, nothing that runs code when loaded:

    model.safetensors   each vectorizer's idf ("word.idf", "char.idf"), the ridge's
                        "ridge.coef" (targets x features) and "ridge.intercept" (float64)
    tfidf.json          each vectorizer's name, transform settings and vocabulary (term -> column)
    foldtune.yaml       the resolved config
    foldtune.json       fold, targets, scores; the SHA-256 of the two files above

`infer.py --run` averages the folds. A model.joblib of an older foldtune (a pickle,
which can run any code) is refused, never loaded.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import scipy.sparse
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import Ridge
from sklearn.pipeline import FeatureUnion, Pipeline

from foldtune import __version__
from foldtune.checkpoint import CONFIG_FILE, WEIGHTS_FILE, CheckpointError, read_meta, verify_files, write_meta
from foldtune.config import Config, TfidfConfig, dump_config
from foldtune.files import atomic_directory, atomic_write_csv
from foldtune.metrics import score_report
from foldtune.run_layout import BEST_DIR, OOF_FILE, FoldResult, fold_dir, oof_frame, write_fold_result

log = logging.getLogger("foldtune")

MODEL_TYPE = "tfidf_ridge"
VECTORIZERS_FILE = "tfidf.json"
PICKLE_FILE = "model.joblib"        # what foldtune wrote before: refused
# What a fitted TfidfVectorizer's transform() depends on besides its vocabulary and idf
# (min_df, max_df, max_features and smooth_idf act in fit only; input is always the text).
TRANSFORM_SETTINGS = ("analyzer", "ngram_range", "lowercase", "strip_accents", "token_pattern", "stop_words",
                      "encoding", "decode_error", "binary", "norm", "use_idf", "sublinear_tf")


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
    """Write the fitted pipeline as arrays and JSON (see the module doc), and its config and meta."""
    arrays, vectorizers = {}, []
    for name, vectorizer in pipeline.named_steps["tfidf"].transformer_list:
        settings = vectorizer.get_params()
        vectorizers.append({"name": name, "settings": {key: settings[key] for key in TRANSFORM_SETTINGS},
                            "vocabulary": {term: int(column) for term, column in vectorizer.vocabulary_.items()}})
        arrays[f"{name}.idf"] = np.asarray(vectorizer.idf_, dtype=np.float64)
    ridge = pipeline.named_steps["ridge"]
    arrays["ridge.coef"] = np.atleast_2d(np.asarray(ridge.coef_, dtype=np.float64))
    arrays["ridge.intercept"] = np.atleast_1d(np.asarray(ridge.intercept_, dtype=np.float64))
    with atomic_directory(folder) as tmp:
        save_file(arrays, str(tmp / WEIGHTS_FILE), metadata={"format": "np"})
        (tmp / VECTORIZERS_FILE).write_text(json.dumps(vectorizers, ensure_ascii=False) + "\n", encoding="utf-8")
        (tmp / CONFIG_FILE).write_text(dump_config(cfg), encoding="utf-8")
        write_meta(tmp, meta, [WEIGHTS_FILE, VECTORIZERS_FILE])


class TfidfRidge:
    """A fold's fitted model rebuilt from its arrays: the vectorizers' features side by side
    (as FeatureUnion stacks them), times the ridge's coefficients, plus its intercept."""

    def __init__(self, vectorizers: list[TfidfVectorizer], coef: np.ndarray, intercept: np.ndarray):
        self.vectorizers, self.coef, self.intercept = vectorizers, coef, intercept

    def predict(self, texts: Sequence[str]) -> np.ndarray:
        features = scipy.sparse.hstack([v.transform(list(texts)) for v in self.vectorizers]).tocsr()
        return np.asarray(features @ self.coef.T) + self.intercept


def load_model(folder: Path) -> TfidfRidge:
    """The fold's model, from the arrays and JSON that save_model wrote, once their SHA-256
    matches foldtune.json's. Nothing is unpickled."""
    folder = Path(folder)
    meta = read_meta(folder)
    run_dir = folder.parent.parent
    if not (folder / WEIGHTS_FILE).is_file() and (folder / PICKLE_FILE).is_file():
        raise CheckpointError(f"{folder / PICKLE_FILE} is a pickle written by an older foldtune; foldtune no longer "
                              f"loads pickles (one can run any code): retrain the run with python train.py "
                              f"--resume {run_dir}")
    for name in (WEIGHTS_FILE, VECTORIZERS_FILE):
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder / name} is missing; retrain the run with python train.py --resume {run_dir}")
    verify_files(folder, meta)
    try:
        arrays = load_file(str(folder / WEIGHTS_FILE))
        vectorizers = []
        for spec in json.loads((folder / VECTORIZERS_FILE).read_text(encoding="utf-8")):
            settings = {key: spec["settings"][key] for key in TRANSFORM_SETTINGS}    # no other: input stays text
            settings["ngram_range"] = tuple(settings["ngram_range"])
            vectorizer = TfidfVectorizer(**settings, vocabulary=spec["vocabulary"], dtype=np.float64)  # as fitted
            vectorizer.idf_ = arrays[f"{spec['name']}.idf"]
            vectorizers.append(vectorizer)
        coef, intercept = arrays["ridge.coef"], arrays["ridge.intercept"]
    except (SafetensorError, OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError,
            ValueError) as err:
        raise CheckpointError(f"{folder} cannot be read ({type(err).__name__}: {err}); retrain the run with "
                              f"python train.py --resume {run_dir}") from None
    n_features = sum(len(v.vocabulary_) for v in vectorizers)
    if coef.shape != (len(intercept), n_features):
        raise CheckpointError(f"{folder / WEIGHTS_FILE}: ridge.coef has shape {coef.shape}, expected "
                              f"({len(intercept)}, {n_features}) for the vocabularies of {folder / VECTORIZERS_FILE}")
    return TfidfRidge(vectorizers, coef, intercept)


def train_tfidf_folds(cfg: Config, run_dir: Path, frame: pd.DataFrame, fold_of: np.ndarray,
                      folds: Sequence[int], pseudo=None, before_fold: Callable[[int], None] | None = None):
    """Fit each fold's pipeline on the other folds' rows (and on pseudo's texts with the fold's
    targets for them: foldtune.pseudo); write its files; return the results. before_fold is
    called with each fold before it is fitted (the caller stops a run there on a signal)."""
    names = list(cfg.data.target_columns)
    texts = frame[cfg.data.text_column].to_numpy(dtype=object)
    ids = frame[cfg.data.id_column].to_numpy()
    targets = frame[names].to_numpy(dtype=np.float64)
    results = {}
    for fold in folds:
        if before_fold is not None:
            before_fold(fold)
        started = time.perf_counter()
        folder = fold_dir(run_dir, fold)
        train_idx, valid_idx = np.flatnonzero(fold_of != fold), np.flatnonzero(fold_of == fold)
        fit_texts, fit_targets = list(texts[train_idx]), targets[train_idx]
        if pseudo is not None:
            fit_texts, fit_targets = fit_texts + pseudo.texts, np.concatenate([fit_targets, pseudo.targets[fold]])
        pipeline = build_tfidf_ridge(cfg.tfidf, cfg.training.seed).fit(fit_texts, fit_targets)
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
        save_model(folder / BEST_DIR, pipeline, cfg, meta)
        atomic_write_csv(folder / OOF_FILE, oof_frame(ids[valid_idx], fold, preds, names, cfg.data.id_column))
        row = {"step": 1, "epoch": 1.0, "lr": float("nan"), "train_loss": train_loss, "val_mcrmse": report["mcrmse"]}
        row.update({f"val_{t}": v for t, v in report["per_target"].items()})
        row["best"] = "trained"
        atomic_write_csv(folder / "metrics.csv", pd.DataFrame([row]))
        result = FoldResult(fold, report["mcrmse"], report["per_target"], 1, preds.astype(np.float32), valid_idx,
                            folder / BEST_DIR, seconds)
        write_fold_result(folder, result)
        log.info("fold %d: %d train%s / %d valid rows, %d n-gram features, valid MCRMSE %.4f (%.1f s)", fold,
                 len(train_idx), "" if pseudo is None else f" + {len(pseudo)} pseudo-labelled", len(valid_idx),
                 n_features, report["mcrmse"], seconds)
        results[fold] = result
    return results


def predict_tfidf_folds(folders: Sequence[Path], texts: Sequence[str]) -> np.ndarray:
    """The average of the folds' models' predictions for `texts`."""
    total = None
    for folder in folders:
        preds = np.asarray(load_model(folder).predict(list(texts)), dtype=np.float64)
        preds = preds.reshape(len(texts), -1)
        total = preds if total is None else total + preds
        log.info("predicted %d texts with %s", len(texts), folder)
    return (total / len(folders)).astype(np.float32)
