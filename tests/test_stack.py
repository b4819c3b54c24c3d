"""Stacking (foldtune ensemble --stack): the text statistics, the nested OOF of the level-2
models, the refusal of runs on other folds, the stack folder read back by infer.py --blend,
and the same stack from the same runs whatever the process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import train_two_tfidf_runs
from test_ensemble import fake_run

from foldtune.cli import infer_main
from foldtune.config import load_config, save_config
from foldtune.ensemble import EnsembleError, main as ensemble_main
from foldtune.inference import predict_run
from foldtune.metrics import mcrmse
from foldtune.stack import HGB_SETTINGS, RIDGE_ALPHAS, build_stack, read_stack
from foldtune.text_stats import leave_one_out_stats, stats_matrix, text_stats

SRC = Path(__file__).resolve().parents[1] / "src"
TARGETS = ["cohesion", "syntax", "vocabulary", "phraseology", "grammar", "conventions"]
CLIP = (2.7, 3.0)
STATS = ["text.chars", "text.words", "text.sentences", "text.mean_word_length", "text.type_token_ratio",
         "text.unknown_share"]


# --- text statistics ----------------------------------------------------------------------


@pytest.mark.parametrize(("text", "known", "expected"), [
    # 4 words of 2+3+3+3 letters, two sentences, all distinct, "how" and "you" unknown
    ("Hi. How are you?", {"hi", "are"}, [16, 4, 2, 2.75, 1.0, 0.5]),
    # apostrophes join a word and are not letters: I, don't, know, I, don't = 14 letters; 3 distinct;
    # "don't" unknown twice; the comma ends no sentence
    ("I don't know, I don't.", {"i", "know"}, [22, 5, 1, 2.8, 0.6, 0.4]),
    # case does not make a word new; no end punctuation is still one sentence; the typographic apostrophe
    ("It\u2019s  THE the end", {"it\u2019s", "the", "end"}, [17, 4, 1, 3.0, 0.75, 0.0]),
    # an abbreviation's dot ends a sentence (documented); a run of ?! ends one; digits are a word
    ("Mr. Smith wrote 42 pages?! Yes", set(), [30, 6, 3, 22 / 6, 1.0, 1.0]),
    ("", set(), [0, 0, 0, 0, 0, 0]),
    ("... !?", set(), [6, 0, 0, 0, 0, 0]),
])
def test_text_statistics_of_written_texts(text, known, expected):
    assert text_stats(text, known.__contains__) == pytest.approx(expected, abs=1e-15)
    np.testing.assert_array_equal(stats_matrix([text], known)[0], np.array(expected, dtype=np.float64))


def test_a_training_text_does_not_vouch_for_its_own_words():
    texts = ["a b", "a c", "a b", "a d e"]
    stats, vocabulary = leave_one_out_stats(texts, min_essays=2)
    # a is in 4 texts, b in 2, c, d and e in 1: the vocabulary (at least 2 texts) is a and b
    assert vocabulary == ["a", "b"]
    # but "a b" has b only from one other text: unknown to it, as to a text outside the four
    np.testing.assert_array_equal(stats[:, 5], [0.5, 0.5, 0.5, 2 / 3])
    np.testing.assert_array_equal(stats_matrix(["b c"], vocabulary)[:, 5], [0.5])
    np.testing.assert_array_equal(stats[:, :5], stats_matrix(texts, vocabulary)[:, :5])


# --- the nested fit, on runs with written OOF --------------------------------------------


@pytest.fixture
def three_fold_runs(tmp_path):
    """Two fake runs (targets a, b) on the same 3 folds of 45 essays of random words."""
    rng = np.random.default_rng(7)
    n = 45
    ids = [f"e{i:02d}" for i in range(n)]
    words = ["the", "student", "writes", "an", "essay", "about", "schools", "becuase", "thay", "like", "it"]
    texts = [". ".join(" ".join(rng.choice(words, rng.integers(3, 9))) for _ in range(rng.integers(1, 5))) + "."
             for _ in range(n)]
    y = rng.normal(3, 0.6, (n, 2)).round(1)
    pd.DataFrame({"id": ids, "text": texts, "a": y[:, 0], "b": y[:, 1]}).to_csv(tmp_path / "train.csv", index=False)
    folds = np.tile([0, 1, 2], n // 3)
    p1 = y + rng.normal(0, 0.3, y.shape)
    p2 = 0.5 * y + 1.5 + rng.normal(0, 0.3, y.shape)
    r1 = fake_run(tmp_path, "runs/one", tmp_path / "train.csv", ids, folds, p1)
    r2 = fake_run(tmp_path, "runs/two", tmp_path / "train.csv", ids, folds, p2)
    return tmp_path, (r1, r2), ids, texts, y, folds, (p1, p2)


def _by_hand_features(texts, p1, p2):
    stats, _ = leave_one_out_stats(texts)
    return np.column_stack([p1[:, 0], p1[:, 1], p2[:, 0], p2[:, 1], stats])


def test_each_folds_rows_are_predicted_by_a_ridge_fitted_on_the_other_folds(three_fold_runs, capsys):
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    root, (r1, r2), ids, texts, y, folds, (p1, p2) = three_fold_runs
    assert ensemble_main(["--stack", str(r1), str(r2), "--out", str(root / "stack")]) == 0
    stack = json.loads((root / "stack" / "stack.json").read_text())
    assert stack["features"] == ["member0.a", "member0.b", "member1.a", "member1.b", *STATS]
    assert stack["members"] == ["../runs/one", "../runs/two"]
    x = _by_hand_features(texts, p1, p2)
    oof = pd.read_csv(root / "stack" / "oof.csv", dtype={"id": str})
    assert oof["id"].tolist() == ids and (oof["fold"].to_numpy() == folds).all()

    def fitted(rows, t):
        return make_pipeline(StandardScaler(), RidgeCV(alphas=RIDGE_ALPHAS)).fit(x[rows], y[rows, t])

    for k in range(3):
        inside = folds == k
        for t, name in enumerate(["a", "b"]):
            np.testing.assert_allclose(oof.loc[inside, name], fitted(~inside, t).predict(x[inside]), rtol=0,
                                       atol=1e-12)
    # the model kept for the test texts: every OOF row
    for t, name in enumerate(["a", "b"]):
        whole = fitted(np.ones(len(ids), bool), t)
        model = stack["models"][name]
        assert model["alpha"] == whole[-1].alpha_
        np.testing.assert_allclose(model["coef"], whole[-1].coef_, rtol=0, atol=1e-12)
        np.testing.assert_allclose(model["mean"], whole[0].mean_, rtol=0, atol=1e-12)
    nested = oof[["a", "b"]].to_numpy()
    assert stack["scores"]["stack_nested_oof"]["mcrmse"] == pytest.approx(mcrmse(y, nested), abs=1e-12)
    assert stack["scores"]["members_oof"][str(r2)]["mcrmse"] == pytest.approx(mcrmse(y, p2), abs=1e-12)
    scores = json.loads((root / "stack" / "scores.json").read_text())
    assert scores["oof"] == stack["scores"]["stack_nested_oof"] and scores["n_rows"] == 45
    assert scores["folds"]["1"]["mcrmse"] == pytest.approx(mcrmse(y[folds == 1], nested[folds == 1]), abs=1e-12)
    printed = capsys.readouterr().out
    assert "stack (ridge), nested OOF" in printed and f"{mcrmse(y, nested):.4f}" in printed


@pytest.mark.parametrize("text_stats", [False, True])
def test_own_features_give_each_target_only_its_own_predictions(three_fold_runs, capsys, text_stats):
    """--features own: target t's ridge reads the members' predictions of t (and the statistics
    unless --no-text-stats), fold by fold and for the kept model, as infer.py reads it back."""
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    root, (r1, r2), ids, texts, y, folds, (p1, p2) = three_fold_runs
    flags = ["--features", "own"] + ([] if text_stats else ["--no-text-stats"])
    assert ensemble_main(["--stack", str(r1), str(r2), "--out", str(root / "own"), *flags]) == 0
    stack = json.loads((root / "own" / "stack.json").read_text())
    members = ["member0.a", "member0.b", "member1.a", "member1.b"]
    assert stack["features"] == members + (STATS if text_stats else [])
    assert (stack["feature_set"], stack["text_stats"]) == ("own", text_stats)
    stats = leave_one_out_stats(texts)[0]
    oof = pd.read_csv(root / "own" / "oof.csv")

    def x_of(t, stats_rows):
        own = np.column_stack([p1[:, t], p2[:, t]])
        return np.column_stack([own, stats_rows]) if text_stats else own

    def fitted(rows, t):
        return make_pipeline(StandardScaler(), RidgeCV(alphas=RIDGE_ALPHAS)).fit(x_of(t, stats)[rows], y[rows, t])

    for t, name in enumerate(["a", "b"]):
        for k in range(3):
            inside = folds == k
            np.testing.assert_allclose(oof.loc[inside, name], fitted(~inside, t).predict(x_of(t, stats)[inside]),
                                       rtol=0, atol=1e-12)
        whole = fitted(np.ones(len(ids), bool), t)
        assert len(stack["models"][name]["coef"]) == 2 + 6 * text_stats
        np.testing.assert_allclose(stack["models"][name]["coef"], whole[-1].coef_, rtol=0, atol=1e-12)
        # read back: new texts' predictions go through the same columns
        vocabulary = json.loads((root / "own" / "vocabulary.json").read_text())
        predicted = read_stack(root / "own").predict(np.stack([p1, p2]), texts)
        np.testing.assert_allclose(predicted[:, t], whole.predict(x_of(t, stats_matrix(texts, vocabulary))),
                                   rtol=0, atol=1e-12)
    assert len(vocabulary) == (11 if text_stats else 0)
    nested = oof[["a", "b"]].to_numpy()
    assert stack["scores"]["stack_nested_oof"]["mcrmse"] == pytest.approx(mcrmse(y, nested), abs=1e-12)
    assert "features: each target its own predictions of every member" in capsys.readouterr().out


def test_a_stack_written_before_the_feature_switches_reads_as_all_with_statistics(three_fold_runs):
    """stack.json without feature_set and text_stats (written by an older foldtune) predicts as it did."""
    root, runs, ids, texts, y, folds, (p1, p2) = three_fold_runs
    build_stack(runs, root / "old")
    before = read_stack(root / "old").predict(np.stack([p1, p2]), texts)
    file = root / "old" / "stack.json"
    record = json.loads(file.read_text())
    del record["feature_set"], record["text_stats"]
    file.write_text(json.dumps(record))
    np.testing.assert_array_equal(read_stack(root / "old").predict(np.stack([p1, p2]), texts), before)
    record["feature_set"] = "mine"
    file.write_text(json.dumps(record))
    with pytest.raises(EnsembleError, match=r"its feature_set 'mine' is not one of all, own; write the stack again"):
        read_stack(root / "old")


def test_hgb_folds_are_fitted_on_the_other_folds_and_read_back(three_fold_runs, monkeypatch):
    from sklearn.ensemble import HistGradientBoostingRegressor

    monkeypatch.setitem(HGB_SETTINGS, "min_samples_leaf", 3)           # 30 rows: trees of more than a leaf
    root, runs, ids, texts, y, folds, (p1, p2) = three_fold_runs
    build_stack(runs, root / "hgb", model="hgb")
    x = _by_hand_features(texts, p1, p2)
    oof = pd.read_csv(root / "hgb" / "oof.csv")
    inside = folds == 2
    by_hand = HistGradientBoostingRegressor(**HGB_SETTINGS).fit(x[~inside], y[~inside, 1]).predict(x[inside])
    np.testing.assert_allclose(oof.loc[inside, "b"], by_hand, rtol=0, atol=1e-12)
    assert len(np.unique(by_hand.round(6))) > 5                         # not the mean of every row
    whole = HistGradientBoostingRegressor(**HGB_SETTINGS).fit(x, y[:, 0])
    np.testing.assert_array_equal(read_stack(root / "hgb").models[0].predict(x), whole.predict(x))

    # a model file changed after the stack was written is refused before it is unpickled
    (root / "hgb" / "hgb_0.joblib").write_bytes(b"not the model")
    with pytest.raises(EnsembleError, match=r"hgb_0.joblib does not match the SHA-256"):
        read_stack(root / "hgb")


def test_runs_on_other_folds_are_refused_in_one_line(three_fold_runs, capsys):
    root, (r1, _), ids, _, _, folds, (_, p2) = three_fold_runs
    shifted = folds.copy()
    shifted[4] = 0                                  # e04: fold 1 in run one
    r3 = fake_run(root, "runs/three", root / "train.csv", ids, shifted, p2)
    assert ensemble_main(["--stack", str(r1), str(r3), "--out", str(root / "stack")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "were trained on different folds: id e04 is in fold 1 of" in err and "fold 0 of" in err
    assert not (root / "stack").exists()


def test_the_command_line_keeps_blend_and_stack_options_apart(three_fold_runs, capsys):
    root, (r1, r2), *_ = three_fold_runs
    with pytest.raises(SystemExit):
        ensemble_main(["--stack", str(r1), str(r2), "--method", "hill", "--out", str(root / "s")])
    assert "--method do not apply" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ensemble_main(["--run", str(r1), "--run", str(r2), "--model", "hgb", "--out", str(root / "b.json")])
    assert "--model applies to --stack only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ensemble_main(["--run", str(r1), "--run", str(r2), "--features", "own", "--no-text-stats", "--out", "b.json"])
    assert "--features, --no-text-stats applies to --stack only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ensemble_main(["--stack", str(r1), str(r2), "--features", "owns", "--out", str(root / "s")])
    assert "argument --features: invalid choice: 'owns'" in capsys.readouterr().err
    # a folder that is not a stack is not replaced by one
    assert ensemble_main(["--stack", str(r1), str(r2), "--out", str(r1)]) == 2
    assert "holds files and no stack.json" in capsys.readouterr().err
    assert (r1 / "oof.csv").is_file()


# --- a stack of real runs, through infer.py -----------------------------------------------


@pytest.fixture(scope="module")
def tfidf_stack(tmp_path_factory):
    work = tmp_path_factory.mktemp("stack")
    train, test = train_two_tfidf_runs(work, seed=11, n_test=8, names=("r1", "r10"))
    runs = [work / "runs" / "r1", work / "runs" / "r10"]
    assert ensemble_main(["--stack", *map(str, runs), "--out", str(work / "stack")]) == 0
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(HGB_SETTINGS, "min_samples_leaf", 3)         # 30 rows: trees of more than a leaf
        build_stack(runs, work / "hgb", model="hgb")
    build_stack(runs, work / "own", features="own", text_stats=False)
    # then a declared range narrower than the predictions': clipping (the first run's, as infer.py --run's) shows
    config = runs[0] / "config.yaml"
    save_config(load_config(config, [f"data.target_range=[{CLIP[0]}, {CLIP[1]}]"]), config)
    return work, runs, train, test


@pytest.mark.parametrize("model", ["stack", "hgb", "own"])
def test_infer_with_a_stack_applies_its_saved_models(model, tfidf_stack, monkeypatch):
    import joblib

    work, runs, train, test = tfidf_stack
    monkeypatch.chdir(work)                    # the runs name their test file relative to here
    folder = work / model
    record = json.loads((folder / "stack.json").read_text())
    texts = test.full_text.tolist()
    # by hand: the members' raw fold averages, the texts' statistics, each target's saved model
    members = [predict_run(run, texts)[0].astype(np.float64) for run in runs]
    vocabulary = json.loads((folder / "vocabulary.json").read_text())
    x = np.column_stack([*(m[:, t] for m in members for t in range(6)), stats_matrix(texts, vocabulary)])
    if model == "hgb":
        raw = np.column_stack([joblib.load(folder / record["models"][t]["file"]).predict(x) for t in TARGETS])
    elif model == "own":            # target t's ridge reads both members' predictions of t, no statistics
        raw = np.column_stack([(np.column_stack([m[:, t] for m in members]) - r["mean"]) / np.array(r["scale"])
                               @ np.array(r["coef"]) + r["intercept"]
                               for t, r in enumerate(record["models"][name] for name in TARGETS)])
    else:
        raw = np.column_stack([(x - m["mean"]) / np.array(m["scale"]) @ np.array(m["coef"]) + m["intercept"]
                               for m in (record["models"][t] for t in TARGETS)])
    low, high = CLIP
    assert (raw < low).any() and (raw > high).any()

    assert infer_main(["--blend", str(folder)]) == 0            # beside stack.json, the first run's test file
    clipped = pd.read_csv(folder / "submission.csv")
    assert clipped.text_id.tolist() == test.text_id.tolist() and list(clipped.columns[1:]) == TARGETS
    np.testing.assert_allclose(clipped[TARGETS].to_numpy(), np.clip(raw, low, high), rtol=0, atol=1e-6)
    # the stack.json file names the stack as well as its folder
    assert infer_main(["--blend", str(folder / "stack.json"), "--out", "raw.csv", "--no-clip"]) == 0
    np.testing.assert_allclose(pd.read_csv("raw.csv")[TARGETS].to_numpy(), raw, rtol=0, atol=1e-6)


def test_a_stack_is_the_same_whatever_the_process(three_fold_runs):
    """Two processes, other hash seeds (set order): the same stack.json, vocabulary and OOF, byte for byte."""
    root, (r1, r2), *_ = three_fold_runs
    for seed, out in (("1", "s1"), ("2", "s2")):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(SRC)}
        done = subprocess.run([sys.executable, "-m", "foldtune.ensemble", "--stack", str(r1), str(r2), "--out",
                               str(root / out)], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    for name in ("stack.json", "vocabulary.json", "oof.csv"):
        assert (root / "s1" / name).read_bytes() == (root / "s2" / name).read_bytes(), name
    assert len(json.loads((root / "s1" / "vocabulary.json").read_text())) == 11
