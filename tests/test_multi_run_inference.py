"""infer.py averages several runs with weights, weighs folds, reads longer texts, and
refuses weights and runs that cannot be averaged."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoTokenizer

from foldtune.checkpoint import load_checkpoint
from foldtune.cli import infer_main
from foldtune.data.dataset import TextDataset, encode_texts
from foldtune.inference import (check_max_len, normalized_weights, predict, predict_run, predict_runs,
                                run_inference)
from foldtune.runtime.precision import resolve_precision


@pytest.fixture(scope="module")
def texts(tiny_runs):
    runs_dir = tiny_runs[0]
    return pd.read_csv(runs_dir.parent / "test.csv")["full_text"].tolist()


def test_two_runs_weighted_075_025(tiny_runs, tmp_path):
    runs_dir, run_a, run_b = tiny_runs
    test = pd.read_csv(runs_dir.parent / "test.csv")
    a, _ = predict_run(run_a, test["full_text"].tolist())
    b, _ = predict_run(run_b, test["full_text"].tolist())
    assert np.abs(a - b).max() > 1e-3                     # two different runs
    out = tmp_path / "sub.csv"
    assert infer_main(["--run", str(run_a), "--run", str(run_b), "--weights", "0.75,0.25", "--no-clip",
                       "--test", str(runs_dir.parent / "test.csv"), "--out", str(out)]) == 0
    sub = pd.read_csv(out)
    assert sub["text_id"].tolist() == test["text_id"].tolist()
    np.testing.assert_allclose(sub.iloc[:, 1:].to_numpy(), 0.75 * a + 0.25 * b, atol=1e-6, rtol=0)
    # weights are normalised: 3,1 is 0.75,0.25; equal weights by default
    blend, meta = predict_runs([run_a, run_b], test["full_text"].tolist(), weights=[3, 1])
    np.testing.assert_allclose(blend, 0.75 * a + 0.25 * b, atol=1e-6, rtol=0)
    assert meta["n_folds"] == 4 and meta["weights"] == [0.75, 0.25]
    equal, _ = predict_runs([run_a, run_b], test["full_text"].tolist())
    np.testing.assert_allclose(equal, (a + b) / 2, atol=1e-6, rtol=0)
    # per-target weights (runs x targets), the form a blend file takes
    matrix = np.array([[1.0] * 3 + [0.0] * 3, [0.0] * 3 + [1.0] * 3])
    per_target, _ = predict_runs([run_a, run_b], test["full_text"].tolist(), weights=matrix)
    np.testing.assert_allclose(per_target, np.hstack([a[:, :3], b[:, 3:]]), atol=1e-6, rtol=0)


def test_fold_weights_and_inference_max_len(tiny_runs, texts):
    _, run_a, _ = tiny_runs
    precision = resolve_precision("fp32", torch.device("cpu"))
    folds = []
    for fold in (0, 1):
        model, _ = load_checkpoint(run_a / f"fold_{fold}" / "best")
        tokenizer = AutoTokenizer.from_pretrained(str(run_a / f"fold_{fold}" / "best"))
        data = TextDataset(encode_texts(tokenizer, texts, 48).input_ids)
        folds.append(predict(model, data, 4, tokenizer.pad_token_id, torch.device("cpu"), precision))
    weighted, _ = predict_run(run_a, texts, fold_weights=[0.3, 0.1])
    np.testing.assert_allclose(weighted, 0.75 * folds[0] + 0.25 * folds[1], atol=1e-6, rtol=0)
    plain, _ = predict_run(run_a, texts)
    np.testing.assert_allclose(plain, (folds[0] + folds[1]) / 2, atol=1e-6, rtol=0)
    np.testing.assert_allclose(predict_run(run_a, texts, max_len=48)[0], plain, atol=0, rtol=0)
    longer, _ = predict_run(run_a, texts, max_len=160)     # beyond training's 48: the texts are read further
    assert longer.shape == plain.shape and np.abs(longer - plain).max() > 1e-4


def test_bad_weights_and_mismatched_runs_fail_clearly(tiny_runs, tmp_path, texts, capsys):
    runs_dir, run_a, run_b = tiny_runs
    with pytest.raises(ValueError, match=r"3 weight\(s\) given, 2 expected"):
        predict_runs([run_a, run_b], texts, weights=[0.5, 0.3, 0.2])
    with pytest.raises(ValueError, match="must not be negative"):
        predict_runs([run_a, run_b], texts, weights=[1.2, -0.2])
    with pytest.raises(ValueError, match="sum to zero"):
        normalized_weights([0, 0], 2, "run weights")
    with pytest.raises(ValueError, match=r"fold weights of .*: 3 weight\(s\) given, 2 expected"):
        predict_run(run_a, texts, fold_weights=[1, 1, 1])
    with pytest.raises(ValueError, match="one column per target"):
        predict_runs([run_a, run_b], texts, weights=np.ones((2, 4)))
    other = tmp_path / "other"
    shutil.copytree(run_b, other)
    for meta_file in other.glob("fold_*/best/foldtune.json"):
        meta = json.loads(meta_file.read_text())
        meta["target_columns"] = meta["target_columns"][::-1]
        meta_file.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="runs with different target columns cannot be averaged"):
        run_inference([run_a, other], runs_dir.parent / "test.csv", tmp_path / "sub.csv")
    assert not (tmp_path / "sub.csv").exists()

    test = str(runs_dir.parent / "test.csv")
    cases = [
        (["--run", str(run_a), "--run", str(run_b), "--weights", "0.6"], "1 weight(s) given, 2 expected"),
        (["--run", str(run_a), "--weights", "0.6,x"], "--weights '0.6,x': expected numbers separated by commas"),
        (["--run", str(run_a), "--run", str(run_b), "--fold-weights", "1,1"],
         "--fold-weights given 1 time(s) for 2 --run(s)"),
        (["--run", str(run_a), "--precision", "fp16", "--device", "cpu"], "precision 'fp16' needs a CUDA device"),
        (["--run", str(run_a), "--batch-size", "0"], "--batch-size 0: expected an integer >= 1"),
    ]
    for args, message in cases:
        assert infer_main([*args, "--test", test, "--out", str(tmp_path / "sub.csv")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "sub.csv").exists()


def test_max_len_beyond_learned_positions_is_refused():
    bert = SimpleNamespace(max_position_embeddings=512, model_type="bert")
    check_max_len(bert, 512)
    with pytest.raises(ValueError, match="max_len 513 exceeds the 512 positions of this bert backbone"):
        check_max_len(bert, 513)
    check_max_len(SimpleNamespace(max_position_embeddings=512, position_biased_input=False,
                                  model_type="deberta-v2"), 2048)       # relative positions only
