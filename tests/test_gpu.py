"""CUDA-only paths: bf16 and fp16 (with its grad scaler) training and autocast inference."""

from __future__ import annotations

import numpy as np
import pandas as pd
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


def _graph_cfg(tmp_path, backbone, *extra):
    train, _ = make_demo(n_train=40, n_test=0, seed=2)
    train.to_csv(tmp_path / "train.csv", index=False)
    # no dropout and fp32: a replayed step then does what an eager step does
    return load_config(None, [f"data.train_file={tmp_path / 'train.csv'}", "data.test_file=null",
                              "data.max_len=64", "folds.n_splits=2", f"model.name={backbone}", "training.epochs=3",
                              "training.batch_size=8", "training.lr=1e-3", "training.eval_steps=2",
                              "training.max_grad_norm=1.0", "training.precision=fp32", "training.device=cuda",
                              "model.backbone_dropout=0.0", *extra])


@pytest.mark.parametrize("backbone", ["tiny_deberta", "tiny_deberta_4"])
def test_cuda_graph_steps_train_as_eager_steps_do(backbone, request, tmp_path, caplog):
    caplog.set_level("INFO", logger="foldtune")
    path = request.getfixturevalue(backbone)
    eager = run_cross_validation(_graph_cfg(tmp_path, path), tmp_path / "eager")
    graphed = run_cross_validation(_graph_cfg(tmp_path, path, "training.cuda_graphs=true"), tmp_path / "graphed")
    assert graphed["oof"]["mcrmse"] == pytest.approx(eager["oof"]["mcrmse"], abs=1e-4)
    for run in ("eager", "graphed"):
        assert (tmp_path / run / "oof.csv").is_file()
    a = pd.read_csv(tmp_path / "eager" / "oof.csv").iloc[:, 2:].to_numpy()
    b = pd.read_csv(tmp_path / "graphed" / "oof.csv").iloc[:, 2:].to_numpy()
    np.testing.assert_allclose(b, a, atol=1e-4)
    # 20 training rows a fold at batch 8: two full batches (one shape, one capture) and a short one (eager)
    log = (tmp_path / "graphed" / "fold_0" / "train.log").read_text()
    assert log.count("captured a CUDA graph") == 1
    la = pd.read_csv(tmp_path / "eager" / "fold_0" / "metrics.csv")["train_loss"].to_numpy()
    lb = pd.read_csv(tmp_path / "graphed" / "fold_0" / "metrics.csv")["train_loss"].to_numpy()
    np.testing.assert_allclose(lb, la, rtol=1e-4)


def test_a_graphed_run_stopped_midway_resumes_to_the_same_oof(tiny_deberta, tmp_path, monkeypatch):
    import signal

    from foldtune.training import stopping
    from foldtune.training.cross_validation import resume_run
    from foldtune.training.stopping import TrainingInterrupted
    from foldtune.training.trainer import FoldTrainer

    cfg = _graph_cfg(tmp_path, tiny_deberta, "training.cuda_graphs=true", "training.save_state_steps=2",
                     "model.backbone_dropout=null", "model.head_dropout=0.1")
    straight = run_cross_validation(cfg, tmp_path / "straight")
    original = FoldTrainer._count_step

    def counting(self):
        original(self)
        if self.data.fold == 1 and self.step == 4:
            stopping.request_stop(signal.SIGTERM)

    monkeypatch.setattr(FoldTrainer, "_count_step", counting)
    try:
        with pytest.raises(TrainingInterrupted):
            run_cross_validation(cfg, tmp_path / "stopped")
    finally:
        stopping.clear_stop_request()
    monkeypatch.setattr(FoldTrainer, "_count_step", original)
    resumed = resume_run(tmp_path / "stopped")
    # dropout is on: the replays draw the same random numbers after a resume as without a stop
    assert resumed["oof"]["mcrmse"] == pytest.approx(straight["oof"]["mcrmse"], abs=1e-4)


def test_graphed_folds_in_threads_give_the_sequential_results(tiny_deberta, tmp_path):
    sequential = run_cross_validation(_graph_cfg(tmp_path, tiny_deberta, "training.cuda_graphs=true"), tmp_path / "s")
    threads = run_cross_validation(_graph_cfg(tmp_path, tiny_deberta, "training.cuda_graphs=true",
                                              "training.parallel_folds=2", "training.parallel_mode=threads"),
                                   tmp_path / "t")
    a = pd.read_csv(tmp_path / "s" / "oof.csv").iloc[:, 2:].to_numpy()
    b = pd.read_csv(tmp_path / "t" / "oof.csv").iloc[:, 2:].to_numpy()
    np.testing.assert_allclose(b, a, atol=1e-4)
    assert threads["oof"]["mcrmse"] == pytest.approx(sequential["oof"]["mcrmse"], abs=1e-5)
