"""The Python API: foldtune.train and foldtune.predict, as the README shows them.

The README's examples run here as written, in a folder holding configs/default.yaml and
a small demo data set (data/demo/, which a demo run never writes over); foldtune.train
adds a tiny backbone and one epoch to what the example asks, so that it trains in seconds.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import REPO

import foldtune
from foldtune.cli import infer_main
from foldtune.config import ConfigError, load_config
from foldtune.data.demo import make_demo
from foldtune.data.validate import DataError, read_csv_text

def readme_example(name: str) -> str:
    """The python block that follows `<!-- example: NAME -->` in README.md, as written there."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    found = re.search(rf"<!-- example: {name} -->\n```python\n(.*?)```\n", readme, re.S)
    assert found is not None, f"README.md has no python block marked <!-- example: {name} -->"
    return found.group(1)


@pytest.fixture
def demo_folder(tmp_path, monkeypatch, tiny_deberta):
    """tmp_path as the current folder, with configs/default.yaml and 24 + 6 demo essays in
    data/demo/; foldtune.train trains tiny_deberta for one epoch on 48 tokens."""
    (tmp_path / "configs").mkdir()
    shutil.copy(REPO / "configs" / "default.yaml", tmp_path / "configs" / "default.yaml")
    (tmp_path / "data" / "demo").mkdir(parents=True)
    train, test = make_demo(n_train=24, n_test=6, seed=4)
    train.to_csv(tmp_path / "data" / "demo" / "train.csv", index=False)
    test.to_csv(tmp_path / "data" / "demo" / "test.csv", index=False)
    monkeypatch.chdir(tmp_path)
    train_as_asked = foldtune.train

    def tiny_train(config=None, **overrides):
        return train_as_asked(config, **overrides, model__name=tiny_deberta, data__max_len=48, training__epochs=1)

    monkeypatch.setattr(foldtune, "train", tiny_train, raising=False)
    return tmp_path


def test_the_readme_examples_train_a_run_and_score_texts_as_infer_py_does(demo_folder, capsys):
    # as in a fresh Python session (an earlier test's train.py run may have left its handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    namespace: dict = {}
    exec(readme_example("train"), namespace)
    exec(readme_example("predict"), namespace)
    run = namespace["run"]
    assert run.parent == Path("runs") and run.name.startswith("default-") and (run / "scores.json").is_file()
    cfg = load_config(run / "config.yaml")
    assert (cfg.training.lr, cfg.folds.n_splits, cfg.training.epochs) == (5e-5, 3, 1)
    assert not (run / ".foldtune.lock").exists() and "run folder: runs/default-" in (run / "train.log").read_text()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler       # Ctrl-C interrupts again

    targets = list(cfg.data.target_columns)
    scores = namespace["scores"]
    assert list(scores.columns) == targets and scores.index.tolist() == [0, 1]
    trained = pd.read_csv("data/demo/train.csv")[targets].to_numpy()
    low, high = trained.min(), trained.max()            # no data.target_range: clipped to the trained range
    assert ((scores.to_numpy() >= low) & (scores.to_numpy() <= high)).all()
    # the submission frame is what infer.py writes for the same run and essays
    assert infer_main(["--run", str(run), "--out", "infer.csv"]) == 0
    written = read_csv_text("infer.csv")
    assert namespace["submission"][cfg.data.id_column].tolist() == written[cfg.data.id_column].tolist()
    np.testing.assert_array_equal(namespace["submission"][targets].to_numpy(),
                                  written[targets].to_numpy(dtype=np.float64).astype(np.float32))
    assert read_csv_text("submission.csv").equals(written)


def test_predict_averages_several_runs_exactly_as_infer_py(tiny_runs, tmp_path):
    runs_dir, run_a, run_b = tiny_runs
    test = pd.read_csv(runs_dir.parent / "test.csv")
    assert infer_main(["--run", str(run_a), "--run", str(run_b), "--out", str(tmp_path / "ab.csv")]) == 0
    written = read_csv_text(tmp_path / "ab.csv")
    targets = list(load_config(run_a / "config.yaml").data.target_columns)
    expected = written[targets].to_numpy(dtype=np.float64).astype(np.float32)
    series = pd.Series(test["full_text"].tolist(), index=[f"e{i}" for i in range(len(test))])
    scores = foldtune.predict([run_a, run_b], series)
    assert scores.index.tolist() == series.index.tolist() and list(scores.columns) == targets
    np.testing.assert_array_equal(scores.to_numpy(), expected)
    assert not np.array_equal(foldtune.predict(run_a, series).to_numpy(), expected)    # b counts


def test_train_raises_the_mistake_and_makes_no_run(tmp_path, monkeypatch, small_train_csv):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="training.lrr"):
        foldtune.train(None, data__train_file=small_train_csv, data__test_file=None, training__lrr=1e-4)
    pd.read_csv(small_train_csv).drop(columns=["cohesion"]).to_csv("no_cohesion.csv", index=False)
    with pytest.raises(DataError, match="missing target column 'cohesion'"):
        foldtune.train(None, data__train_file="no_cohesion.csv", data__test_file=None)
    with pytest.raises(ConfigError, match=r"foldtune.train\(lr=...\): a config key is written section__key"):
        foldtune.train(None, lr=1e-4)
    assert not Path("runs").exists()


def test_predict_refuses_what_is_not_a_list_of_texts(tiny_runs):
    run = tiny_runs[1]
    with pytest.raises(TypeError, match=r"texts is one str; pass a list of texts"):
        foldtune.predict(run, "one essay")
    with pytest.raises(TypeError, match=r"texts\[1\] is float, expected str \(1 text\(s\) are not str\)"):
        foldtune.predict(run, ["an essay", float("nan")])
    with pytest.raises(DataError, match="missing text column 'full_text'; did you mean 'fulltext'"):
        foldtune.predict(run, pd.DataFrame({"fulltext": ["an essay"]}))


def test_import_foldtune_loads_no_torch():
    code = "import sys, foldtune; foldtune.train; print(sorted(m for m in ('torch', 'pandas') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out == "[]\n"
