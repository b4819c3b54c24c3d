"""The recipe config, and every technique at once, trained and read back by infer.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import assert_scores_match_oof
from foldtune.checkpoint import load_checkpoint, read_meta
from foldtune.config import load_config
from foldtune.data.dataset import TextDataset, encode_data
from foldtune.data.demo import make_demo
from foldtune.runtime.precision import resolve_device, resolve_precision
from foldtune.runtime.predict import predict

REPO = Path(__file__).resolve().parents[1]
TARGETS = ["cohesion", "syntax", "vocabulary", "phraseology", "grammar", "conventions"]

EVERY_TECHNIQUE = [
    "data.long_text=head_tail", "data.head_fraction=0.5",
    "model.pooling=weighted_layers", "model.pooling_layers=3",
    "model.head_dropout=0.2", "model.head_dropout_samples=4", "model.backbone_dropout=0.0",
    "model.reinit_layers=1", "model.freeze_embeddings=true", "model.freeze_layers=1",
    "model.gradient_checkpointing=true",
    "training.layerwise_lr_decay=0.8", "training.optimizer=madgrad", "training.lr=1e-3", "training.head_lr=1e-2",
    "training.loss=mcrmse", "training.target_weights=[1, 1, 2, 2, 1, 1]",
    "training.scheduler=linear", "training.warmup_steps=2", "training.max_grad_norm=1.0",
    "training.gradient_accumulation_steps=2", "training.eval_steps=2",
    "awp.enabled=true", "awp.start_epoch=1", "awp.direction=adam",
    "averaging.method=ema", "averaging.start_epoch=2", "averaging.ema_decay=0.5",
]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def essays(tmp_path_factory):
    work = tmp_path_factory.mktemp("techniques")
    train, test = make_demo(n_train=32, n_test=6, seed=4)
    train.to_csv(work / "train.csv", index=False)
    test.to_csv(work / "test.csv", index=False)
    return work, train, test


def _check_best_checkpoint(run: Path, fold: int) -> None:
    """The fold kept its lowest validation score, of the trained or the averaged weights,
    and scores.json gives the fold that score."""
    metrics = pd.read_csv(run / f"fold_{fold}" / "metrics.csv")
    meta = read_meta(run / f"fold_{fold}" / "best")
    trained, averaged = metrics["val_mcrmse"].min(), metrics["averaged_val_mcrmse"].min()
    assert meta["averaged_weights"] == (averaged < trained)
    assert meta["val_mcrmse"] == pytest.approx(min(trained, averaged), abs=1e-9)
    saved = metrics[metrics["best"].notna()].iloc[-1]          # the last evaluation that saved a checkpoint
    assert (saved["step"], saved["best"]) == (meta["step"], "averaged" if meta["averaged_weights"] else "trained")
    scores = json.loads((run / "scores.json").read_text())
    assert scores["folds"][str(fold)]["mcrmse"] == pytest.approx(meta["val_mcrmse"], abs=1e-9)


def _check_run(work: Path, run: Path, train: pd.DataFrame, test: pd.DataFrame) -> None:
    assert_scores_match_oof(run, train)
    cfg = load_config(run / "config.yaml")
    oof = pd.read_csv(run / "oof.csv").set_index("text_id")
    test_preds = []
    for fold in (0, 1):
        _check_best_checkpoint(run, fold)
        best = run / f"fold_{fold}" / "best"
        # the checkpoint kept is the one the fold's OOF predictions came from
        device = resolve_device(cfg.training.device)
        precision = resolve_precision(cfg.training.precision, device)
        model, _ = load_checkpoint(best, device)
        rows = oof[oof["fold"] == fold]
        texts = train.set_index("text_id").loc[rows.index, "full_text"].tolist()
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(best))
        data = TextDataset(encode_data(tokenizer, texts, cfg.data).input_ids)
        preds = predict(model, data, 8, tokenizer.pad_token_id, device, precision)
        # exact in fp32; under bf16 autocast other batch shapes round differently
        atol = 1e-5 if precision.dtype is None else 2e-2
        np.testing.assert_allclose(preds, rows[TARGETS].to_numpy(), atol=atol)
        test_data = TextDataset(encode_data(tokenizer, test["full_text"].tolist(), cfg.data).input_ids)
        test_preds.append(predict(model, test_data, 8, tokenizer.pad_token_id, device, precision))
    result = _run([str(REPO / "infer.py"), "--run", str(run), "--test", "test.csv", "--out", "sub.csv"], work)
    assert result.returncode == 0, result.stderr
    sub = pd.read_csv(work / "sub.csv")
    assert list(sub.columns) == ["text_id"] + TARGETS and sub["text_id"].tolist() == test["text_id"].tolist()
    # the folds' mean, clipped to the range of the training targets
    low, high = train[TARGETS].to_numpy().min(), train[TARGETS].to_numpy().max()
    np.testing.assert_allclose(sub[TARGETS].to_numpy(), np.clip(np.mean(test_preds, axis=0), low, high), atol=atol)


def test_the_deberta_recipe_file_trains_with_a_tiny_backbone(essays, tiny_deberta_4):
    work, train, test = essays
    result = _run([str(REPO / "train.py"), "--config", str(REPO / "configs" / "deberta_v3_base.yaml"),
                   "--name", "recipe", f"model.name={tiny_deberta_4}", "data.train_file=train.csv",
                   "data.test_file=test.csv", "data.max_len=64", "folds.n_splits=2", "training.eval_steps=3",
                   "model.attention=eager"], work)          # the recipe's fused attention trains on CUDA only
    assert result.returncode == 0, result.stderr
    run = work / "runs" / "recipe"
    cfg = load_config(run / "config.yaml")
    # the recipe's switches are what ran
    assert (cfg.model.reinit_layers, cfg.model.freeze_layers, cfg.model.gradient_checkpointing) == (1, 2, False)
    assert cfg.model.backbone_dropout == 0.0
    assert (cfg.awp.enabled, cfg.awp.start_epoch, cfg.averaging.method, cfg.averaging.start_epoch) == (True, 2, "swa", 4)
    assert (cfg.training.loss, cfg.training.layerwise_lr_decay, cfg.training.epochs) == ("smooth_l1", 0.8, 4)
    metrics = pd.read_csv(run / "fold_0" / "metrics.csv")
    assert metrics["epoch"].max() == 4.0
    # SWA averages in epoch 4 only: no averaged score before it, one at its end
    assert metrics.loc[metrics["epoch"] <= 3.0, "averaged_val_mcrmse"].isna().all()
    assert np.isfinite(metrics["averaged_val_mcrmse"].iloc[-1])
    _check_run(work, run, train, test)


def test_every_technique_at_once(essays, tiny_deberta_4):
    work, train, test = essays
    result = _run([str(REPO / "train.py"), "--config", str(REPO / "configs" / "deberta_v3_base.yaml"),
                   "--name", "everything", f"model.name={tiny_deberta_4}", "data.train_file=train.csv",
                   "data.test_file=test.csv", "data.max_len=64", "folds.n_splits=2", "training.epochs=3",
                   "model.attention=eager", *EVERY_TECHNIQUE], work)
    assert result.returncode == 0, result.stderr
    run = work / "runs" / "everything"
    metrics = pd.read_csv(run / "fold_1" / "metrics.csv")
    assert "averaged_val_mcrmse" in metrics.columns and np.isfinite(metrics["averaged_val_mcrmse"].iloc[-1])
    _check_run(work, run, train, test)
