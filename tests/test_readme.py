"""The README's "Train on your own CSV" commands, run as written: a user who copies them
into a checkout with a CSV at the README's paths gets trained runs and submissions."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd

from foldtune.data.demo import make_demo

REPO = Path(__file__).resolve().parents[1]
MARK = "<!-- test: own-csv -->"
# A marked block: the mark, then a fenced block with its language.
MARKED_BLOCK = re.compile(re.escape(MARK) + r"\n```(?P<language>\w+)\n(?P<body>.*?)\n```\n", re.DOTALL)
# The README's CSV columns: the demo's, renamed; the demo's other targets are left out.
COLUMNS = {"text_id": "essay_id", "full_text": "text", "cohesion": "content", "syntax": "wording"}


def marked_blocks(readme: str) -> list[tuple[str, str]]:
    """(language, body) of each block marked for this test, in the README's order."""
    return [(m["language"], m["body"]) for m in MARKED_BLOCK.finditer(readme)]


def write_checkout(folder: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """What the README's commands expect in the repository's folder: the entry points,
    configs/, and data/train.csv and data/test.csv with the README's columns: 24 demo
    essays cut to their first 40 words, enough for 5 folds and quick to train on a CPU."""
    for name in ("train.py", "infer.py"):
        shutil.copy2(REPO / name, folder / name)
    (folder / "configs").mkdir()
    (folder / "data").mkdir()
    train, test = make_demo(n_train=24, n_test=7, seed=11)
    for frame in (train, test):
        frame["full_text"] = [" ".join(text.split()[:40]) for text in frame["full_text"]]
    train = train.rename(columns=COLUMNS)[list(COLUMNS.values())]
    test = test.rename(columns=COLUMNS)
    train.to_csv(folder / "data" / "train.csv", index=False)
    test.to_csv(folder / "data" / "test.csv", index=False)
    return train, test


def python_first_on_path(folder: Path) -> dict[str, str]:
    """An environment in which `python` is this interpreter (a script, not a link: a
    virtual environment's interpreter finds its packages only under its own path)."""
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "python"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    # On 2 cores shared with other processes, torch's thread pool ran these commands in
    # 6 minutes, one thread in about 70 s; the commands are the same either way.
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def test_the_own_csv_commands_of_the_readme_train_and_predict_as_written(tmp_path):
    blocks = marked_blocks((REPO / "README.md").read_text(encoding="utf-8"))
    # the command-line route; the config file, saved where its first line says; its commands
    assert [language for language, _ in blocks] == ["bash", "yaml", "bash"]
    assert blocks[1][1].splitlines()[0] == "# configs/my_task.yaml"
    work = tmp_path / "checkout"
    work.mkdir()
    train, test = write_checkout(work)
    env = python_first_on_path(tmp_path)
    for language, body in blocks:
        if language == "yaml":
            (work / body.splitlines()[0].removeprefix("# ")).write_text(body + "\n", encoding="utf-8")
            continue
        result = subprocess.run(["bash", "-e", "-c", body], cwd=work, env=env, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, f"{body}\n{result.stderr[-3000:]}"

    # the command-line route: the demo config's 3 folds, no test file, a submission for --test
    # the YAML route: its 5 folds, a submission for its test_file
    for run, n_folds, submission in [("first_try", 3, work / "first_try.csv"),
                                     ("my_task", 5, work / "runs" / "my_task" / "submission.csv")]:
        scores = json.loads((work / "runs" / run / "scores.json").read_text())
        assert sorted(scores["folds"]) == [str(k) for k in range(n_folds)]
        assert set(scores["oof"]["per_target"]) == {"content", "wording"}
        oof = pd.read_csv(work / "runs" / run / "oof.csv")
        assert sorted(oof["essay_id"]) == sorted(train["essay_id"])
        assert sorted(set(oof["fold"])) == list(range(n_folds))
        predicted = pd.read_csv(submission)
        assert list(predicted.columns) == ["essay_id", "content", "wording"]
        assert predicted["essay_id"].tolist() == test["essay_id"].tolist()
