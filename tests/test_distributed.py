"""Several processes through `accelerate launch`, two of them on the CPUs (gloo):
--fold-parallel gives exactly the OOF of a sequential run; data-parallel gives the OOF of
one process at the same global batch, stopped and resumed or not; what a launch cannot
train is refused before anything is written."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import accelerate_launch
from foldtune.config import ConfigError, load_config
from foldtune.data.demo import make_demo
from foldtune.training.cross_validation import run_cross_validation
from foldtune.training.distributed import DataParallel, check_launch, choose_fold_parallel, folds_of_process
from foldtune.training.state import load_state


def _launch(args: list[str], cwd: Path, wait: bool = True):
    """train.py under accelerate launch: two processes on the CPUs (gloo)."""
    return accelerate_launch(args, cwd, wait=wait, cpu=True)


def _overrides(csv: Path, model: Path, *extra: str) -> list[str]:
    return [f"data.train_file={csv}", "data.test_file=null", "data.max_len=40", f"model.name={model}",
            "training.eval_steps=2", "training.lr=1e-3", *extra]


def _values(run: Path) -> np.ndarray:
    return pd.read_csv(run / "oof.csv").iloc[:, 2:].to_numpy()


# --- fold-parallel ---------------------------------------------------------------------


def test_fold_parallel_gives_the_oof_of_a_sequential_run_exactly(tiny_bert, tmp_path):
    make_demo(n_train=30, n_test=0, seed=12)[0].to_csv(tmp_path / "train.csv", index=False)
    # dropout on (BERT's own): each fold is seeded as in a sequential run, whatever its process
    overrides = _overrides(tmp_path / "train.csv", tiny_bert, "folds.n_splits=3", "training.epochs=2",
                           "training.batch_size=4", f"output.dir={tmp_path / 'runs'}")
    # a launched process computes with one thread on a CPU: the reference does too
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sequential = run_cross_validation(load_config(None, overrides), tmp_path / "sequential")
    finally:
        torch.set_num_threads(threads)

    result = _launch(["--fold-parallel", "--name", "spread", *overrides], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "spread"
    assert (run / "oof.csv").read_text() == (tmp_path / "sequential" / "oof.csv").read_text()
    np.testing.assert_array_equal(_values(run), _values(tmp_path / "sequential"))
    scores = json.loads((run / "scores.json").read_text())
    assert scores["oof"] == sequential["oof"]
    for fold in ("0", "1", "2"):
        assert scores["folds"][fold]["mcrmse"] == sequential["folds"][fold]["mcrmse"]
        assert scores["folds"][fold]["best_step"] == sequential["folds"][fold]["best_step"]
    info = json.loads((run / "run.json").read_text())
    assert (info["processes"], info["process_mode"]) == (2, "fold_parallel")
    # process 0 trained folds 0 and 2, process 1 fold 1, at the same time
    assert "process 0 of 2: fold(s) [0, 2]" in result.stderr and "process 1 of 2: fold(s) [1]" in result.stderr
    _assert_same_submission(run, tmp_path / "sequential", tmp_path)


def _assert_same_submission(run: Path, reference: Path, work: Path) -> None:
    """infer.py averages the run's folds, written by two processes (the tokenizer of one of
    them never tokenized), into the submission of the reference run."""
    from foldtune.cli import infer_main

    test = work / "test.csv"
    if not test.exists():
        make_demo(n_train=1, n_test=7, seed=21)[1].to_csv(test, index=False)
    assert infer_main(["--run", str(run), "--test", str(test), "--out", str(work / "ours.csv")]) == 0
    assert infer_main(["--run", str(reference), "--test", str(test), "--out", str(work / "theirs.csv")]) == 0
    ours, theirs = pd.read_csv(work / "ours.csv"), pd.read_csv(work / "theirs.csv")
    assert len(ours) == 7 and ours["text_id"].tolist() == theirs["text_id"].tolist()
    np.testing.assert_allclose(ours.iloc[:, 1:].to_numpy(), theirs.iloc[:, 1:].to_numpy(), rtol=0, atol=1e-6)


def test_a_launch_without_a_mode_spreads_a_small_models_folds_each_process_in_threads(tiny_bert, tmp_path):
    make_demo(n_train=30, n_test=0, seed=12)[0].to_csv(tmp_path / "train.csv", index=False)
    # dropout off: folds in threads share one generator, and then give a sequential run's results
    overrides = _overrides(tmp_path / "train.csv", tiny_bert, "folds.n_splits=3", "training.epochs=2",
                           "training.batch_size=4", "model.backbone_dropout=0.0", f"output.dir={tmp_path / 'runs'}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_cross_validation(load_config(None, overrides), tmp_path / "sequential")
    finally:
        torch.set_num_threads(threads)

    result = _launch(["--name", "auto", *overrides, "training.parallel_folds=2", "training.parallel_mode=threads"],
                     tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("2 processes, fold-parallel: the backbone has 1.0M parameters, too few for data-parallel to pay"
            in result.stderr)
    assert "process 0 of 2: fold(s) [0, 2], 2 at a time in threads" in result.stderr
    assert "process 1 of 2: fold(s) [1]\n" in result.stderr
    assert result.stderr.count("done: ") == 1, "only the main process says the run is done"
    run = tmp_path / "runs" / "auto"
    assert json.loads((run / "run.json").read_text())["process_mode"] == "fold_parallel"
    np.testing.assert_array_equal(_values(run), _values(tmp_path / "sequential"))
    assert not list(run.glob("fold_*/state*")), "training states left behind"
    _assert_same_submission(run, tmp_path / "sequential", tmp_path)


def test_the_mode_chosen_for_a_launch_without_one():
    # MiniLM (22.7M): the folds spread, however unevenly
    assert choose_fold_parallel(2, 5, 22_713_216) == (
        True, "the backbone has 22.7M parameters, too few for data-parallel to pay: the folds are spread over the "
              "2 processes")
    # DeBERTa-v3-base (184M), 5 folds on 2 GPUs: 3 on the busiest still beat data-parallel (1.30x measured)
    assert choose_fold_parallel(2, 5, 183_831_552) == (
        True, "the backbone has 183.8M parameters; spread over the 2 processes, the 5 folds give up to 1.67x one "
              "process (3 on the busiest), data-parallel about 1.30x")
    # one fold: only data-parallel divides it
    assert choose_fold_parallel(2, 1, 183_831_552) == (
        False, "the backbone has 183.8M parameters; spread over the 2 processes, the 1 fold(s) would give at most "
               "1.00x one process (1 on the busiest), data-parallel about 1.30x: each fold is trained data-parallel")
    assert choose_fold_parallel(4, 5, 183_831_552)[0] is False      # 2 on the busiest: 2.50x < 0.65 x 4
    assert choose_fold_parallel(4, 6, 183_831_552)[0] is True       # 2 on the busiest: 3.00x


def test_folds_of_process():
    assert folds_of_process([0, 1, 2, 3, 4], SimpleNamespace(rank=0, world_size=2)) == [0, 2, 4]
    assert folds_of_process([1, 3, 4], SimpleNamespace(rank=1, world_size=2)) == [3]
    assert folds_of_process([2], SimpleNamespace(rank=1, world_size=2)) == []


# --- data-parallel -----------------------------------------------------------------------


def _shard_batch(lengths: list[int]) -> dict:
    width = max(lengths)
    mask = torch.tensor([[1] * n + [0] * (width - n) for n in lengths])
    return {"input_ids": mask * 7, "attention_mask": mask, "labels": torch.arange(len(lengths) * 2.0).view(-1, 2)}


def test_each_process_takes_its_contiguous_share_of_the_global_batch():
    rank0 = DataParallel(SimpleNamespace(rank=0, world_size=2, is_main=True))
    rank1 = DataParallel(SimpleNamespace(rank=1, world_size=2, is_main=False))
    batch = _shard_batch([3, 9, 4, 2, 5])
    local0, share0 = rank0.shard(batch, pad_multiple=1)
    local1, share1 = rank1.shard(batch, pad_multiple=1)
    assert (share0, share1) == (2 / 5, 3 / 5)
    assert local0["labels"].tolist() == [[0.0, 1.0], [2.0, 3.0]] and local0["input_ids"].shape == (2, 9)
    # rows 2..4: the padding columns none of them needs are dropped (widths rounded up as asked)
    assert local1["labels"][:, 0].tolist() == [4.0, 6.0, 8.0] and local1["attention_mask"].shape == (3, 5)
    assert rank1.shard(batch, pad_multiple=4)[0]["input_ids"].shape == (3, 8)
    # a last batch of one row, which process 1 takes: process 0 still steps (the all-reduce
    # needs it), on a row weighted zero
    last = _shard_batch([6])
    assert rank1.shard(last, 1)[1] == 1.0
    empty, share = rank0.shard(last, 1)
    assert share == 0.0 and empty["input_ids"].shape[0] == 1
    # validation rows: contiguous, every row once
    assert rank0.rows(7).tolist() == [0, 1, 2] and rank1.rows(7).tolist() == [3, 4, 5, 6]


@pytest.fixture(scope="module")
def dp_work(tmp_path_factory):
    """25 essays in 2 folds: one fold trains on 13 rows, so its last batch of 4 holds one
    row and process 1 gets none of it."""
    work = tmp_path_factory.mktemp("data-parallel")
    make_demo(n_train=25, n_test=0, seed=13)[0].to_csv(work / "train.csv", index=False)
    return work


def _dp_overrides(work: Path, model: Path) -> list[str]:
    # dropout off: two processes draw other masks than one process does
    return _overrides(work / "train.csv", model, "folds.n_splits=2", "model.backbone_dropout=0.0",
                      "training.epochs=6", "training.batch_size=4", "training.gradient_accumulation_steps=2",
                      "training.save_state_steps=2", f"output.dir={work / 'runs'}")


@pytest.fixture(scope="module")
def one_process(dp_work, tiny_bert):
    """The reference: one process at the same global batch."""
    run = dp_work / "one-process"
    run_cross_validation(load_config(None, _dp_overrides(dp_work, tiny_bert)), run)
    train_rows = pd.read_csv(run / "folds.csv")["fold"].value_counts().rsub(25)
    assert (train_rows % 4 == 1).any()           # the uneven last batch is exercised
    return run


def _assert_same_training(run: Path, reference: Path) -> None:
    a, b = pd.read_csv(run / "oof.csv"), pd.read_csv(reference / "oof.csv")
    assert a["text_id"].tolist() == b["text_id"].tolist() and a["fold"].tolist() == b["fold"].tolist()
    np.testing.assert_allclose(a.iloc[:, 2:].to_numpy(), b.iloc[:, 2:].to_numpy(), rtol=0, atol=1e-5)
    for fold in (0, 1):
        ours, theirs = (pd.read_csv(r / f"fold_{fold}" / "metrics.csv") for r in (run, reference))
        assert ours["step"].tolist() == theirs["step"].tolist()
        # the training loss is the mean over the whole global batch, summed over the processes
        np.testing.assert_allclose(ours["train_loss"], theirs["train_loss"], rtol=0, atol=1e-5)
        np.testing.assert_allclose(ours["val_mcrmse"], theirs["val_mcrmse"], rtol=0, atol=1e-5)


def test_data_parallel_matches_one_process_at_the_same_global_batch(dp_work, tiny_bert, one_process):
    result = _launch(["--data-parallel", "--name", "dp", *_dp_overrides(dp_work, tiny_bert)], dp_work)
    assert result.returncode == 0, result.stderr[-3000:]
    run = dp_work / "runs" / "dp"
    _assert_same_training(run, one_process)
    info = json.loads((run / "run.json").read_text())
    assert (info["processes"], info["process_mode"]) == (2, "data_parallel")
    for fold in (0, 1):
        # written once, by the main process; the states are gone once the fold is done
        log = (run / f"fold_{fold}" / "train.log").read_text()
        assert log.count(f"fold {fold}: best MCRMSE") == 1 and "data-parallel over 2 processes" in log
        assert not (run / f"fold_{fold}" / "state").exists()
        assert json.loads((run / f"fold_{fold}" / "best" / "foldtune.json").read_text())["fold"] == fold


def test_a_stopped_data_parallel_run_resumes_to_the_same_oof(dp_work, tiny_bert, one_process):
    process = _launch(["--data-parallel", "--name", "stopped", *_dp_overrides(dp_work, tiny_bert)], dp_work,
                      wait=False)
    run = dp_work / "runs" / "stopped"
    waited = 0.0
    while not list(run.glob("fold_0/state/state-*.pt")):
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.05)
        waited += 0.05
        assert waited < 300, "no training state"
    process.send_signal(signal.SIGTERM)         # the launcher passes it to both processes
    _, err = process.communicate(timeout=300)
    assert process.returncode != 0
    assert err.count("stopped by SIGTERM") == 2, err[-3000:]
    assert (f"Continue with: accelerate launch --multi_gpu --num_processes 2 train.py --resume {run} "
            "--data-parallel") in err
    assert not (run / "oof.csv").exists()
    state = load_state(sorted(run.glob("fold_0/state/state-*.pt"))[-1])
    assert len(state["rng_by_rank"]) == 2       # each process's generators, to continue its own

    resumed = _launch(["--resume", str(run)], dp_work)         # no mode given: the run's own
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "continuing from" in resumed.stderr
    assert "2 processes, data-parallel: as the run was started" in resumed.stderr
    _assert_same_training(run, one_process)


# --- what a launch refuses --------------------------------------------------------------


def test_a_batch_that_does_not_split_over_the_processes_fails_before_training(dp_work, tiny_bert):
    result = _launch(["--data-parallel", "--name", "odd", *_dp_overrides(dp_work, tiny_bert), "training.batch_size=5"],
                     dp_work)
    assert result.returncode != 0
    assert ("error: training.batch_size: 5 is the global batch of a data-parallel run over 2 processes, so it must "
            "be a multiple of 2 (each process takes batch_size / 2 rows); set it to 4 or 6") in result.stderr
    assert not (dp_work / "runs" / "odd").exists()


def test_check_launch_refuses_what_several_processes_cannot_train(tiny_bert):
    cfg = load_config(None, [f"model.name={tiny_bert}", "training.batch_size=6"])
    check_launch(cfg, 2, fold_parallel=False)                 # 3 rows a process
    check_launch(cfg, 4, fold_parallel=True)                  # a fold per process: any batch
    check_launch(load_config(None, ["training.batch_size=7"]), 1, fold_parallel=False)   # one process
    with pytest.raises(ConfigError, match=r"training.batch_size: 6 .* over 4 processes, so it must be a multiple "
                                          r"of 4 .* set it to 4 or 8"):
        check_launch(cfg, 4, fold_parallel=False)
    check_launch(load_config(None, ["training.parallel_folds=3", "training.parallel_mode=threads"]), 2,
                 fold_parallel=True)                           # each process's folds in threads
    refused = [
        (["training.parallel_folds=2"], False, "training.parallel_folds: 2 trains folds side by side on one device, "
                                               "but this launch trains each fold data-parallel"),
        (["training.parallel_folds=2", "training.parallel_mode=processes"], True,
         "training.parallel_folds: 2 with training.parallel_mode: processes would start processes of their own"),
        (["training.device=cuda:1"], True, "training.device: cuda:1 would put every one of the 2 processes"),
        (["model.type=tfidf_ridge"], True, "model.type: tfidf_ridge has no GPU training to spread"),
        (["distill.teacher=runs/x"], False, "a distillation run trains one student in one process"),
        (["training.cuda_graphs=true"], False, "training.cuda_graphs: true cannot train data-parallel"),
    ]
    for overrides, fold_parallel, message in refused:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            check_launch(load_config(None, overrides), 2, fold_parallel)
