"""Two processes on two GPUs (NCCL) through accelerate launch, each run ending with
infer.py: fold-parallel with each process's folds in threads and CUDA graphs; data-parallel
against one GPU; data-parallel with the fused attention in fp16. Needs two CUDA devices."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import accelerate_launch
from foldtune.cli import infer_main
from foldtune.config import load_config
from foldtune.data.demo import make_demo
from foldtune.training.cross_validation import run_cross_validation

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("launch-gpu")
    train, test = make_demo(n_train=48, n_test=9, seed=4)
    train.to_csv(work / "train.csv", index=False)
    test.to_csv(work / "test.csv", index=False)
    return work


def _overrides(work, backbone, *extra: str) -> list[str]:
    # fp32 and no dropout: two GPUs then compute what one does, up to the order of sums
    return [f"data.train_file={work / 'train.csv'}", f"data.test_file={work / 'test.csv'}", "data.max_len=64",
            f"model.name={backbone}", "model.backbone_dropout=0.0", "training.epochs=2", "training.batch_size=8",
            "training.lr=1e-3", "training.eval_steps=2", "training.precision=fp32",
            f"output.dir={work / 'runs'}", *extra]


def _one_gpu(work, overrides: list[str], name: str):
    run = work / "runs" / name
    run_cross_validation(load_config(None, overrides), run)
    return run


def _launched(work, mode: str, overrides: list[str], name: str):
    result = accelerate_launch([mode, "--name", name, *overrides], work, cpu=False)
    assert result.returncode == 0, result.stderr[-4000:]
    return work / "runs" / name, result.stderr


def _oof(run) -> np.ndarray:
    return pd.read_csv(run / "oof.csv").iloc[:, 2:].to_numpy()


def _submission(run, work) -> np.ndarray:
    out = work / f"{run.name}.csv"
    assert infer_main(["--run", str(run), "--out", str(out)]) == 0
    submission = pd.read_csv(out)
    assert len(submission) == 9 and np.isfinite(submission.iloc[:, 1:].to_numpy()).all()
    return submission.iloc[:, 1:].to_numpy()


def test_fold_parallel_on_two_gpus_trains_each_process_folds_in_threads_and_infers(work, tiny_deberta):
    overrides = _overrides(work, tiny_deberta, "folds.n_splits=3", "training.cuda_graphs=true")
    reference = _one_gpu(work, overrides, "fp-reference")
    run, log = _launched(work, "--fold-parallel", [*overrides, "training.parallel_folds=2",
                                                   "training.parallel_mode=threads"], "fp")
    assert "process 0 of 2: fold(s) [0, 2], 2 at a time in threads" in log
    # every fold on its process's own GPU: process 1's fold 1 on the second
    for fold, device in ((0, "cuda:0"), (1, "cuda:1"), (2, "cuda:0")):
        assert f"device {device}, precision fp32" in (run / f"fold_{fold}" / "train.log").read_text()
    np.testing.assert_allclose(_oof(run), _oof(reference), rtol=0, atol=1e-5)
    np.testing.assert_allclose(_submission(run, work), _submission(reference, work), rtol=0, atol=1e-5)


def test_data_parallel_on_two_gpus_matches_one_gpu_and_infers(work, tiny_deberta):
    overrides = _overrides(work, tiny_deberta, "folds.n_splits=2")
    reference = _one_gpu(work, overrides, "dp-reference")
    run, log = _launched(work, "--data-parallel", overrides, "dp")
    assert "data-parallel over 2 processes" in (run / "fold_0" / "train.log").read_text()
    np.testing.assert_allclose(_oof(run), _oof(reference), rtol=0, atol=1e-4)
    for fold in (0, 1):
        ours, theirs = (pd.read_csv(r / f"fold_{fold}" / "metrics.csv") for r in (run, reference))
        assert ours["step"].tolist() == theirs["step"].tolist()
        np.testing.assert_allclose(ours["train_loss"], theirs["train_loss"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(_submission(run, work), _submission(reference, work), rtol=0, atol=1e-4)


def test_data_parallel_with_the_fused_attention_in_fp16(work, tiny_deberta):
    overrides = _overrides(work, tiny_deberta, "folds.n_splits=2", "model.attention=flex", "training.precision=fp16")
    reference = _one_gpu(work, overrides, "flex-fp16-reference")
    run, _ = _launched(work, "--data-parallel", overrides, "flex-fp16")
    log = (run / "fold_0" / "train.log").read_text()
    assert "precision fp16, data-parallel over 2 processes" in log
    # fp16 rounds each process's half-batch on its own: close to one GPU, not equal
    np.testing.assert_allclose(_oof(run), _oof(reference), rtol=0, atol=0.02)
    np.testing.assert_allclose(_submission(run, work), _submission(reference, work), rtol=0, atol=0.02)
