"""report.md and its plots at the end of every run; the ledger of a runs folder."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys

import pytest
from conftest import ended_pid

from foldtune import report as report_module
from foldtune.config import load_config, save_config
from foldtune.report import write_report, write_report_or_warn
from foldtune.run_lock import LOCK_FILE
from foldtune.runs import diff_runs, list_runs, main as runs_main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_every_run_ends_with_a_report_and_valid_png_plots(tiny_runs):
    _, run, _ = tiny_runs
    scores = json.loads((run / "scores.json").read_text())
    text = (run / "report.md").read_text()
    assert f"**{scores['oof']['mcrmse']:.4f}**" in text
    assert f"| 1 | {scores['folds']['1']['per_target']['cohesion']:.4f} |" in text
    for name in ("learning_curves.png", "oof_vs_true.png"):
        data = (run / "plots" / name).read_bytes()
        assert len(data) > 1000 and data[:8] == PNG_SIGNATURE
        assert f"](plots/{name})" in text


def test_a_plot_that_fails_only_warns_and_the_tables_stay(tiny_runs, tmp_path, monkeypatch, caplog):
    run = tmp_path / "run"
    shutil.copytree(tiny_runs[1], run)
    shutil.rmtree(run / "plots")
    (run / "report.md").unlink()

    def broken(*args, **kwargs):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(report_module, "plot_learning_curves", broken)
    with caplog.at_level(logging.WARNING, logger="foldtune"):
        write_report(run)
    text = (run / "report.md").read_text()
    assert "(not drawn: RuntimeError: no fonts)" in text and "plots/oof_vs_true.png" in text
    assert not (run / "plots" / "learning_curves.png").exists()
    assert "could not draw learning_curves.png" in caplog.text
    # a run without scores: no report, a warning, no exception
    (run / "scores.json").unlink()
    with caplog.at_level(logging.WARNING, logger="foldtune"):
        assert write_report_or_warn(run) is None
    assert "could not write the report" in caplog.text


def test_report_command_rewrites_the_report(tiny_runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_runs[1], run)
    (run / "report.md").unlink()
    assert report_module.main([str(run)]) == 0
    assert (run / "report.md").is_file()
    assert report_module.main([str(tmp_path / "nothing")]) == 2


def test_ledger_lists_runs_with_the_changed_key_failed_and_broken_ones(tiny_runs, tmp_path, capsys):
    runs_dir = tmp_path / "runs"
    shutil.copytree(tiny_runs[0], runs_dir)
    failed = runs_dir / "c"
    failed.mkdir()
    shutil.copy(runs_dir / "b" / "config.yaml", failed / "config.yaml")
    run_b = json.loads((runs_dir / "b" / "run.json").read_text())
    (failed / "run.json").write_text(json.dumps({**run_b, "started": "2999-01-01T00:00:00"}))
    broken = runs_dir / "d"
    broken.mkdir()
    (broken / "config.yaml").write_text("training:\n  learning_rate: 1\n")
    (runs_dir / "notes").mkdir()                   # not a run folder: not listed

    entries = {e.path.name: e for e in list_runs(runs_dir)}
    assert sorted(entries) == ["a", "b", "c", "d"]
    assert entries["a"].changes == []
    assert entries["b"].changes == [("training.lr", 1e-4, 5e-4)]
    assert entries["c"].status == "failed" and entries["c"].changes == []
    assert entries["d"].status == "broken" and entries["d"].problem.startswith("config.yaml unreadable: ")

    assert runs_main([str(runs_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[3].split()[:4] == ["run", "started", "backbone", "OOF"]
    row_b = next(line for line in lines if line.startswith("b "))
    scores_b = json.loads((runs_dir / "b" / "scores.json").read_text())
    assert f"  {scores_b['oof']['mcrmse']:.4f}  " in row_b
    folds_b = sorted(fold["mcrmse"] for fold in scores_b["folds"].values())
    assert f"  {folds_b[0]:.3f}-{folds_b[1]:.3f}  " in row_b
    assert row_b.endswith("  training.lr 0.0001->0.0005")
    assert next(line for line in lines if line.startswith("c ")).split()[4:] == ["failed", "-", "-"]
    assert lines[-4:-2] == ["", "config.yaml unreadable: data set and targets unknown"]
    assert lines[-1].split()[:2] == ["d", "?"] and "  broken  " in lines[-1]


def test_ledger_sorts_by_oof_and_diffs_two_runs(tiny_runs, capsys):
    runs_dir, run_a, run_b = tiny_runs
    oof = {r.name: json.loads((r / "scores.json").read_text())["oof"]["mcrmse"] for r in (run_a, run_b)}
    assert oof["a"] != oof["b"]
    assert runs_main([str(runs_dir), "--sort", "oof"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()[4:]]
    assert names == sorted(oof, key=oof.get)

    assert diff_runs(run_a, run_b) == [("training.lr", 1e-4, 5e-4), ("output.name", "a", "b")]
    assert runs_main([str(runs_dir), "--diff", "a", "b"]) == 0
    out = capsys.readouterr().out
    assert "2 key(s) differ" in out and "  training.lr: 0.0001 -> 0.0005" in out


def _hand_made_run(runs_dir, name: str, started: str, sha: str, overrides=(), oof=None, fold_scores=None,
                   folds_begun=(), lock_pid=None):
    """A run folder written by hand, as far as the ledger reads it: config.yaml, run.json,
    scores.json (oof given), fold_k/result.json (fold_scores), fold_k/ (folds_begun) and
    a lock held by lock_pid."""
    run = runs_dir / name
    run.mkdir(parents=True)
    save_config(load_config(None, list(overrides)), run / "config.yaml")
    (run / "run.json").write_text(json.dumps({"started": started, "folds": [0, 1], "train_file_sha256": sha}))
    fold_scores = fold_scores or {}
    for fold in folds_begun:
        (run / f"fold_{fold}").mkdir()
    for fold, score in fold_scores.items():
        (run / f"fold_{fold}" / "result.json").write_text(json.dumps({"fold": fold, "mcrmse": score}))
    if oof is not None:
        (run / "scores.json").write_text(json.dumps({"oof": {"mcrmse": oof}, "folds": {
            str(fold): {"mcrmse": score} for fold, score in fold_scores.items()}}))
    if lock_pid is not None:
        (run / LOCK_FILE).write_text(json.dumps({"pid": lock_pid, "host": socket.gethostname(),
                                                 "purpose": "training", "started": started, "token": "0"}))
    return run


ESSAYS = ("data.train_file=train.csv",)
OTHER = ("data.train_file=other.csv", "data.target_columns=[a, b]")
LONG_NAME = "ellipse_deberta_v3_large_awp_ema_swa-20261201-133000"
LONG_BACKBONE = "/kaggle/input/a-very-long-backbone-folder-name-v3-large"


@pytest.fixture
def hand_made_runs(tmp_path, live_pid):
    """Two data sets: essays (train.csv) and other.csv with other targets; their runs interleave in time."""
    runs = tmp_path / "runs"
    _hand_made_run(runs, "r1", "2026-12-01T10:00:00", "aaaa1111" * 8, (*ESSAYS, "training.lr=1e-4"), 0.5,
                   {0: 0.48, 1: 0.52}, (0, 1))
    _hand_made_run(runs, "r2", "2026-12-01T10:30:00", "bbbb2222" * 8, (*OTHER, "training.lr=2e-4"), 0.3,
                   {0: 0.3, 1: 0.3}, (0, 1))
    _hand_made_run(runs, "r3", "2026-12-01T11:00:00", "aaaa1111" * 8, (*ESSAYS, "training.lr=3e-4"), 0.45,
                   {0: 0.44, 1: 0.46}, (0, 1))
    # a failed start: config and run.json written, no fold began
    _hand_made_run(runs, "r4", "2026-12-01T12:00:00", "aaaa1111" * 8, (*ESSAYS, "training.lr=3e-4",
                                                                       "model.pooling=attention"))
    # stopped after its first fold, with the lock of a process that has ended
    _hand_made_run(runs, "r5", "2026-12-01T12:30:00", "aaaa1111" * 8, (*ESSAYS, "training.lr=3e-4"), None,
                   {0: 0.47}, (0, 1), lock_pid=ended_pid())
    _hand_made_run(runs, "r6", "2026-12-01T13:00:00", "bbbb2222" * 8, (*OTHER, "training.lr=2e-4"), None, {},
                   (0,), lock_pid=live_pid)
    return runs


LEDGER_BY_DATE = """\
6 run(s), grouped by data set and targets; oldest first in a group; changes: from the group's run started before

data set train.csv (sha256 aaaa1111), targets cohesion, syntax, vocabulary, phraseology, grammar, conventions
run  started      backbone          OOF             fold range   changed from the previous run
r1   12-01 10:00  all-MiniLM-L6-v2  0.5000          0.480-0.520  -
r3   12-01 11:00  all-MiniLM-L6-v2  0.4500          0.440-0.460  training.lr 0.0001->0.0003
r4   12-01 12:00  all-MiniLM-L6-v2  failed          -            model.pooling mean->attention
r5   12-01 12:30  all-MiniLM-L6-v2  unfinished 1/2  0.470        model.pooling attention->mean

data set other.csv (sha256 bbbb2222), targets a, b
run  started      backbone          OOF             fold range   changed from the previous run
r2   12-01 10:30  all-MiniLM-L6-v2  0.3000          0.300-0.300  -
r6   12-01 13:00  all-MiniLM-L6-v2  training        -            -"""


def test_ledger_groups_runs_by_data_set_and_compares_with_the_same_groups_previous_run(hand_made_runs, capsys):
    """r3 is compared with r1, not with r2 (the run before it, of another data set); r4
    began no fold (failed); r5's lock is stale (unfinished); r6's holder runs (training)."""
    assert runs_main([str(hand_made_runs)]) == 0
    assert capsys.readouterr().out == LEDGER_BY_DATE + "\n"


def test_ledger_sorted_by_oof_keeps_the_groups_and_their_changes(hand_made_runs, capsys):
    assert runs_main([str(hand_made_runs), "--sort", "oof"]) == 0
    lines = capsys.readouterr().out.splitlines()
    by_date = LEDGER_BY_DATE.splitlines()
    assert lines[0] == by_date[0].replace("oldest first", "best OOF first")
    # r3 before r1, each with its own changes (r3's still from r1); r4 and r5 after them, by start
    assert lines[1:] == [by_date[i] for i in (1, 2, 3, 5, 4, 6, 7, 8, 9, 10, 11, 12)]


def test_every_ledger_line_fits_120_characters_with_long_values_cut(hand_made_runs, capsys):
    _hand_made_run(hand_made_runs, LONG_NAME, "2026-12-01T13:30:00", "bbbb2222" * 8,
                   (*OTHER, "training.lr=2e-4", f"model.name={LONG_BACKBONE}", "data.max_len=1024"), 0.25,
                   {0: 0.2, 1: 0.3}, (0, 1))
    assert runs_main([str(hand_made_runs)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines) == 120
    # the run's name keeps its start and its time, the backbone its start, the changes what fits
    assert lines[-1] == ("ellipse_deberta…-20261201-133000  12-01 13:30  a-very-long-backb…  0.2500          "
                         "0.200-0.300  data.max_len 512->1024,…")


def test_a_ledger_piped_to_a_reader_that_has_gone_ends_quietly(hand_made_runs, tmp_path):
    # foldtune runs | head: the reader closes the pipe; the ledger ends without a traceback
    runs_dir = hand_made_runs
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run([sys.executable, "-m", "foldtune", "runs", "--runs-dir", str(runs_dir)],
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (0, "")


def test_a_stopped_seeded_run_counts_the_folds_whose_every_seed_finished(tmp_path):
    """training.seeds: a fold's models are in fold_k/seed_<s>/; the fold has finished when
    every seed's has, and its score is then the mean of its seeds'."""
    from foldtune.runs import list_runs

    run = _hand_made_run(tmp_path / "runs", "seeded", "2026-12-01T10:00:00", "aaaa1111" * 8,
                         (*ESSAYS, "training.seeds=[42,7]"), None, {}, (0, 1))
    for fold, seed, score in ((0, 42, 0.46), (0, 7, 0.48), (1, 42, 0.50)):     # fold 1 seed 7 still to train
        (run / f"fold_{fold}" / f"seed_{seed}").mkdir()
        (run / f"fold_{fold}" / f"seed_{seed}" / "result.json").write_text(json.dumps({"mcrmse": score}))
    (entry,) = list_runs(tmp_path / "runs")
    assert entry.score_or_status == "unfinished 1/2"
    assert entry.folds == {0: pytest.approx(0.47)}


def test_a_search_trial_its_pruner_stopped_is_listed_pruned_not_unfinished(tmp_path):
    from foldtune.runs import list_runs

    run = _hand_made_run(tmp_path / "runs", "trial_0002", "2026-12-01T10:00:00", "aaaa1111" * 8, ESSAYS, None,
                         {0: 0.52}, (0, 1))
    (entry,) = list_runs(tmp_path / "runs")
    assert (entry.status, entry.score_or_status) == ("unfinished", "unfinished 1/2")
    (run / "pruned.json").write_text(json.dumps({"trial": 2, "after_fold": 0, "mcrmse": 0.52}))
    (entry,) = list_runs(tmp_path / "runs")
    assert (entry.status, entry.score_or_status) == ("pruned", "pruned 1/2")
