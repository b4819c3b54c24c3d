"""MiniLM trained briefly on a slice of the real essays beats predicting the mean.

Reads ../shared/data/ellipse/train.csv (skipped when absent); the slice is written to a
temporary folder, never into the repository.
"""

from __future__ import annotations

import logging

import pandas as pd
import pytest

from conftest import ELLIPSE, REPO
from foldtune.config import load_config
from foldtune.training.cross_validation import run_cross_validation

pytestmark = pytest.mark.skipif(not (ELLIPSE / "train.csv").is_file(), reason="../shared/data/ellipse is absent")

N_ESSAYS = 400


def test_minilm_on_real_essays_beats_the_mean_predictor_on_the_same_folds(tmp_path, caplog):
    essays = pd.read_csv(ELLIPSE / "train.csv").head(N_ESSAYS)
    essays.to_csv(tmp_path / "train.csv", index=False)
    cfg = load_config(None, [
        f"data.train_file={tmp_path / 'train.csv'}", "data.test_file=null", "data.max_len=128",
        "folds.n_splits=2", "model.name=sentence-transformers/all-MiniLM-L6-v2",
        "training.epochs=2", "training.batch_size=8", "training.lr=1e-4", "training.head_lr=1e-2",
        f"output.dir={tmp_path / 'runs'}",
    ])
    with caplog.at_level(logging.INFO, logger="foldtune"):
        scores = run_cross_validation(cfg, tmp_path / "runs" / "slice")
    assert scores["n_rows"] == N_ESSAYS
    # the mean predictor scores 0.643 on these folds; 50 steps of training reached 0.589 here
    assert scores["mean_predictor_mcrmse"] > 0.55
    assert scores["oof"]["mcrmse"] < scores["mean_predictor_mcrmse"] - 0.03, scores


@pytest.mark.parametrize("config", ["configs/ellipse_minilm_windows.yaml"])
def test_the_windows_config_reads_every_token_of_every_real_essay(config):
    """Its max_windows covers the longest essay of train.csv and test.csv (1,527 tokens)."""
    from foldtune.data.dataset import encode_data
    from foldtune.models.regressor import load_tokenizer

    cfg = load_config(REPO / config, [f"data.train_file={ELLIPSE / 'train.csv'}"])
    tokenizer = load_tokenizer(cfg.model.name)
    for name in ("train.csv", "test.csv"):
        texts = pd.read_csv(ELLIPSE / name)["full_text"].tolist()
        encoded = encode_data(tokenizer, texts, cfg.data)
        assert encoded.n_truncated == 0, f"{encoded.n_truncated} essays of {name} cut"
        # every token of the body is read: the ids are the whole text between [CLS] and [SEP]
        assert [len(ids) for ids in encoded.input_ids] == encoded.full_lengths.tolist()
