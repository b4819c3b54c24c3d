"""infer.py names missing or unreadable folds, refuses folds that do not belong together,
and checks the submission before writing it."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from foldtune.checkpoint import CheckpointError
from foldtune.config import load_config
from foldtune.data.demo import make_demo
from foldtune.inference import predict_run, run_inference, write_submission
from foldtune.training.cross_validation import run_cross_validation


@pytest.fixture(scope="module")
def run(tiny_deberta, tmp_path_factory):
    work = tmp_path_factory.mktemp("infer-checks")
    train, test = make_demo(n_train=30, n_test=5, seed=12)
    train.to_csv(work / "train.csv", index=False)
    test.to_csv(work / "test.csv", index=False)
    cfg = load_config(None, [f"data.train_file={work / 'train.csv'}", f"data.test_file={work / 'test.csv'}",
                             "data.max_len=40", "folds.n_splits=3", f"model.name={tiny_deberta}",
                             "training.epochs=1", "training.batch_size=10", "data.target_range=[1, 5]"])
    run_cross_validation(cfg, work / "run")
    return work / "run", test


@pytest.fixture
def copy(run, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(run[0], target)
    return target, run[1]


def test_a_missing_fold_stops_inference_unless_allowed(copy, tmp_path):
    run, test = copy
    shutil.rmtree(run / "fold_1" / "best")
    with pytest.raises(CheckpointError, match=r"fold\(s\) \[1\] of .* have no finished checkpoint .*--resume"):
        run_inference(run, None, tmp_path / "sub.csv")
    assert not (tmp_path / "sub.csv").exists()
    run_inference(run, None, tmp_path / "sub.csv", allow_missing_folds=True)
    two = pd.read_csv(tmp_path / "sub.csv")
    preds, meta = predict_run(run, test["full_text"].tolist(), allow_missing_folds=True)
    assert meta["n_folds"] == 2
    np.testing.assert_allclose(two.iloc[:, 1:].to_numpy(), np.clip(preds, 1, 5), atol=1e-6)


def test_an_unreadable_fold_is_named(copy, tmp_path):
    run, _ = copy
    weights = run / "fold_2" / "best" / "model.safetensors"
    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=rf"{weights} cannot be read"):
        run_inference(run, None, tmp_path / "sub.csv")
    run_inference(run, None, tmp_path / "sub.csv", allow_missing_folds=True)
    assert len(pd.read_csv(tmp_path / "sub.csv")) == 5


def test_folds_with_other_targets_or_tokenizers_are_refused(copy, tmp_path):
    run, _ = copy
    meta_file = run / "fold_1" / "best" / "foldtune.json"
    meta = json.loads(meta_file.read_text())
    original = dict(meta)
    meta["target_columns"] = meta["target_columns"][::-1]
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="folds of different runs cannot be averaged"):
        run_inference(run, None, tmp_path / "sub.csv")
    meta_file.write_text(json.dumps(original))
    tokenizer = run / "fold_2" / "best" / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text().replace("[MASK]", "[MASQ]"))
    with pytest.raises(CheckpointError, match="was trained with another tokenizer"):
        run_inference(run, None, tmp_path / "sub.csv")


def test_the_submission_is_checked_before_it_is_written(tmp_path):
    out = tmp_path / "sub.csv"
    with pytest.raises(ValueError, match="one row per id: 2 ids \\(1 distinct\\)"):
        write_submission(out, ["a", "a"], np.ones((2, 2)), ["x", "y"], "id")
    with pytest.raises(ValueError, match=r"predictions of 1 row\(s\) are NaN or infinite"):
        write_submission(out, ["a", "b"], np.array([[1.0, np.nan], [1.0, 2.0]]), ["x", "y"], "id")
    with pytest.raises(ValueError, match="needs 3 target columns"):
        write_submission(out, ["a", "b"], np.ones((2, 2)), ["x", "y", "z"], "id")
    assert not out.exists()
    write_submission(out, ["a", "b"], np.array([[1.0, 2.0], [3.0, 4.0]]), ["x", "y"], "id")
    assert out.read_text() == "id,x,y\na,1.0,2.0\nb,3.0,4.0\n"


def test_predictions_are_clipped_to_the_declared_range(copy, tmp_path):
    run, test = copy
    raw, _ = predict_run(run, test["full_text"].tolist())
    run_inference(run, None, tmp_path / "sub.csv")
    clipped = pd.read_csv(tmp_path / "sub.csv").iloc[:, 1:].to_numpy()
    np.testing.assert_allclose(clipped, np.clip(raw, 1.0, 5.0), atol=1e-6)


def _rewrite_tokenizer_json(folder, change) -> None:
    path = folder / "tokenizer.json"
    spec = json.loads(path.read_text(encoding="utf-8"))
    change(spec)
    path.write_text(json.dumps(spec, indent=1), encoding="utf-8")


def test_folds_are_compared_by_what_their_tokenizers_do_not_by_their_bytes(copy, tmp_path):
    """A fold-parallel process that never tokenized wrote tokenizer.json with the truncation
    and padding of its loading, another one without: the same tokenizer, other bytes."""
    run, test = copy
    texts = test["full_text"].tolist()
    before, _ = predict_run(run, texts)

    def last_call_state(spec):
        spec["truncation"] = {"direction": "Right", "max_length": 128, "strategy": "LongestFirst", "stride": 0}
        spec["padding"] = {"strategy": {"Fixed": 128}, "direction": "Right", "pad_to_multiple_of": None,
                           "pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]"}

    _rewrite_tokenizer_json(run / "fold_1" / "best", last_call_state)
    assert (run / "fold_1" / "best" / "tokenizer.json").read_bytes() != (
        run / "fold_0" / "best" / "tokenizer.json").read_bytes()
    after, meta = predict_run(run, texts)
    assert meta["n_folds"] == 3
    np.testing.assert_array_equal(after, before)

    # a cased tokenizer beside uncased ones is refused, and the message says what differs
    settings = run / "fold_2" / "best" / "tokenizer_config.json"
    settings.write_text(settings.read_text().replace('"do_lower_case": true', '"do_lower_case": false'))
    with pytest.raises(CheckpointError, match=r"fold_2/best was trained with another tokenizer than .*fold_0/best "
                                              r"\(their normalizer, settings, probe encoding differ\)"):
        predict_run(run, texts)


def test_a_tokenizer_is_saved_the_same_whether_or_not_it_has_tokenized(tiny_bert):
    from transformers import AutoTokenizer

    from foldtune.checkpoint import tokenizer_files
    from foldtune.data.dataset import encode_texts

    fresh = AutoTokenizer.from_pretrained(str(tiny_bert))
    used = AutoTokenizer.from_pretrained(str(tiny_bert))
    encode_texts(used, ["a long essay " * 200, "a short one"], 64)
    # MiniLM's tokenizer.json records truncation and padding at 128; a call clears them
    assert fresh.backend_tokenizer.truncation is not None and used.backend_tokenizer.truncation is None
    files = tokenizer_files(fresh)
    assert files == tokenizer_files(used)
    assert json.loads(files["tokenizer.json"])["truncation"] is None
