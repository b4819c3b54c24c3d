"""A blend or a stack exported for Kaggle (foldtune export --blend): its runs travel inside
it, and the export alone, scored by infer.py --blend's code or by the notebook, writes
the submission the originals wrote."""

from __future__ import annotations

import json
import os
import shutil

import nbformat
import numpy as np
import pandas as pd
import pytest
from conftest import train_two_tfidf_runs

from foldtune.cli import infer_main
from foldtune.ensemble import main as ensemble_main
from foldtune.export import main as export_main
from foldtune.inference import run_blend_inference

SRC = __import__("pathlib").Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Two TF-IDF runs, their blend and their stack, infer.py --blend's submissions of both,
    and the exports of both; then the runs, the blend and the stack are moved away."""
    work = tmp_path_factory.mktemp("export-ensemble")
    train_two_tfidf_runs(work, seed=5, n_test=7, names=("a", "b"))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        assert ensemble_main(["runs/a", "runs/b", "--out", "blend.json"]) == 0
        assert ensemble_main(["--stack", "runs/a", "runs/b", "--out", "stacks/ab"]) == 0
        for name, source in (("blend", "blend.json"), ("stack", "stacks/ab")):
            assert infer_main(["--blend", source, "--test", "test.csv", "--out", f"{name}.csv"]) == 0
            assert export_main(["--blend", source, "--out", f"kaggle_{name}"]) == 0
    moved = work / "moved"
    moved.mkdir()
    for path in ("runs", "stacks", "blend.json"):
        shutil.move(str(work / path), str(moved / path))
    return work


@pytest.mark.parametrize(("name", "top"), [("blend", "blend.json"), ("stack", "stack.json")])
def test_the_export_alone_writes_the_submission_of_the_originals(exports, name, top):
    export = exports / f"kaggle_{name}"
    info = json.loads((export / "export.json").read_text())
    assert info["file"] == top and info["members"] == {"0_a": [0, 1, 2], "1_b": [0, 1, 2]}
    assert json.loads((export / top).read_text())["members"] == ["members/0_a", "members/1_b"]
    for member in ("0_a", "1_b"):
        assert {"config.yaml", "run.json", "oof.csv"} <= {p.name for p in (export / "members" / member).iterdir()}
        assert (export / "members" / member / "fold_2" / "best" / "model.safetensors").is_file()
    if name == "stack":
        assert (export / "vocabulary.json").is_file()
    out = run_blend_inference(export / top, exports / "test.csv", exports / f"{name}_export.csv", device="cpu")
    expected, got = pd.read_csv(exports / f"{name}.csv"), pd.read_csv(out)
    assert got.text_id.tolist() == expected.text_id.tolist() and len(got) == 7
    np.testing.assert_allclose(got.iloc[:, 1:].to_numpy(), expected.iloc[:, 1:].to_numpy(), atol=1e-6, rtol=0)
    # the stack and the blend differ: the comparison above could not pass by accident
    other = pd.read_csv(exports / ("blend.csv" if name == "stack" else "stack.csv"))
    assert np.abs(other.iloc[:, 1:].to_numpy() - expected.iloc[:, 1:].to_numpy()).max() > 1e-3


def test_the_notebook_predicts_with_the_exported_stack(exports):
    from nbclient import NotebookClient

    export = exports / "kaggle_stack"
    notebook = nbformat.read(export / "inference.ipynb", as_version=4)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "FOLDTUNE_SRC": str(SRC),
           "FOLDTUNE_EXPORT": str(export), "FOLDTUNE_TEST": str(exports / "test.csv"),
           "FOLDTUNE_OUT": str(exports / "notebook.csv")}
    NotebookClient(notebook, kernel_name="python3", timeout=300,
                   resources={"metadata": {"path": str(exports)}}).execute(env=env)
    expected, got = pd.read_csv(exports / "stack.csv"), pd.read_csv(exports / "notebook.csv")
    assert got.text_id.tolist() == expected.text_id.tolist()
    np.testing.assert_allclose(got.iloc[:, 1:].to_numpy(), expected.iloc[:, 1:].to_numpy(), atol=1e-6, rtol=0)


def test_a_blend_with_an_unfinished_run_is_not_exported(exports, capsys, monkeypatch):
    monkeypatch.chdir(exports / "moved")
    (exports / "moved" / "runs" / "b" / "fold_1" / "result.json").rename(exports / "moved" / "b_result.json")
    try:
        assert export_main(["--blend", "blend.json", "--out", "kaggle_half"]) == 2
    finally:
        (exports / "moved" / "b_result.json").rename(exports / "moved" / "runs" / "b" / "fold_1" / "result.json")
    err = capsys.readouterr().err
    assert "fold(s) [1] of " in err and "have no finished checkpoint" in err and "--allow-missing-folds" not in err
    assert not (exports / "moved" / "kaggle_half").exists()
    with pytest.raises(SystemExit):
        export_main(["--blend", "blend.json", "--run", "runs/a", "--out", "x"])
    assert "not both" in capsys.readouterr().err
