"""A file changed after foldtune wrote it is found, not used: fold checkpoints record the
SHA-256 of their weights (infer, resume, export and compress check it), training states
the SHA-256 of their contents. The change here keeps each file's size and format, so
that only the recorded digest can tell."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import train_tiny_run
from safetensors import safe_open

from foldtune.checkpoint import CheckpointError, load_checkpoint
from foldtune.compress import compress_run
from foldtune.export import export_run
from foldtune.inference import predict_run, run_inference
from foldtune.training.resume import resume_run
from foldtune.training.state import StateError, capture_rng, load_state, save_state


@pytest.fixture(scope="module")
def trained(tiny_deberta, tmp_path_factory):
    work = tmp_path_factory.mktemp("integrity")
    return train_tiny_run(tiny_deberta, work, "r")


@pytest.fixture
def run(trained, tmp_path):
    return shutil.copytree(trained, tmp_path / "r")


def overwrite_middle(path, start=None, n_bytes=4096) -> None:
    """Replace n_bytes of `path` (from its middle, or from `start`) by random float32 values: same size."""
    data = bytearray(path.read_bytes())
    start = len(data) // 2 if start is None else start
    data[start:start + n_bytes] = np.random.default_rng(0).standard_normal(n_bytes // 4).astype(np.float32).tobytes()
    path.write_bytes(bytes(data))


def changed_weights(run, fold: int):
    weights = run / f"fold_{fold}" / "best" / "model.safetensors"
    overwrite_middle(weights)
    with safe_open(str(weights), framework="pt") as opened:     # still a valid safetensors file
        assert len(list(opened.keys())) > 10
    return weights


def changed_message(weights, fold: int, remedy: str) -> str:
    return re.escape(f"fold {fold}: {weights} does not match the SHA-256 recorded when it was written (the file "
                     f"changed after it was saved): {remedy}")


def test_a_checkpoint_records_the_sha256_and_size_of_its_weights(trained):
    for fold in (0, 1):
        best = trained / f"fold_{fold}" / "best"
        data = (best / "model.safetensors").read_bytes()
        assert json.loads((best / "foldtune.json").read_text())["files"] == {
            "model.safetensors": {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}}


def test_infer_refuses_weights_changed_in_place_naming_file_and_fold(run, tmp_path, caplog):
    weights = changed_weights(run, fold=1)
    with pytest.raises(CheckpointError, match=changed_message(weights, 1, f"retrain the fold with python train.py "
                                                                          f"--resume {run}")):
        run_inference(run, None, tmp_path / "sub.csv", device="cpu")
    assert not (tmp_path / "sub.csv").exists()
    # --allow-missing-folds: the changed fold is left out, with the reason
    texts = ["A short essay about school.", "Another one, about the weather and my friends."]
    preds, meta = predict_run(run, texts, device="cpu", allow_missing_folds=True)
    assert meta["n_folds"] == 1
    np.testing.assert_array_equal(preds, predict_run(run, texts, device="cpu", folds=[0])[0])
    assert f"fold 1: {weights} does not match the SHA-256" in caplog.text and "left out of the average" in caplog.text


def test_resume_retrains_only_the_changed_fold(run, trained, caplog):
    weights = changed_weights(run, fold=1)
    untouched = (run / "fold_0" / "best" / "model.safetensors").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="foldtune"):
        resume_run(run)
    assert f"fold 1: to train ({weights} does not match the SHA-256 recorded when it was written)" in caplog.text
    assert "fold 0: finished before, its files check out: skipped" in caplog.text
    assert (run / "fold_0" / "best" / "model.safetensors").stat().st_mtime_ns == untouched
    # fold 1 trained again, to the same weights as before the change
    assert weights.read_bytes() == (trained / "fold_1" / "best" / "model.safetensors").read_bytes()
    load_checkpoint(weights.parent)
    np.testing.assert_allclose(pd.read_csv(run / "oof.csv").iloc[:, 2:].to_numpy(),
                               pd.read_csv(trained / "oof.csv").iloc[:, 2:].to_numpy(), rtol=0, atol=1e-6)


def test_export_refuses_a_changed_fold(run, tmp_path):
    weights = changed_weights(run, fold=0)
    with pytest.raises(CheckpointError, match=changed_message(weights, 0, f"retrain the fold with python train.py "
                                                                          f"--resume {run}")):
        export_run(run, tmp_path / "kaggle")
    assert not (tmp_path / "kaggle").exists()


def test_a_compressed_copy_records_its_own_weights_and_is_checked(run, tmp_path):
    out = tmp_path / "small"
    compress_run(run, out, rank=8)
    best = out / "fold_1" / "best"
    data = (best / "model.safetensors").read_bytes()
    assert json.loads((best / "foldtune.json").read_text())["files"]["model.safetensors"] == {
        "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    weights = changed_weights(out, fold=1)
    with pytest.raises(CheckpointError, match=changed_message(
            weights, 1, f"compress its run again (the source named in {out / 'compress.json'}) into {out}")):
        load_checkpoint(weights.parent)
    # the source's own checkpoints were checked when compress loaded them
    changed_weights(run, fold=0)
    with pytest.raises(CheckpointError, match=r"fold 0: .* does not match the SHA-256"):
        compress_run(run, tmp_path / "small2", rank=8)


def test_a_checkpoint_without_a_record_loads_with_one_warning(run, caplog):
    for fold in (0, 1):
        meta_file = run / f"fold_{fold}" / "best" / "foldtune.json"
        meta = json.loads(meta_file.read_text())
        del meta["files"]
        meta_file.write_text(json.dumps(meta))
    preds, meta = predict_run(run, ["An essay."], device="cpu")
    assert meta["n_folds"] == 2 and np.isfinite(preds).all()
    warnings = [r.getMessage() for r in caplog.records if "record no SHA-256" in r.getMessage()]
    assert warnings == [f"{run}: its checkpoints record no SHA-256 of their weights (written by an older foldtune): "
                        "they are loaded unchecked; a change to them would go unnoticed"]


def test_a_training_state_changed_in_place_is_refused(tmp_path):
    torch.manual_seed(0)
    weight = torch.randn(64, 64)
    state = {"step": 3, "model": {"w": weight, "b": torch.zeros(64)}, "rng": capture_rng(),
             "metrics_rows": [{"step": 2, "val_mcrmse": 0.5, "lr": float("nan")}], "best": {"oof": None}}
    path = save_state(tmp_path / "fold_0", state, keep=2)
    loaded = load_state(path)
    assert torch.equal(loaded["model"]["w"], weight) and loaded["step"] == 3 and "sha256" not in loaded
    # 4 KB inside the weight's 16 KB: the zip and its pickle stay readable
    overwrite_middle(path, start=path.read_bytes().index(weight.numpy().tobytes()) + 4096)
    with pytest.raises(StateError, match=re.escape(
            f"training state {path} does not match the SHA-256 recorded when it was written (the file changed "
            "after it was saved); delete it to train this fold again from the start")):
        load_state(path)
