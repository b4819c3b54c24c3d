"""CUDA-only paths: bf16 and fp16 (with its grad scaler) training and autocast inference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from transformers import AutoTokenizer

from foldtune.checkpoint import load_checkpoint
from foldtune.config import load_config
from foldtune.data.dataset import TextDataset, encode_texts
from foldtune.data.demo import make_demo
from foldtune.inference import predict
from foldtune.training.cross_validation import run_cross_validation
from foldtune.training.precision import resolve_precision

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_on_cuda(precision, tiny_deberta, tmp_path):
    train, test = make_demo(n_train=40, n_test=10, seed=2)
    train.to_csv(tmp_path / "train.csv", index=False)
    cfg = load_config(None, [f"data.train_file={tmp_path / 'train.csv'}", "data.test_file=null", "data.max_len=64",
                             "folds.n_splits=2", f"model.name={tiny_deberta}", "training.epochs=2",
                             "training.batch_size=8", f"training.precision={precision}", "training.device=cuda"])
    scores = run_cross_validation(cfg, tmp_path / "run")
    assert np.isfinite(scores["oof"]["mcrmse"]) and scores["n_rows"] == 40
    assert resolve_precision(precision, torch.device("cuda")).scaler.is_enabled() == (precision == "fp16")

    # autocast predictions of a checkpoint stay close to its fp32 predictions
    model, _ = load_checkpoint(tmp_path / "run" / "fold_0" / "best", "cuda")
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "run" / "fold_0" / "best"))
    data = TextDataset(encode_texts(tokenizer, test["full_text"].tolist(), 64).input_ids)
    device = torch.device("cuda")
    fp32 = predict(model, data, 4, tokenizer.pad_token_id, device, resolve_precision("fp32", device))
    low = predict(model, data, 4, tokenizer.pad_token_id, device, resolve_precision(precision, device))
    np.testing.assert_allclose(low, fp32, atol=0.05)


def test_8bit_adamw_trains_on_cuda(tiny_deberta, tmp_path):
    pytest.importorskip("bitsandbytes")
    train, _ = make_demo(n_train=40, n_test=0, seed=2)
    train.to_csv(tmp_path / "train.csv", index=False)
    cfg = load_config(None, [f"data.train_file={tmp_path / 'train.csv'}", "data.test_file=null", "data.max_len=64",
                             "folds.n_splits=2", f"model.name={tiny_deberta}", "training.epochs=2",
                             "training.batch_size=8", "training.optimizer=adamw_8bit", "training.lr=1e-3",
                             "training.layerwise_lr_decay=0.8", "awp.enabled=true", "awp.start_epoch=1"])
    scores = run_cross_validation(cfg, tmp_path / "run")
    assert np.isfinite(scores["oof"]["mcrmse"])

    from foldtune.config import ModelConfig, TrainingConfig
    from foldtune.models.regressor import TextRegressor
    from foldtune.optim.factory import build_optimizer

    model = TextRegressor.from_pretrained(ModelConfig(name=str(tiny_deberta)), 6).cuda()
    opt = build_optimizer(model, TrainingConfig(optimizer="adamw_8bit", lr=1e-3), torch.device("cuda"))
    assert type(opt).__name__ == "AdamW8bit"
    before = [p.detach().clone() for p in model.parameters()]
    ids = torch.tensor([[2, 10, 11, 3]], device="cuda")
    model(ids, torch.ones_like(ids)).pow(2).mean().backward()
    opt.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
