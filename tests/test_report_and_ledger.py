"""report.md and its plots at the end of every run; the ledger of a runs folder."""

from __future__ import annotations

import json
import logging
import shutil

from foldtune import report as report_module
from foldtune.report import write_report, write_report_or_warn
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


def test_ledger_lists_runs_with_the_changed_key_and_unfinished_ones(tiny_runs, tmp_path, capsys):
    runs_dir = tmp_path / "runs"
    shutil.copytree(tiny_runs[0], runs_dir)
    unfinished = runs_dir / "c"
    unfinished.mkdir()
    shutil.copy(runs_dir / "b" / "config.yaml", unfinished / "config.yaml")
    (unfinished / "run.json").write_text(json.dumps({"started": "2999-01-01T00:00:00", "folds": [0, 1]}))
    broken = runs_dir / "d"
    broken.mkdir()
    (broken / "config.yaml").write_text("training:\n  learning_rate: 1\n")
    (runs_dir / "notes").mkdir()                   # not a run folder: not listed

    entries = {e.path.name: e for e in list_runs(runs_dir)}
    assert sorted(entries) == ["a", "b", "c", "d"]
    assert entries["a"].changes == []
    assert entries["b"].changes == [("training.lr", 1e-4, 5e-4)]
    assert entries["c"].status == "unfinished (0/2 folds done)" and entries["c"].changes == []
    assert entries["d"].status.startswith("broken: config.yaml unreadable")

    assert runs_main([str(runs_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["run", "started", "backbone", "OOF"]
    row_b = next(line for line in lines if line.startswith("b "))
    scores_b = json.loads((runs_dir / "b" / "scores.json").read_text())
    assert f"{scores_b['oof']['mcrmse']:.4f}" in row_b
    assert f"0:{scores_b['folds']['0']['mcrmse']:.4f}" in row_b
    assert row_b.endswith("training.lr=0.0005 (was 0.0001)")
    assert "unfinished (0/2 folds done)" in next(line for line in lines if line.startswith("c "))


def test_ledger_sorts_by_oof_and_diffs_two_runs(tiny_runs, capsys):
    runs_dir, run_a, run_b = tiny_runs
    oof = {r.name: json.loads((r / "scores.json").read_text())["oof"]["mcrmse"] for r in (run_a, run_b)}
    assert oof["a"] != oof["b"]
    assert runs_main([str(runs_dir), "--sort", "oof"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]]
    assert names == sorted(oof, key=oof.get)

    assert diff_runs(run_a, run_b) == [("training.lr", 1e-4, 5e-4), ("output.name", "a", "b")]
    assert runs_main([str(runs_dir), "--diff", "a", "b"]) == 0
    out = capsys.readouterr().out
    assert "2 key(s) differ" in out and "  training.lr: 0.0001 -> 0.0005" in out
