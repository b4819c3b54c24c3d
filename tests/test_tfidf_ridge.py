"""The tfidf_ridge run type: the run layout, OOF equal to a direct scikit-learn fit on the
same fold rows, infer.py --run, and infer.py --blend over two such runs."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import tfidf_ridge_fit, train_two_tfidf_runs

from foldtune.checkpoint import CheckpointError
from foldtune.cli import infer_main
from foldtune.config import load_config
from foldtune.data.demo import make_demo
from foldtune.data.folds import assign_folds
from foldtune.ensemble import main as ensemble_main
from foldtune.models.tfidf_ridge import build_tfidf_ridge, load_model, save_model

TARGETS = ["cohesion", "syntax", "vocabulary", "phraseology", "grammar", "conventions"]


@pytest.fixture(scope="module")
def tfidf_runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("tfidf")
    train, test = train_two_tfidf_runs(work, seed=5, n_test=8, names=("ridge1", "ridge10"))
    return work, train, test


def test_tfidf_run_writes_the_run_layout_and_exact_oof(tfidf_runs):
    work, train, _ = tfidf_runs
    run = work / "runs" / "ridge1"
    assert {"config.yaml", "run.json", "folds.csv", "oof.csv", "scores.json"} <= {p.name for p in run.iterdir()}
    folds = pd.read_csv(run / "folds.csv")["fold"].to_numpy()
    y = train[TARGETS].to_numpy()
    assert (folds == assign_folds(y, 3, 42)).all()           # the folds machinery of every run
    oof = pd.read_csv(run / "oof.csv").set_index("text_id").loc[train.text_id]
    assert (oof["fold"].to_numpy() == folds).all()
    y = train[TARGETS].to_numpy()
    for fold in range(3):
        fold_dir = run / f"fold_{fold}"
        assert {"model.safetensors", "tfidf.json", "foldtune.json", "foldtune.yaml"} == {
            p.name for p in (fold_dir / "best").iterdir()}
        assert json.loads((fold_dir / "best" / "foldtune.json").read_text())["model_type"] == "tfidf_ridge"
        assert pd.read_csv(fold_dir / "metrics.csv")["step"].tolist() == [1]
        rows = folds == fold
        expected = tfidf_ridge_fit(train.full_text[~rows].tolist(), y[~rows], 1.0, (2, 4)).predict(
            train.full_text[rows].tolist())
        np.testing.assert_allclose(oof.loc[rows, TARGETS].to_numpy(), expected, atol=1e-5)
        np.testing.assert_allclose(pd.read_csv(fold_dir / "oof.csv")[TARGETS].to_numpy(), expected, atol=1e-5)
    scores = json.loads((run / "scores.json").read_text())
    rmse = np.sqrt(((oof[TARGETS].to_numpy() - y) ** 2).mean(axis=0))
    assert scores["oof"]["mcrmse"] == pytest.approx(rmse.mean(), abs=1e-6)
    # a ridge run ends with its report too, as every run does
    assert f"OOF MCRMSE **{scores['oof']['mcrmse']:.4f}**" in (run / "report.md").read_text()
    assert (run / "plots" / "oof_vs_true.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_infer_averages_the_folds_pipelines(tfidf_runs, capsys):
    work, train, test = tfidf_runs
    run = work / "runs" / "ridge1"
    assert infer_main(["--run", str(run), "--test", str(work / "test.csv"), "--out", str(work / "sub1.csv"),
                       "--no-clip"]) == 0
    sub = pd.read_csv(work / "sub1.csv")
    assert list(sub.columns) == ["text_id"] + TARGETS and sub.text_id.tolist() == test.text_id.tolist()
    folds = pd.read_csv(run / "folds.csv")["fold"].to_numpy()
    y = train[TARGETS].to_numpy()
    expected = np.mean([tfidf_ridge_fit(train.full_text[folds != k].tolist(), y[folds != k], 1.0, (2, 4)).predict(
        test.full_text.tolist()) for k in range(3)], axis=0)
    np.testing.assert_allclose(sub[TARGETS].to_numpy(), expected, atol=1e-5)


def test_infer_blend_is_the_weighted_sum_of_the_runs_submissions(tfidf_runs, monkeypatch):
    work, _, _ = tfidf_runs
    monkeypatch.chdir(work)                     # the runs name their test file relative to here
    r1, r10 = work / "runs" / "ridge1", work / "runs" / "ridge10"
    assert ensemble_main([str(r1), str(r10), "--out", str(work / "blend.json")]) == 0
    blend = json.loads((work / "blend.json").read_text())
    for run, out in ((r1, "s1.csv"), (r10, "s10.csv")):
        assert infer_main(["--run", str(run), "--out", str(work / out)]) == 0
    # the test file is the first run's; the submission lands beside the blend file
    assert infer_main(["--blend", str(work / "blend.json")]) == 0
    s1, s10 = pd.read_csv(work / "s1.csv"), pd.read_csv(work / "s10.csv")
    blended = pd.read_csv(work / "submission.csv")
    assert blended.text_id.tolist() == s1.text_id.tolist()
    for t in TARGETS:
        w1, w10 = blend["weights"][t]
        assert w1 + w10 == pytest.approx(1.0)
        np.testing.assert_allclose(blended[t], w1 * s1[t] + w10 * s10[t], atol=1e-6)
    # the targets' weights differ (one run for some, the other or a mix for others): a swap of the
    # members or of the targets inside the blend would show above
    assert len({tuple(w) for w in blend["weights"].values()}) > 1


def test_infer_blend_names_a_missing_blend_file(tfidf_runs, capsys):
    work, _, _ = tfidf_runs
    assert infer_main(["--blend", str(work / "nothere.json")]) == 2
    assert "blend file" in capsys.readouterr().err


def test_a_saved_fold_predicts_as_the_fitted_pipeline(tmp_path):
    train, test = make_demo(n_train=40, n_test=10, seed=3)
    cfg = load_config(None, ["model.type=tfidf_ridge", "tfidf.min_df=2", "tfidf.max_features=300",
                             "tfidf.char_ngram_range=[2,3]"])
    pipeline = build_tfidf_ridge(cfg.tfidf).fit(train.full_text.tolist(), train[TARGETS].to_numpy(dtype=float))
    save_model(tmp_path / "best", pipeline, cfg, {"model_type": "tfidf_ridge", "fold": 0})
    texts = test.full_text.tolist() + ["", "UPPER case, unseen-words: zyzzyva!"]
    expected = pipeline.predict(texts)
    got = load_model(tmp_path / "best").predict(texts)
    assert got.shape == (len(texts), len(TARGETS))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)


class _Payload:
    """A pickle that, when loaded, creates `marker`: what a hostile model.joblib could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_a_pickled_fold_is_refused_without_being_loaded(tfidf_runs, tmp_path, capsys):
    work, _, _ = tfidf_runs
    run = shutil.copytree(work / "runs" / "ridge1", tmp_path / "ridge1")
    marker = tmp_path / "pickle-was-loaded"
    best = run / "fold_0" / "best"
    for name in ("model.safetensors", "tfidf.json"):
        (best / name).unlink(missing_ok=True)       # (an older foldtune wrote model.joblib alone)
    (best / "model.joblib").write_bytes(pickle.dumps(_Payload(marker)))
    assert infer_main(["--run", str(run), "--test", str(work / "test.csv"), "--out", str(tmp_path / "s.csv")]) == 2
    assert (f"{best / 'model.joblib'} is a pickle written by an older foldtune; foldtune no longer loads pickles "
            f"(one can run any code): retrain the run with python train.py --resume {run}") in capsys.readouterr().err
    # a transformer checkpoint whose foldtune.json was edited to say tfidf_ridge, beside a pickle
    forged = tmp_path / "forged" / "fold_0" / "best"
    forged.mkdir(parents=True)
    (forged / "foldtune.json").write_text(json.dumps({"model_type": "tfidf_ridge", "fold": 0,
                                                      "target_columns": TARGETS}))
    (forged / "model.joblib").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError, match="is a pickle written by an older foldtune"):
        load_model(forged)
    assert not marker.exists() and not (tmp_path / "s.csv").exists()


def test_a_fold_changed_in_place_is_refused(tfidf_runs, tmp_path, capsys):
    work, _, _ = tfidf_runs
    run = shutil.copytree(work / "runs" / "ridge1", tmp_path / "ridge1")
    weights = run / "fold_1" / "best" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = np.random.default_rng(0).standard_normal(1024).astype(np.float32).tobytes()
    weights.write_bytes(bytes(data))
    assert infer_main(["--run", str(run), "--test", str(work / "test.csv"), "--out", str(tmp_path / "s.csv")]) == 2
    assert (f"fold 1: {weights} does not match the SHA-256 recorded when it was written (the file changed after it "
            f"was saved): retrain the fold with python train.py --resume {run}") in capsys.readouterr().err
    assert not (tmp_path / "s.csv").exists()


def test_a_stop_request_ends_a_tfidf_run_between_folds_and_resume_finishes_it(tfidf_runs, monkeypatch, capsys):
    """SIGTERM while fold 0 fits: the run ends after that fold with 143 and its resume command."""
    import signal

    from foldtune.cli import train_main
    from foldtune.models import tfidf_ridge
    from foldtune.training import stopping

    work, _, _ = tfidf_runs
    monkeypatch.chdir(work)

    def build_then_stop(*args, **kwargs):
        stopping.request_stop(signal.SIGTERM)       # as the handler does when the signal arrives
        return build_tfidf_ridge(*args, **kwargs)

    monkeypatch.setattr(tfidf_ridge, "build_tfidf_ridge", build_then_stop)
    try:
        assert train_main(["--config", "tfidf.yaml", "--name", "stopped"]) == 143
    finally:
        stopping.clear_stop_request()
    monkeypatch.setattr(tfidf_ridge, "build_tfidf_ridge", build_tfidf_ridge)
    run = work / "runs" / "stopped"
    assert (run / "fold_0" / "result.json").is_file() and not (run / "fold_1" / "result.json").exists()
    assert ("stopped by SIGTERM: the training state is saved. Continue with: python train.py --resume runs/stopped"
            in capsys.readouterr().err)
    assert train_main(["--resume", str(run)]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(run / "oof.csv"), pd.read_csv(work / "runs" / "ridge1" / "oof.csv"))
