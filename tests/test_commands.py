"""The command family (commands.py): `foldtune COMMAND`, the usage line of each spelling,
--help before torch, one option for one thing (--run, --out), the old spellings kept with a
deprecation line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, train_two_tfidf_runs

from foldtune import commands, ensemble, export, report, runs
from foldtune.cli import distill_main
from foldtune.compress import main as compress_main

NAMES = ["train", "infer", "runs", "report", "export", "ensemble", "compress", "search", "distill"]
HEAVY = {"torch", "transformers", "pandas", "sklearn"}


def test_the_family_lists_each_command_on_one_line(capsys):
    assert commands.main([]) == 0
    listed = capsys.readouterr().out
    assert commands.main(["--help"]) == 0
    assert capsys.readouterr().out == listed
    lines = listed.splitlines()
    assert lines[0] == "usage: foldtune COMMAND [options]   (foldtune COMMAND --help: its options)"
    assert lines[1:3] == ["", "commands:"]
    assert [line.split()[0] for line in lines[3:]] == NAMES
    assert lines[3].startswith("  train     train every fold of a config")


def test_an_unknown_command_is_one_line_with_the_nearest_name(capsys):
    assert commands.main(["trian", "--config", "x.yaml"]) == 2
    assert capsys.readouterr().err == ("foldtune: unknown command 'trian'; did you mean 'train'? the commands: "
                                       f"{', '.join(NAMES)}\n")
    assert commands.main(["fit"]) == 2
    assert capsys.readouterr().err == f"foldtune: unknown command 'fit'; the commands: {', '.join(NAMES)}\n"


def _console_script(name: str, target: str) -> list[str]:
    """What the installed script foldtune-<name> (or foldtune) does: sys.exit(main()) with its own argv[0]."""
    module, function = target.split(":")
    return ["-c", f"import sys; sys.argv[0] = {str(Path(sys.executable).parent / name)!r}; "
                  f"from {module} import {function}; sys.exit({function}())"]


SPELLINGS = (
    [(["-m", "foldtune", "--help"], "python -m foldtune COMMAND")]
    + [(["-m", "foldtune", name, "--help"], f"python -m foldtune {name}") for name in NAMES]
    + [(["train.py", "--help"], "train.py"), (["infer.py", "--help"], "infer.py")]
    + [(["-m", f"foldtune.{name}", "--help"], f"python -m foldtune.{name}")
       for name in ("runs", "report", "export", "ensemble", "compress", "search")]
    + [([*_console_script("foldtune", "foldtune.commands:main"), "--help"], "foldtune COMMAND"),
       ([*_console_script("foldtune-train", "foldtune.cli:train_main"), "--help"], "foldtune-train"),
       ([*_console_script("foldtune-export", "foldtune.export:main"), "--help"], "foldtune-export"),
       ([*_console_script("foldtune-search", "foldtune.search.command:main"), "--help"], "foldtune-search")]
)


@pytest.mark.parametrize("args, prog", SPELLINGS, ids=[prog for _, prog in SPELLINGS])
def test_help_names_the_command_as_typed_and_loads_no_heavy_library(args, prog):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run([sys.executable, "-X", "importtime", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(f"usage: {prog} ")
    # -X importtime: one line per module imported, "import time: self | cumulative | name"
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in done.stderr.splitlines()
                if line.startswith("import time:")}
    assert "foldtune" in imported
    assert sorted(imported & HEAVY) == []


def _deprecated(prog: str, old: list[str], new: list[str]) -> str:
    return f"warning: {prog} {' '.join(old)} is deprecated; use {prog} {' '.join(new)}"


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two tfidf_ridge runs on the same 3 folds (seconds to train) and their work folder."""
    work = tmp_path_factory.mktemp("commands")
    train_two_tfidf_runs(work, seed=3, n_test=4, names=("a", "b"))
    return work, work / "runs" / "a", work / "runs" / "b"


def test_the_old_spellings_still_work_with_a_deprecation_line(two_runs, tmp_path, capsys, monkeypatch):
    work, a, b = two_runs
    capsys.readouterr()

    assert ensemble.main(["--run", str(a), "--run", str(b), "--out", str(tmp_path / "new.json")]) == 0
    assert capsys.readouterr().err == ""
    assert ensemble.main([str(a), str(b), "--out", str(tmp_path / "old.json")]) == 0
    assert capsys.readouterr().err == _deprecated("foldtune ensemble", [str(a), str(b)],
                                                  ["--run", str(a), "--run", str(b)]) + "\n"
    assert json.loads((tmp_path / "old.json").read_text()) == json.loads((tmp_path / "new.json").read_text())

    assert runs.main(["--runs-dir", str(work / "runs")]) == 0
    ledger = capsys.readouterr()
    # the rows of the ledger's one group (data set and targets) follow its column header
    lines = ledger.out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("run "))
    assert ledger.err == "" and [line.split()[0] for line in lines[header + 1:]] == ["a", "b"]
    assert runs.main([str(work / "runs")]) == 0
    assert capsys.readouterr() == (ledger.out, _deprecated("foldtune runs", [str(work / "runs")],
                                                           ["--runs-dir", str(work / "runs")]) + "\n")

    (a / "report.md").unlink()
    assert report.main([str(a)]) == 0
    out, err = capsys.readouterr()
    assert (out, err.splitlines()[0]) == (f"{a / 'report.md'}\n", _deprecated("foldtune report", [str(a)],
                                                                                 ["--run", str(a)]))
    assert (a / "report.md").is_file()

    monkeypatch.setattr(export, "build_wheel", lambda out_dir, root=None: out_dir / "foldtune.whl")
    assert export.main([str(a), str(tmp_path / "kaggle")]) == 0
    out, err = capsys.readouterr()
    assert (out, err.splitlines()[0]) == (f"{tmp_path / 'kaggle'}\n", _deprecated(
        "foldtune export", [str(a), str(tmp_path / "kaggle")], ["--run", str(a), "--out", str(tmp_path / "kaggle")]))
    assert sorted(p.name for p in (tmp_path / "kaggle").glob("fold_*")) == ["fold_0", "fold_1", "fold_2"]


def test_report_takes_several_runs(two_runs, capsys):
    _, a, b = two_runs
    for run in (a, b):
        (run / "report.md").unlink(missing_ok=True)
    assert report.main(["--run", str(a), "--run", str(b)]) == 0
    assert capsys.readouterr().out == f"{a / 'report.md'}\n{b / 'report.md'}\n"
    assert (a / "report.md").is_file() and (b / "report.md").is_file()


def test_a_command_of_one_run_refuses_a_second_run_and_needs_its_options(capsys):
    with pytest.raises(SystemExit) as refused:
        compress_main(["--run", "runs/a", "--run", "runs/b", "--out", "small", "--rank", "4"])
    assert refused.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == ("foldtune compress: error: --run given twice: foldtune "
                                                        "compress reads one run (runs/a and runs/b)")
    with pytest.raises(SystemExit):
        export.main(["--run", "runs/a", "--run", "runs/b", "--out", "kaggle"])
    assert capsys.readouterr().err.splitlines()[-1] == ("foldtune export: error: --run given twice: foldtune "
                                                        "export reads one run (runs/a and runs/b)")
    with pytest.raises(SystemExit):
        export.main(["--run", "runs/a"])
    assert capsys.readouterr().err.splitlines()[-1] == ("foldtune export: error: the following arguments are "
                                                        "required: --out")
    with pytest.raises(SystemExit):
        export.main(["runs/a", "kaggle", "--run", "runs/a"])
    assert capsys.readouterr().err.splitlines()[-1] == ("foldtune export: error: unrecognized arguments: runs/a "
                                                        "kaggle (give the run as --run RUN_DIR and the folder to "
                                                        "write as --out OUT_DIR)")
    with pytest.raises(SystemExit):
        report.main([])
    assert capsys.readouterr().err.splitlines()[-1] == "foldtune report: error: the following arguments are " \
                                                       "required: --run"


def test_distill_is_a_train_run_with_the_teacher_given(two_runs, tiny_bert, monkeypatch, capsys):
    work, a, b = two_runs
    monkeypatch.chdir(work)
    assert ensemble.main(["--run", str(a), "--run", str(b), "--out", "blend.json"]) == 0
    (work / "student.yaml").write_text(
        f"data:\n  train_file: train.csv\n  test_file: test.csv\n  max_len: 32\nfolds:\n  n_splits: 3\n"
        f"model:\n  name: {tiny_bert}\ntraining:\n  epochs: 1\n  batch_size: 16\n")
    capsys.readouterr()
    assert distill_main(["--config", "student.yaml", "--name", "nothing"]) == 2
    assert capsys.readouterr().err == ("error: student.yaml has no distill.teacher: give the teacher with --teacher "
                                       "BLEND_OR_RUN (a blend.json written by foldtune ensemble, or a run folder)\n")
    assert not (work / "runs" / "nothing").exists()

    assert distill_main(["--teacher", "blend.json", "--config", "student.yaml", "--name", "student",
                         "distill.alpha=0.25"]) == 0
    saved = (work / "runs" / "student" / "config.yaml").read_text()
    assert "teacher: blend.json" in saved and "alpha: 0.25" in saved
    scores = json.loads((work / "runs" / "student" / "scores.json").read_text())
    assert scores["scored_on"] == "held-out fold 0"
