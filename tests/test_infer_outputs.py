"""What infer.py writes: predictions clipped to the targets' range (raw with --no-clip),
for runs and for blends; and, when it is interrupted (Ctrl-C), nothing: exit 130 and one
line. The models are stood in for: predictions here fall outside the range on purpose."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import foldtune
from foldtune import inference
from foldtune.cli import infer_main
from foldtune.config import load_config, save_config
from foldtune.data.validate import read_csv_text
from foldtune.ensemble import BLEND_FORMAT

SRC = Path(__file__).resolve().parents[1] / "src"
# two test rows, two targets; every value is exact in float32 and in the CSV
RAW = np.array([[0.25, 7.5], [3.5, -4.0]], dtype=np.float32)


def _run(root: Path, name: str, *overrides: str) -> Path:
    """A run folder as far as infer.py reads it before predicting: its config."""
    run = root / name
    run.mkdir(parents=True)
    save_config(load_config(None, ["data.id_column=id", "data.text_column=text", "data.target_columns=a,b",
                                   f"data.test_file={root / 'test.csv'}", *overrides]), run / "config.yaml")
    return run


@pytest.fixture
def root(tmp_path):
    pd.DataFrame({"id": ["x", "y"], "text": ["one essay", "another essay"]}).to_csv(tmp_path / "test.csv", index=False)
    return tmp_path


def _predicting(monkeypatch, preds_of: dict[str, np.ndarray], trained_range=(2.0, 4.0)) -> None:
    """predict_run / predict_runs return these predictions (by run folder name)."""
    def meta(n_folds):
        return {"target_columns": ["a", "b"], "target_range": list(trained_range), "n_folds": n_folds}

    monkeypatch.setattr(inference, "predict_run", lambda run, texts, *a, **k: (preds_of[Path(run).name], meta(2)))
    monkeypatch.setattr(inference, "predict_runs", lambda runs, texts, *a, **k: (preds_of[Path(runs[0]).name],
                                                                                    meta(2 * len(runs))))


def _submitted(path: Path) -> np.ndarray:
    frame = read_csv_text(path)
    assert frame["id"].tolist() == ["x", "y"]
    return frame[["a", "b"]].to_numpy(dtype=np.float64)


@pytest.mark.parametrize(("declared", "low", "high"), [(("data.target_range=[1, 5]",), 1.0, 5.0), ((), 2.0, 4.0)])
def test_run_predictions_are_clipped_to_the_range_or_kept_raw(declared, low, high, root, monkeypatch):
    """The declared data.target_range, else the range the training targets spanned."""
    run = _run(root, "r", *declared)
    _predicting(monkeypatch, {"r": RAW})
    assert infer_main(["--run", str(run), "--out", str(root / "clipped.csv")]) == 0
    np.testing.assert_array_equal(_submitted(root / "clipped.csv"), [[low, high], [3.5, low]])
    assert infer_main(["--run", str(run), "--out", str(root / "raw.csv"), "--no-clip"]) == 0
    np.testing.assert_array_equal(_submitted(root / "raw.csv"), RAW)


@pytest.mark.parametrize(("declared", "low", "high"), [(("data.target_range=[1, 5]",), 1.0, 5.0), ((), 2.0, 4.0)])
def test_foldtune_predict_clips_as_infer_py_or_keeps_raw(declared, low, high, root, monkeypatch):
    run = _run(root, "r", *declared)
    _predicting(monkeypatch, {"r": RAW})
    scores = foldtune.predict(run, ["one essay", "another essay"])
    assert list(scores.columns) == ["a", "b"] and scores.index.tolist() == [0, 1]
    np.testing.assert_array_equal(scores.to_numpy(), [[low, high], [3.5, low]])
    np.testing.assert_array_equal(foldtune.predict(run, ["one essay", "another essay"], clip=False).to_numpy(), RAW)
    # a frame with the run's id and text columns: the submission infer.py writes
    submission = foldtune.predict(run, pd.read_csv(root / "test.csv"))
    assert infer_main(["--run", str(run), "--out", str(root / "sub.csv")]) == 0
    assert submission.equals(read_csv_text(root / "sub.csv").astype({"a": np.float32, "b": np.float32}))


def test_blend_members_are_clipped_before_they_are_blended(root, monkeypatch):
    _run(root, "r1", "data.target_range=[1, 5]")
    _run(root, "r2", "data.target_range=[1, 5]")
    blend = {"format": BLEND_FORMAT, "members": ["r1", "r2"], "target_columns": ["a", "b"],
             "weights": {"a": [0.5, 0.5], "b": [0.25, 0.75]}}
    (root / "blend.json").write_text(json.dumps(blend))
    _predicting(monkeypatch, {"r1": np.array([[0.0, 9.0]] * 2, np.float32), "r2": np.array([[2.0, 3.0]] * 2,
                                                                                             np.float32)})
    assert infer_main(["--blend", str(root / "blend.json"), "--out", str(root / "clipped.csv")]) == 0
    # a: 0.5 * 1 + 0.5 * 2; b: 0.25 * 5 + 0.75 * 3 (clipping the blend instead would give a = 1.0)
    np.testing.assert_array_equal(_submitted(root / "clipped.csv"), [[1.5, 3.5]] * 2)
    assert infer_main(["--blend", str(root / "blend.json"), "--out", str(root / "raw.csv"), "--no-clip"]) == 0
    np.testing.assert_array_equal(_submitted(root / "raw.csv"), [[1.0, 4.5]] * 2)


def _last_line(err: str) -> str:
    assert "Traceback" not in err
    return err.rstrip("\n").splitlines()[-1]


INTERRUPTED = "foldtune infer: interrupted (Ctrl-C); no submission was written"   # infer_main called from Python


def _infer_interrupted(args: list[str]) -> int:
    try:
        return infer_main(args)
    except KeyboardInterrupt:       # not raised on: it would stop the test session
        pytest.fail("infer_main let the KeyboardInterrupt out: the user sees a traceback")


def test_an_interrupted_prediction_exits_130_with_one_line_and_no_file(root, monkeypatch, capsys):
    run = _run(root, "r")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(inference, "predict_runs", interrupted)
    assert _infer_interrupted(["--run", str(run), "--out", str(root / "sub.csv")]) == 130
    assert _last_line(capsys.readouterr().err) == INTERRUPTED
    assert not (root / "sub.csv").exists()


def test_an_interrupted_write_leaves_no_file_and_no_temporary_file(root, monkeypatch, capsys):
    run = _run(root, "r")
    _predicting(monkeypatch, {"r": RAW})
    write = pd.DataFrame.to_csv

    def interrupted_write(frame, path, *args, **kwargs):
        write(frame.head(1), path, *args, **kwargs)         # half written
        raise KeyboardInterrupt

    monkeypatch.setattr(pd.DataFrame, "to_csv", interrupted_write)
    assert _infer_interrupted(["--run", str(run), "--out", str(root / "out" / "sub.csv")]) == 130
    assert _last_line(capsys.readouterr().err) == INTERRUPTED
    assert os.listdir(root / "out") == []


def test_ctrl_c_while_infer_py_predicts(root):
    """The real signal, in a process of its own: exit 130, one line, no file."""
    run = _run(root, "r")
    script = textwrap.dedent("""
        import sys, time
        from foldtune import inference
        from foldtune.cli import infer_main

        def slow(*args, **kwargs):
            print("predicting", file=sys.stderr, flush=True)
            time.sleep(120)

        inference.predict_runs = slow
        sys.exit(infer_main(sys.argv[1:]))
    """)
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    process = subprocess.Popen([sys.executable, "-c", script, "--run", str(run), "--out", str(root / "sub.csv")],
                               env=env, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in process.stderr:
        lines.append(line)
        if line == "predicting\n":
            break
    process.send_signal(signal.SIGINT)
    err = "".join(lines) + process.stderr.read()
    assert process.wait(timeout=60) == 130
    assert _last_line(err) == INTERRUPTED
    assert not (root / "sub.csv").exists()
