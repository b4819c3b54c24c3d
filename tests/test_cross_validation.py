"""Fold selection and user-given folds through run_cross_validation, on a tiny DeBERTa."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest

from conftest import run_stopped_at
from foldtune.config import ConfigError, load_config
from foldtune.data.demo import make_demo
from foldtune.training.cross_validation import parse_folds_arg, run_cross_validation


def test_parse_folds_arg():
    assert parse_folds_arg(None, 3) == [0, 1, 2]
    assert parse_folds_arg("2,0", 5) == [0, 2]
    with pytest.raises(ConfigError, match=r"--folds '0,5': folds must be in 0..4"):
        parse_folds_arg("0,5", 5)
    with pytest.raises(ConfigError, match="expected fold numbers separated by commas"):
        parse_folds_arg("first", 5)


def test_user_fold_column_and_a_subset_of_folds(tiny_deberta, tmp_path):
    train, _ = make_demo(n_train=30, n_test=0, seed=5)
    train["kfold"] = np.arange(30) % 3
    train.to_csv(tmp_path / "train.csv", index=False)
    cfg = load_config(None, [f"data.train_file={tmp_path / 'train.csv'}", "data.test_file=null", "data.max_len=48",
                             "folds.n_splits=3", "folds.column=kfold", f"model.name={tiny_deberta}",
                             "training.epochs=1", "training.batch_size=10"])
    run = tmp_path / "run"
    scores = run_cross_validation(cfg, run, folds_to_run=[0, 2])

    assert pd.read_csv(run / "folds.csv")["fold"].tolist() == train["kfold"].tolist()
    assert sorted(p.name for p in run.glob("fold_*")) == ["fold_0", "fold_2"]
    oof = pd.read_csv(run / "oof.csv")
    expected_ids = train.loc[train["kfold"] != 1, "text_id"].tolist()
    assert oof["text_id"].tolist() == expected_ids            # training-file order, folds 0 and 2 only
    assert set(oof["fold"]) == {0, 2}
    assert scores["n_rows"] == 20 and set(scores["folds"]) == {"0", "2"}
    assert json.loads((run / "scores.json").read_text())["oof"]["mcrmse"] == pytest.approx(scores["oof"]["mcrmse"])
    assert json.loads((run / "run.json").read_text())["folds"] == [0, 2]


def test_gradient_accumulation_matches_the_larger_batch(tiny_deberta, tmp_path):
    train, _ = make_demo(n_train=40, n_test=0, seed=6)
    train.to_csv(tmp_path / "train.csv", index=False)
    common = [f"data.train_file={tmp_path / 'train.csv'}", "data.test_file=null", "data.max_len=48",
              "folds.n_splits=2", f"model.name={tiny_deberta}", "model.backbone_dropout=0.0",
              "training.epochs=1", "training.lr=1e-3", "training.weight_decay=0.0"]
    oofs = []
    for batch, accum in ((8, 1), (4, 2)):
        cfg = load_config(None, common + [f"training.batch_size={batch}",
                                          f"training.gradient_accumulation_steps={accum}"])
        run_cross_validation(cfg, tmp_path / f"b{batch}")
        oofs.append(pd.read_csv(tmp_path / f"b{batch}" / "oof.csv"))
    # same rows in the same order: 4+4 micro-batches add up to the batch of 8
    np.testing.assert_allclose(oofs[0].iloc[:, 2:].to_numpy(), oofs[1].iloc[:, 2:].to_numpy(), atol=1e-5)
    assert not np.allclose(oofs[0].iloc[:, 2:].to_numpy(), 0)


def _three_folds(tmp_path, backbone, *extra) -> list[str]:
    """36 demo essays in 3 folds, 2 epochs of a tiny model: the parallel runs' config."""
    make_demo(n_train=36, n_test=0, seed=8)[0].to_csv(tmp_path / "train.csv", index=False)
    return [f"data.train_file={tmp_path / 'train.csv'}", "data.test_file=null", "data.max_len=48",
            "folds.n_splits=3", f"model.name={backbone}", "training.epochs=2", "training.batch_size=6",
            "training.eval_steps=2", *extra]


def test_folds_in_parallel_processes_give_the_sequential_results(tiny_deberta, tmp_path):
    common = _three_folds(tmp_path, tiny_deberta, "training.bucket_batches=true")
    sequential = run_cross_validation(load_config(None, common), tmp_path / "seq")
    parallel = run_cross_validation(load_config(None, common + ["training.parallel_folds=3"]), tmp_path / "par")
    assert (tmp_path / "par" / "tokens.npz").is_file() and not (tmp_path / "seq" / "tokens.npz").exists()
    seq_oof, par_oof = pd.read_csv(tmp_path / "seq" / "oof.csv"), pd.read_csv(tmp_path / "par" / "oof.csv")
    assert seq_oof["text_id"].tolist() == par_oof["text_id"].tolist()
    np.testing.assert_allclose(seq_oof.iloc[:, 2:].to_numpy(), par_oof.iloc[:, 2:].to_numpy(), rtol=0, atol=1e-6)
    assert parallel["oof"]["mcrmse"] == pytest.approx(sequential["oof"]["mcrmse"], abs=1e-7)
    for fold in ("0", "1", "2"):
        assert parallel["folds"][fold]["best_step"] == sequential["folds"][fold]["best_step"]


def test_folds_in_parallel_threads_without_dropout_give_the_sequential_results(tiny_deberta, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="foldtune")
    common = _three_folds(tmp_path, tiny_deberta, "model.backbone_dropout=0.0")
    sequential = run_cross_validation(load_config(None, common), tmp_path / "seq")
    threads = run_cross_validation(load_config(None, common + ["training.parallel_folds=3",
                                                               "training.parallel_mode=threads"]), tmp_path / "thr")
    seq_oof, thr_oof = pd.read_csv(tmp_path / "seq" / "oof.csv"), pd.read_csv(tmp_path / "thr" / "oof.csv")
    assert seq_oof["text_id"].tolist() == thr_oof["text_id"].tolist()
    np.testing.assert_allclose(seq_oof.iloc[:, 2:].to_numpy(), thr_oof.iloc[:, 2:].to_numpy(), rtol=0, atol=1e-6)
    for fold in ("0", "1", "2"):
        assert threads["folds"][fold]["best_step"] == sequential["folds"][fold]["best_step"]
        # each fold's log holds its own lines only, its background writes included
        log = (tmp_path / "thr" / f"fold_{fold}" / "train.log").read_text()
        others = {"0", "1", "2"} - {fold}
        assert f"fold {fold}: training state saved" in log
        assert not any(f"fold {other}" in log for other in others)


def test_folds_in_threads_stopped_early_resume_to_the_uninterrupted_result(tiny_deberta, tmp_path, monkeypatch):
    from foldtune.training.resume import resume_run

    common = _three_folds(tmp_path, tiny_deberta, "model.backbone_dropout=0.0", "training.parallel_folds=3",
                          "training.parallel_mode=threads")
    straight = run_cross_validation(load_config(None, common), tmp_path / "straight")
    run_stopped_at(monkeypatch, load_config(None, common), tmp_path / "stopped", fold=0, step=3)
    # fold 0 saved its state at the stop; folds 1 and 2 were built after fold 0's first two
    # steps, and fold 2 (waiting for fold 1's) never began
    assert [p.name for p in (tmp_path / "stopped" / "fold_0" / "state").iterdir()] == ["state-0000003.pt"]
    assert not (tmp_path / "stopped" / "fold_2").exists()
    resumed = resume_run(tmp_path / "stopped")
    assert resumed["oof"]["mcrmse"] == pytest.approx(straight["oof"]["mcrmse"], abs=1e-6)
    for fold in ("0", "1", "2"):
        assert resumed["folds"][fold]["best_step"] == straight["folds"][fold]["best_step"]


def test_folds_in_threads_out_of_gpu_memory_say_so_in_a_line_and_resume_fewer_at_once(tiny_deberta, tmp_path,
                                                                                       monkeypatch, capsys):
    import torch

    from foldtune.cli import train_main
    from foldtune.training.trainer import FoldTrainer

    common = _three_folds(tmp_path, tiny_deberta, "model.backbone_dropout=0.0", "training.parallel_folds=3",
                          "training.parallel_mode=threads", "output.dir=" + str(tmp_path))
    assert train_main([*common, "output.name=straight"]) == 0       # train.py's default config under these
    straight = json.loads((tmp_path / "straight" / "scores.json").read_text())
    common.append("output.name=oom")
    original = FoldTrainer._optimizer_step

    def short_of_memory(self):          # as a GPU too small for three folds at once: fold 1 at its 3rd step
        if self.data.fold == 1 and self.step == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        original(self)

    monkeypatch.setattr(FoldTrainer, "_optimizer_step", short_of_memory)
    assert train_main(common) == 1
    run = tmp_path / "oom"
    resume = f"python train.py --resume {run} training.parallel_folds=1"
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: the GPU ran out of memory in fold(s) [1], 3 folds at a time in threads; the folds that finished "
        f"are kept. Train fewer at once: {resume}")
    assert sorted(p.parent.name for p in run.glob("fold_*/result.json")) == ["fold_0", "fold_2"]
    monkeypatch.setattr(FoldTrainer, "_optimizer_step", original)
    # the command it gives: a resume may change how many folds train at once (not what they learn)
    assert train_main(resume.split()[2:]) == 0
    assert load_config(run / "config.yaml").training.parallel_folds == 1
    np.testing.assert_allclose(pd.read_csv(run / "oof.csv").iloc[:, 2:].to_numpy(),
                               pd.read_csv(tmp_path / "straight" / "oof.csv").iloc[:, 2:].to_numpy(), atol=1e-6)
    assert json.loads((run / "scores.json").read_text())["oof"]["mcrmse"] == pytest.approx(
        straight["oof"]["mcrmse"], abs=1e-6)


def test_one_fold_at_a_time_out_of_gpu_memory_points_to_a_smaller_step(tmp_path):
    import torch

    from foldtune.cli import _out_of_memory

    assert _out_of_memory(torch.OutOfMemoryError("CUDA out of memory."), tmp_path, False) == (
        "the GPU ran out of memory; the folds that finished are kept. A step needs less memory with "
        "model.gradient_checkpointing=true (not under training.cuda_graphs), a smaller training.batch_size or a "
        "shorter data.max_len: each changes what the folds learn, so start a new run (or resume with --force)")


def test_a_fold_process_out_of_gpu_memory_is_named_by_its_exit_status(monkeypatch, tmp_path):
    import subprocess
    import torch

    from foldtune.run_layout import FoldSeed
    from foldtune.training import fold_worker, schedulers
    from foldtune.training.prepared import PreparedRun

    def no_room(run_dir):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(PreparedRun, "load", staticmethod(no_room))
    assert fold_worker.main([str(tmp_path), "1"]) == schedulers.OUT_OF_MEMORY_EXIT

    class Ended:        # a fold process that has exited with `returncode`
        def __init__(self, returncode):
            self.returncode = returncode

        def poll(self):
            return self.returncode

    codes = {"0": 0, "1": schedulers.OUT_OF_MEMORY_EXIT, "2": 1}
    monkeypatch.setattr(subprocess, "Popen", lambda command: Ended(codes[command[4]]))

    class Prepared:
        run_dir = tmp_path

        def save_tokens(self):
            pass

    folds = [FoldSeed(0, None), FoldSeed(1, None), FoldSeed(2, None)]
    with pytest.raises(schedulers.FoldsOutOfMemory) as err:
        schedulers.train_folds_in_processes(Prepared(), folds, 3)
    assert str(err.value) == "the GPU ran out of memory in fold(s) [1], 3 folds at a time in processes"
    codes["1"] = 1      # a failure of another kind names the folds' logs
    with pytest.raises(RuntimeError, match=r"fold\(s\) \[1, 2\] failed in their processes; see .*fold_1/train.log"):
        schedulers.train_folds_in_processes(Prepared(), folds, 3)


def test_evaluations_from_a_later_epoch_skip_the_early_ones_and_change_no_training(tiny_deberta, tmp_path):
    # 24 training rows at batch 6: 4 steps an epoch, 12 in all, an evaluation every 2
    common = _three_folds(tmp_path, tiny_deberta, "training.epochs=3")
    metrics = {}
    for start in (0, 1):
        run_cross_validation(load_config(None, common + [f"training.eval_steps_from_epoch={start}"]),
                             tmp_path / f"from{start}", [0])
        metrics[start] = pd.read_csv(tmp_path / f"from{start}" / "fold_0" / "metrics.csv").set_index("step")
    assert metrics[0].index.tolist() == [2, 4, 6, 8, 10, 12]
    assert metrics[1].index.tolist() == [4, 6, 8, 10, 12]       # the first epoch: its end only
    np.testing.assert_allclose(metrics[1]["val_mcrmse"], metrics[0]["val_mcrmse"].loc[[4, 6, 8, 10, 12]],
                               rtol=0, atol=1e-7)
    with pytest.raises(ConfigError, match=r"'training.eval_steps_from_epoch' set on the command line: "
                                          r"expected an integer >= 0, got -1"):
        load_config(None, common + ["training.eval_steps_from_epoch=-1"])
