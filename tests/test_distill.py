"""Distillation: the student's mixed targets (alpha) from a blend teacher, the held-out fold
kept out of the student's rows and out of the models that made its targets, and a tiny
student trained end to end."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import tfidf_ridge_fit, train_two_tfidf_runs

from foldtune.cli import infer_main, train_main
from foldtune.config import load_config
from foldtune.distill import load_teacher, mixed_targets, student_rows
from foldtune.ensemble import main as ensemble_main

TARGETS = ["cohesion", "syntax", "vocabulary", "phraseology", "grammar", "conventions"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """Two tfidf_ridge runs on the same 3 folds and their blend: a teacher trained in seconds."""
    work = tmp_path_factory.mktemp("distill")
    train, test = train_two_tfidf_runs(work, seed=7, n_test=6, names=("r1", "r10"))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        assert ensemble_main(["runs/r1", "runs/r10", "--out", "blend.json"]) == 0
    return work, train, test, json.loads((work / "blend.json").read_text())


def student_config(work, *overrides):
    return load_config(None, ["data.train_file=" + str(work / "train.csv"), "folds.n_splits=3",
                              f"distill.teacher={work / 'blend.json'}", *overrides])


def teacher_by_hand(train, blend, texts, holdout):
    """Each member's model of the held-out fold (fitted here on the other folds' rows), blended
    with the weights fitted on the other folds' OOF."""
    folds = pd.read_csv(blend["_work"] / "runs" / "r1" / "folds.csv")["fold"].to_numpy()
    rows = folds != holdout
    y = train[TARGETS].to_numpy()
    members = [tfidf_ridge_fit(train.full_text[rows].tolist(), y[rows], a, c).predict(texts)
               for a, c in ((1.0, (2, 4)), (10.0, (3, 3)))]
    w = np.array([blend["fold_weights"][str(holdout)][t] for t in TARGETS])      # (targets, members)
    return sum(w[:, m] * members[m] for m in range(2))


def test_holdout_student_rows_and_exact_mixed_targets(teacher):
    work, train, _, blend = teacher
    cfg = student_config(work, "distill.alpha=0.3", "distill.holdout_fold=1")
    rows = student_rows(cfg, load_teacher(cfg.distill.teacher), train)
    folds = pd.read_csv(work / "runs" / "r1" / "folds.csv")["fold"].to_numpy()
    np.testing.assert_array_equal(rows.train_index, np.flatnonzero(folds != 1))
    np.testing.assert_array_equal(rows.valid_index, np.flatnonzero(folds == 1))
    assert not set(rows.train_index) & set(rows.valid_index)
    texts = train.full_text[folds != 1].tolist()
    expected_teacher = teacher_by_hand(train, {**blend, "_work": work}, texts, 1)
    true = train[TARGETS].to_numpy()[folds != 1]
    np.testing.assert_allclose(rows.train_targets, 0.3 * true + 0.7 * expected_teacher, atol=1e-5)
    np.testing.assert_allclose(mixed_targets(true, expected_teacher, 0.3), 0.3 * true + 0.7 * expected_teacher)


def test_student_without_holdout_uses_the_teachers_oof(teacher):
    work, train, _, blend = teacher
    cfg = student_config(work, "distill.alpha=0.5", "distill.holdout_fold=null")
    rows = student_rows(cfg, load_teacher(cfg.distill.teacher), train)
    assert len(rows.train_index) == 30 and not rows.holdout
    oofs = [pd.read_csv(work / "runs" / r / "oof.csv").set_index("text_id").loc[train.text_id, TARGETS].to_numpy()
            for r in ("r1", "r10")]
    w = np.array([blend["weights"][t] for t in TARGETS])
    oof_blend = w[:, 0] * oofs[0] + w[:, 1] * oofs[1]
    np.testing.assert_allclose(rows.train_targets, 0.5 * train[TARGETS].to_numpy() + 0.5 * oof_blend, atol=1e-6)


def test_holdout_fold_must_exist(teacher):
    work, train, _, _ = teacher
    from foldtune.config import ConfigError

    cfg = student_config(work, "distill.holdout_fold=3")
    with pytest.raises(ConfigError, match=r"distill.holdout_fold=3: the teacher's folds are \[0, 1, 2\]"):
        student_rows(cfg, load_teacher(cfg.distill.teacher), train)


def test_student_trains_on_other_folds_and_pseudo_labels_and_is_scored_on_the_holdout(teacher, tiny_bert,
                                                                                      monkeypatch):
    work, train, test, blend = teacher
    monkeypatch.chdir(work)
    (work / "student.yaml").write_text(
        f"data:\n  train_file: train.csv\n  test_file: test.csv\n  max_len: 64\nfolds:\n  n_splits: 3\n"
        f"model:\n  name: {tiny_bert}\ntraining:\n  epochs: 1\n  batch_size: 8\n  lr: 1.0e-4\n"
        "distill:\n  teacher: blend.json\n  alpha: 0.5\n  holdout_fold: 0\n  pseudo_label_file: test.csv\n")
    assert train_main(["--config", "student.yaml", "--name", "student"]) == 0
    run = work / "runs" / "student"
    folds = pd.read_csv(run / "folds.csv")["fold"].to_numpy()
    np.testing.assert_array_equal(folds, pd.read_csv(work / "runs" / "r1" / "folds.csv")["fold"])
    table = pd.read_csv(run / "student_targets.csv")
    held_out = set(train.text_id[folds == 0])
    trained = table[table.source == "train"]
    assert set(trained.text_id) == set(train.text_id[folds != 0]) and not held_out & set(trained.text_id)
    order = train.set_index("text_id").loc[trained.text_id]
    expected = 0.5 * order[TARGETS].to_numpy() + 0.5 * teacher_by_hand(
        train, {**blend, "_work": work}, order.full_text.tolist(), 0)
    np.testing.assert_allclose(trained[TARGETS].to_numpy(), expected, atol=1e-5)
    pseudo = table[table.source == "pseudo"]
    assert pseudo.text_id.tolist() == [f"pseudo:{i}" for i in test.text_id]
    np.testing.assert_allclose(pseudo[TARGETS].to_numpy(),
                               teacher_by_hand(train, {**blend, "_work": work}, test.full_text.tolist(), 0),
                               atol=1e-5)
    assert "leaks" in (run / "train.log").read_text()

    scores = json.loads((run / "scores.json").read_text())
    assert scores["scored_on"] == "held-out fold 0" and scores["n_scored"] == len(held_out)
    assert (scores["n_train_essays"], scores["n_pseudo"]) == (30 - len(held_out), 6)
    oof = pd.read_csv(run / "oof.csv")
    assert set(oof.text_id) == held_out
    y = train.set_index("text_id").loc[oof.text_id, TARGETS].to_numpy()
    rmse = np.sqrt(((oof[TARGETS].to_numpy() - y) ** 2).mean(axis=0))
    assert scores["student"]["mcrmse"] == pytest.approx(rmse.mean(), abs=1e-5)
    # the teacher on the same essays: the members' fold-0 OOF with the fold-0 weights of the blend
    oofs = [pd.read_csv(work / "runs" / r / "oof.csv").set_index("text_id").loc[oof.text_id, TARGETS].to_numpy()
            for r in ("r1", "r10")]
    w = np.array([blend["fold_weights"]["0"][t] for t in TARGETS])
    honest = w[:, 0] * oofs[0] + w[:, 1] * oofs[1]
    assert scores["teacher_holdout"]["mcrmse"] == pytest.approx(np.sqrt(((honest - y) ** 2).mean(axis=0)).mean())
    # one model to ship: infer.py reads the student like any run
    assert infer_main(["--run", str(run), "--out", str(work / "student.csv")]) == 0
    assert len(pd.read_csv(work / "student.csv")) == len(test)


def test_a_student_with_its_attention_heads_pruned_distills_and_predicts(teacher, tiny_bert, monkeypatch):
    """pruning.heads in a student's config: the held-out student keeps the target's heads,
    trains on the pruned model from fix_epoch, and infer.py reads its smaller checkpoint."""
    from foldtune.checkpoint import load_checkpoint, read_meta

    work, train, test, _ = teacher
    monkeypatch.chdir(work)
    (work / "pruned_student.yaml").write_text(
        f"data:\n  train_file: train.csv\n  test_file: test.csv\n  max_len: 64\nfolds:\n  n_splits: 3\n"
        f"model:\n  name: {tiny_bert}\n  attention: eager\ntraining:\n  epochs: 2\n  batch_size: 8\n  lr: 1.0e-4\n"
        "  precision: fp32\ndistill:\n  teacher: blend.json\n  alpha: 0.5\n  holdout_fold: 0\n"
        "pruning:\n  heads:\n    enabled: true\n    target_heads: 2\n    l0_lambda: 0.1\n    fix_epoch: 2\n")
    assert train_main(["--config", "pruned_student.yaml", "--name", "pruned_student"]) == 0
    run = work / "runs" / "pruned_student"
    best = next(run.glob("fold_*/best"))
    meta = read_meta(best)
    assert (meta["head_gates"]["kept"], meta["head_gates"]["of"]) == (2, 4)
    # fixed from epoch 2: the best step is one of the pruned model's, and pruning it changed no score
    assert meta["val_mcrmse"] == pytest.approx(meta["head_gates"]["val_mcrmse_gated"], abs=1e-6)
    model, _ = load_checkpoint(best)
    assert sum(layer.attention.self.num_attention_heads for layer in model.backbone.encoder.layer) == \
        4 - sum(len(heads) for heads in meta.get("pruned_heads", {}).values())
    assert infer_main(["--run", str(run), "--out", "pruned_submission.csv", "--device", "cpu"]) == 0
    submission = pd.read_csv(work / "pruned_submission.csv")
    assert submission["text_id"].tolist() == test["text_id"].tolist() and submission[TARGETS].notna().all().all()
