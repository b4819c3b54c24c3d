"""train.py then infer.py through their command lines, on a tiny DeBERTa-v2 built locally."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from foldtune.data.demo import make_demo
from foldtune.metrics import column_rmse

REPO = Path(__file__).resolve().parents[1]
TARGETS = ["cohesion", "syntax", "vocabulary", "phraseology", "grammar", "conventions"]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained_run(tiny_deberta, tmp_path_factory):
    work = tmp_path_factory.mktemp("e2e")
    train, test = make_demo(n_train=40, n_test=10, seed=3)
    train.insert(1, "prompt", "demo")             # an extra column the pipeline must ignore
    train.to_csv(work / "train.csv", index=False)
    test.to_csv(work / "test.csv", index=False)
    (work / "tiny.yaml").write_text(
        "data:\n  train_file: train.csv\n  test_file: test.csv\n  max_len: 64\n"
        f"folds:\n  n_splits: 2\nmodel:\n  name: {tiny_deberta}\n"
        "training:\n  epochs: 1\n  batch_size: 8\n  eval_batch_size: 16\n  lr: 1.0e-4\n  eval_steps: 2\n"
    )
    # options and overrides interleaved, as users type them
    result = _run([str(REPO / "train.py"), "training.warmup_ratio=0.2", "--config", "tiny.yaml", "--name", "tiny",
                   "training.seed=3"], work)
    assert result.returncode == 0, result.stderr
    return work, work / "runs" / "tiny", train, test, result


def test_train_writes_checkpoints_folds_oof_and_scores(trained_run):
    work, run, train, _, result = trained_run
    from foldtune.config import load_config

    resolved = load_config(run / "config.yaml")
    assert (resolved.training.warmup_ratio, resolved.training.seed, resolved.data.max_len) == (0.2, 3, 64)
    for fold in (0, 1):
        best = run / f"fold_{fold}" / "best"
        assert {"model.safetensors", "config.json", "tokenizer.json", "foldtune.yaml", "foldtune.json"} <= {
            p.name for p in best.iterdir()}
        meta = json.loads((best / "foldtune.json").read_text())
        assert meta["fold"] == fold and meta["target_columns"] == TARGETS
        metrics = pd.read_csv(run / f"fold_{fold}" / "metrics.csv")
        # about 20 rows at batch 8 -> 3 steps: evaluations at step 2 and at the epoch end (3)
        assert metrics["step"].tolist() == [2, 3]
        assert list(metrics.columns[:5]) == ["step", "epoch", "lr", "train_loss", "val_mcrmse"]
        assert meta["val_mcrmse"] == pytest.approx(metrics["val_mcrmse"].min())
        assert (run / f"fold_{fold}" / "train.log").read_text().count("valid MCRMSE") == 2

    folds = pd.read_csv(run / "folds.csv")
    assert folds["text_id"].tolist() == train["text_id"].tolist()
    sizes = np.bincount(folds["fold"])
    assert sizes.sum() == 40 and abs(sizes[0] - sizes[1]) <= 2

    oof = pd.read_csv(run / "oof.csv")
    assert list(oof.columns) == ["text_id", "fold"] + TARGETS
    assert sorted(oof["text_id"]) == sorted(train["text_id"])
    merged = oof.merge(folds, on="text_id", suffixes=("", "_assigned")).merge(train, on="text_id",
                                                                                suffixes=("", "_true"))
    assert (merged["fold"] == merged["fold_assigned"]).all()

    # scores.json agrees with the OOF file and the true targets, per fold and overall
    scores = json.loads((run / "scores.json").read_text())
    true = merged[[f"{t}_true" for t in TARGETS]].to_numpy()
    pred = merged[TARGETS].to_numpy()
    assert scores["oof"]["mcrmse"] == pytest.approx(column_rmse(true, pred).mean(), abs=1e-6)
    for fold in (0, 1):
        rows = (merged["fold"] == fold).to_numpy()
        assert scores["folds"][str(fold)]["mcrmse"] == pytest.approx(column_rmse(true[rows], pred[rows]).mean(),
                                                                     abs=1e-6)
    assert "OOF" in result.stderr and "MCRMSE" in result.stderr


def test_infer_writes_a_valid_fold_averaged_submission(trained_run):
    work, run, train, test, _ = trained_run
    result = _run([str(REPO / "infer.py"), "--run", str(run), "--test", "test.csv", "--out", "sub.csv"], work)
    assert result.returncode == 0, result.stderr
    sub = pd.read_csv(work / "sub.csv")
    assert list(sub.columns) == ["text_id"] + TARGETS
    assert sub["text_id"].tolist() == test["text_id"].tolist()
    values = sub[TARGETS].to_numpy()
    low, high = train[TARGETS].to_numpy().min(), train[TARGETS].to_numpy().max()
    assert values.min() >= low and values.max() <= high      # clipped to the training targets' range

    # the submission is the mean of the two folds' own predictions
    from foldtune.inference import predict_run

    unclipped, _ = predict_run(run, test["full_text"].tolist(), device="cpu")
    np.testing.assert_allclose(values, np.clip(unclipped, low, high), atol=1e-5)


def test_infer_defaults_to_the_latest_run_and_its_test_file(trained_run):
    work, run, _, test, _ = trained_run
    result = _run([str(REPO / "infer.py")], work)
    assert result.returncode == 0, result.stderr
    sub = pd.read_csv(run / "submission.csv")
    assert sub["text_id"].tolist() == test["text_id"].tolist()


def test_bad_input_fails_before_training_with_file_row_and_column(tiny_deberta, tmp_path):
    train, _ = make_demo(n_train=12, n_test=0, seed=1)
    train["grammar"] = train["grammar"].astype(object)
    train.loc[4, "grammar"] = "three"
    train.to_csv(tmp_path / "train.csv", index=False)
    result = _run([str(REPO / "train.py"), f"model.name={tiny_deberta}", "data.train_file=train.csv",
                   "data.test_file=null", "folds.n_splits=2"], tmp_path)
    assert result.returncode == 2
    assert "train.csv: 1 problem(s) found before training" in result.stderr
    assert f"column 'grammar': row 5 (id {train.loc[4, 'text_id']}): expected a number, found 'three'" in result.stderr
    assert not (tmp_path / "runs").exists()      # no run folder for a run that never started


def test_unknown_config_key_fails_at_once(tmp_path):
    result = _run([str(REPO / "train.py"), "training.learning_rate=1e-5"], tmp_path)
    assert result.returncode == 2
    assert "unknown config key 'training.learning_rate'" in result.stderr
    assert not (tmp_path / "runs").exists()
