"""The GPU warm-up thread started while the rest is imported and the essays are tokenized
(training/warmup.py)."""

from __future__ import annotations

import pytest
import torch

from foldtune.config import load_config
from foldtune.runtime.precision import resolve_precision
from foldtune.training import warmup

CPU = torch.device("cpu")


def test_the_warm_up_kernels_run_forward_and_backward_without_drawing_random_numbers():
    before = torch.get_rng_state()
    grad = warmup.run_first_kernels(CPU, resolve_precision("fp32", CPU), rows=3, width=16, heads=2, head_size=8)
    assert grad.shape == (3, 16, 16)
    # every input position reaches the loss: through the attention, padded keys or not
    assert torch.isfinite(grad).all() and (grad.abs().sum(dim=-1) > 0).all()
    assert torch.equal(torch.get_rng_state(), before)


def _as_if_on_a_gpu(monkeypatch) -> list:
    calls = []
    monkeypatch.setattr(warmup, "resolve_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(warmup, "resolve_precision", lambda name, device: resolve_precision("fp32", CPU))
    monkeypatch.setattr(warmup, "run_first_kernels", lambda device, precision: calls.append(device))
    return calls


def test_a_warm_up_thread_starts_for_a_transformer_run_on_a_gpu(monkeypatch):
    calls = _as_if_on_a_gpu(monkeypatch)
    warmup.start_warm_up(load_config(None, ["training.parallel_folds=5", "training.parallel_mode=threads"])).join()
    assert calls == [torch.device("cuda")]


@pytest.mark.parametrize("overrides, world_size", [
    (["training.deterministic=true"], None),        # cuBLAS's workspace is fixed at seeding
    (["model.type=tfidf_ridge"], None),
    (["training.parallel_folds=2", "training.parallel_mode=processes"], None),   # the fold processes train
    ([], "2"),                                      # under accelerate launch
])
def test_no_warm_up_where_this_process_trains_no_transformer_on_a_gpu(overrides, world_size, monkeypatch):
    calls = _as_if_on_a_gpu(monkeypatch)
    if world_size:
        monkeypatch.setenv("WORLD_SIZE", world_size)
    assert warmup.start_warm_up(load_config(None, overrides)) is None
    assert calls == []


def test_no_warm_up_on_a_cpu_or_a_missing_gpu(monkeypatch):
    monkeypatch.setattr(warmup, "run_first_kernels", lambda *args: pytest.fail("warm-up started"))
    assert warmup.start_warm_up(load_config(None, ["training.device=cpu"])) is None
    if not torch.cuda.is_available():   # training.device cuda without one: the run reports it, not the warm-up
        assert warmup.start_warm_up(load_config(None, ["training.device=cuda"])) is None


def test_train_py_starts_the_warm_up_with_the_runs_own_config(tmp_path, monkeypatch):
    import argparse

    from foldtune import cli

    configs = []
    monkeypatch.setattr(warmup, "start_warm_up", configs.append)
    cli._start_warm_up(argparse.Namespace(resume=None, config=None, overrides=["training.lr=3e-5"]))
    assert configs[-1].training.lr == 3e-5
    # a resumed run: the config saved in its folder, with the command line's overrides
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("training:\n  epochs: 3\n")
    cli._start_warm_up(argparse.Namespace(resume=str(tmp_path / "run"), config=None, overrides=["training.seed=7"]))
    assert (configs[-1].training.epochs, configs[-1].training.seed) == (3, 7)
    # a bad config starts nothing here and raises nothing: the run reports it
    cli._start_warm_up(argparse.Namespace(resume=None, config=None, overrides=["training.lr=-1"]))
    cli._start_warm_up(argparse.Namespace(resume=str(tmp_path / "absent"), config=None, overrides=[]))
    assert len(configs) == 2
