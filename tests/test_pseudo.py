"""Pseudo-labels fold by fold (pseudo.teacher, pseudo.file): fold k trains on the teacher's
fold-k predictions for the extra texts, computed once and read back on resume; a teacher
on other folds or rows is refused before any fold trains."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import tfidf_ridge_fit, train_two_tfidf_runs

from foldtune.cli import train_main
from foldtune.config import ConfigError, load_config
from foldtune.pseudo import PSEUDO_FILE

TARGETS = ["cohesion", "syntax", "vocabulary", "phraseology", "grammar", "conventions"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """Two tfidf_ridge runs on 3 folds of 30 essays (r1: alpha 1, char 2-4), 8 unscored texts."""
    work = tmp_path_factory.mktemp("pseudo")
    train, test = train_two_tfidf_runs(work, seed=11, n_test=8, names=("r1", "r10"))
    return work, train, test


def folds_of(work, run="r1"):
    return pd.read_csv(work / "runs" / run / "folds.csv")["fold"].to_numpy()


def by_hand(train, folds, fold, texts, extra_texts=(), extra_y=None, alpha=1.0, char=(2, 4)):
    """A tfidf_ridge fold model fitted with scikit-learn on the other folds' rows (and extra texts)."""
    rows = folds != fold
    texts_fit = train.full_text[rows].tolist() + list(extra_texts)
    y = train[TARGETS].to_numpy()[rows]
    if extra_y is not None:
        y = np.concatenate([y, extra_y])
    return tfidf_ridge_fit(texts_fit, y, alpha, char).predict(texts)


def test_fold_k_trains_on_the_pseudo_labels_of_the_teachers_fold_k_model(teacher, monkeypatch):
    work, train, test = teacher
    monkeypatch.chdir(work)
    assert train_main(["--config", "tfidf.yaml", "--name", "pl", "pseudo.teacher=runs/r1",
                       "pseudo.file=test.csv"]) == 0
    run, folds = work / "runs" / "pl", folds_of(work)
    np.testing.assert_array_equal(pd.read_csv(run / "folds.csv")["fold"], folds)
    table = pd.read_csv(run / PSEUDO_FILE)
    assert table.fold.tolist() == [0] * 8 + [1] * 8 + [2] * 8
    labels = {k: table[table.fold == k][TARGETS].to_numpy() for k in range(3)}
    for k in range(3):
        assert table[table.fold == k].text_id.tolist() == test.text_id.tolist()
        # the teacher's fold-k model, which never saw fold k's essays
        np.testing.assert_allclose(labels[k], by_hand(train, folds, k, test.full_text.tolist()), atol=1e-5)
    assert np.abs(labels[0] - labels[1]).max() > 1e-3      # each fold its own labels, not one average
    oof = pd.read_csv(run / "oof.csv").set_index("text_id")
    for k in range(3):
        valid = train[folds == k]
        expected = by_hand(train, folds, k, valid.full_text.tolist(), test.full_text.tolist(), labels[k])
        np.testing.assert_allclose(oof.loc[valid.text_id, TARGETS].to_numpy(), expected, atol=1e-5)
        # and not the fold model without the extra texts
        assert np.abs(expected - by_hand(train, folds, k, valid.full_text.tolist())).max() > 1e-3


def test_a_blend_teacher_labels_each_fold_with_its_fold_weights(teacher, monkeypatch):
    from foldtune.ensemble import main as ensemble_main

    work, train, test = teacher
    monkeypatch.chdir(work)
    assert ensemble_main(["runs/r1", "runs/r10", "--out", "blend.json"]) == 0
    assert train_main(["--config", "tfidf.yaml", "--name", "pl_blend", "pseudo.teacher=blend.json",
                       "pseudo.file=test.csv"]) == 0
    import json

    blend, folds = json.loads((work / "blend.json").read_text()), folds_of(work)
    table = pd.read_csv(work / "runs" / "pl_blend" / PSEUDO_FILE)
    for k in range(3):
        members = [by_hand(train, folds, k, test.full_text.tolist(), alpha=a, char=c)
                   for a, c in ((1.0, (2, 4)), (10.0, (3, 3)))]
        w = np.array([blend["fold_weights"][str(k)][t] for t in TARGETS])
        np.testing.assert_allclose(table[table.fold == k][TARGETS].to_numpy(),
                                   w[:, 0] * members[0] + w[:, 1] * members[1], atol=1e-5)


def test_a_teacher_on_other_folds_is_refused_before_any_fold_trains(teacher, monkeypatch, capsys):
    work, _, _ = teacher
    monkeypatch.chdir(work)
    assert train_main(["--config", "tfidf.yaml", "--name", "other_folds", "folds.n_splits=2",
                       "pseudo.teacher=runs/r1", "pseudo.file=test.csv"]) == 2
    err = capsys.readouterr().err
    first = pd.read_csv(work / "train.csv").text_id[0]
    assert f"pseudo.teacher runs/r1 has id {first} (row 2 of train.csv) in its fold" in err
    assert "Train with the teacher's folds" in err
    assert not list((work / "runs").glob("other_folds*"))        # refused before a run folder is made


def test_pseudo_texts_that_are_training_essays_are_refused(teacher, monkeypatch, capsys):
    work, train, _ = teacher
    monkeypatch.chdir(work)
    train.head(3).to_csv(work / "overlap.csv", index=False)
    assert train_main(["--config", "tfidf.yaml", "--name", "overlap", "pseudo.teacher=runs/r1",
                       "pseudo.file=overlap.csv"]) == 2
    err = capsys.readouterr().err
    assert f"pseudo.file overlap.csv holds id {sorted(train.text_id.head(3))[0]} of train.csv (3 such)" in err
    assert not list((work / "runs").glob("overlap*"))


def test_pseudo_needs_both_keys_and_not_distillation():
    with pytest.raises(ConfigError, match="pseudo.teacher is null while pseudo.file"):
        load_config(None, ["pseudo.file=test.csv"])
    with pytest.raises(ConfigError, match="pseudo.file is null while pseudo.teacher"):
        load_config(None, ["pseudo.teacher=runs/r1"])
    with pytest.raises(ConfigError, match="distill.teacher are both set"):
        load_config(None, ["pseudo.teacher=runs/r1", "pseudo.file=t.csv", "distill.teacher=runs/r1"])


def test_a_transformer_run_trains_on_them_and_resumes_without_the_teacher(teacher, tiny_bert, monkeypatch):
    """Fold k's training set is its rows plus the extra texts with fold k's labels; the
    labels are read back on resume, when the teacher is gone."""
    from foldtune.pseudo import read_pseudo_labels
    from foldtune.training.prepared import PreparedRun, tokenized_run

    work, train, test = teacher
    monkeypatch.chdir(work)
    teacher_copy = work / "runs" / "r1_copy"
    shutil.copytree(work / "runs" / "r1", teacher_copy)
    (work / "pl_bert.yaml").write_text(
        f"data:\n  train_file: train.csv\n  test_file: test.csv\n  max_len: 64\nfolds:\n  n_splits: 3\n"
        f"model:\n  name: {tiny_bert}\ntraining:\n  epochs: 1\n  batch_size: 8\n  lr: 1.0e-4\n"
        f"pseudo:\n  teacher: {teacher_copy}\n  file: test.csv\n")
    assert train_main(["--config", "pl_bert.yaml", "--name", "pl_bert", "--folds", "0"]) == 0
    run, folds = work / "runs" / "pl_bert", folds_of(work)
    labels = pd.read_csv(run / PSEUDO_FILE)
    np.testing.assert_allclose(labels[labels.fold == 2][TARGETS].to_numpy(),
                               by_hand(train, folds, 2, test.full_text.tolist()), atol=1e-5)

    cfg = load_config(run / "config.yaml")
    prepared = tokenized_run(cfg, run, train, folds, read_pseudo_labels(cfg, run))
    prepared.save_tokens()
    loaded = PreparedRun.load(run)          # how a fold process (parallel_mode: processes) reads it
    for k in range(3):
        data, n_rows = prepared.fold_data(k), int((folds != k).sum())
        assert len(data.train) == n_rows + 8 and data.valid_ids == train.text_id[folds == k].tolist()
        np.testing.assert_allclose(data.train.targets[n_rows:].numpy(), labels[labels.fold == k][TARGETS], atol=1e-6)
        np.testing.assert_allclose(data.train.targets[:n_rows].numpy(), train[TARGETS].to_numpy()[folds != k])
        assert data.train.input_ids[n_rows:] == prepared.pseudo_ids and len(prepared.pseudo_ids) == 8
        again = loaded.fold_data(k)
        assert again.train.input_ids == data.train.input_ids
        np.testing.assert_array_equal(again.train.targets.numpy(), data.train.targets.numpy())

    shutil.rmtree(teacher_copy)          # gone: the labels come from the run folder now
    assert train_main(["--resume", str(run), "--folds", "0,1,2"]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(run / PSEUDO_FILE), labels)
    assert sorted(pd.read_csv(run / "oof.csv").text_id) == sorted(train.text_id)


def test_seeds_windows_and_folds_in_threads_train_on_them(teacher, tiny_bert, monkeypatch):
    """As the windows config trains (long texts in windows, seeds, folds in threads): every
    fold-seed trains on its rows plus the 8 texts, whose windows hold all their tokens."""
    from foldtune.data.dataset import encode_data
    from foldtune.pseudo import read_pseudo_labels
    from foldtune.training.prepared import tokenized_run

    work, train, test = teacher
    monkeypatch.chdir(work)
    (work / "pl_win.yaml").write_text(
        f"data:\n  train_file: train.csv\n  test_file: test.csv\n  max_len: 32\n  long_text: windows\n"
        f"  max_windows: 8\nfolds:\n  n_splits: 3\nmodel:\n  name: {tiny_bert}\n"
        f"training:\n  epochs: 1\n  batch_size: 8\n  lr: 1.0e-4\n  seeds: [1, 2]\n  parallel_folds: 2\n"
        f"  parallel_mode: threads\npseudo:\n  teacher: runs/r1\n  file: test.csv\n")
    assert train_main(["--config", "pl_win.yaml", "--name", "pl_win"]) == 0
    run, folds = work / "runs" / "pl_win", folds_of(work)
    log = (run / "train.log").read_text()
    for k in range(3):
        for seed in (1, 2):
            assert f"fold {k} seed {seed}: {int((folds != k).sum()) + 8} train / {int((folds == k).sum())} valid rows" in log
    labels = pd.read_csv(run / PSEUDO_FILE)
    np.testing.assert_allclose(labels[labels.fold == 1][TARGETS].to_numpy(),
                               by_hand(train, folds, 1, test.full_text.tolist()), atol=1e-5)
    cfg = load_config(run / "config.yaml")
    prepared = tokenized_run(cfg, run, train, folds, read_pseudo_labels(cfg, run))
    whole = encode_data(prepared.tokenizer, test.full_text.tolist(), prepared.cfg.data).input_ids
    assert prepared.pseudo_ids == whole and max(map(len, whole)) > 32       # windows: no text cut at max_len
    assert sorted(pd.read_csv(run / "oof.csv").text_id) == sorted(train.text_id)


def test_a_mistyped_or_unfinished_teacher_is_refused_before_a_run_folder(teacher, monkeypatch, capsys):
    work, _, _ = teacher
    monkeypatch.chdir(work)
    assert train_main(["--config", "tfidf.yaml", "--name", "typo", "pseudo.teacher=runs/r_1",
                       "pseudo.file=test.csv"]) == 2
    assert f"error: pseudo.teacher: {work / 'runs' / 'r_1'} does not exist" in capsys.readouterr().err
    assert train_main(["--config", "tfidf.yaml", "--name", "typo", "pseudo.teacher=runs/r1",
                       "pseudo.file=tset.csv"]) == 2
    assert f"error: pseudo.file: {work / 'tset.csv'} does not exist" in capsys.readouterr().err
    half = work / "runs" / "r1_half"        # a teacher whose fold 1 is still training
    shutil.copytree(work / "runs" / "r1", half)
    (half / "fold_1" / "result.json").unlink()
    assert train_main(["--config", "tfidf.yaml", "--name", "early", f"pseudo.teacher={half}",
                       "pseudo.file=test.csv"]) == 2
    err = capsys.readouterr().err
    assert f"fold(s) [1] of {half} have no finished checkpoint" in err and "--resume" in err
    assert not list((work / "runs").glob("typo*")) and not list((work / "runs").glob("early*"))
