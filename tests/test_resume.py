"""Resume: a stopped run ends with the OOF of a run that never stopped; finished folds are
checked by their files; states rotate; damaged states and changed configs are refused."""

from __future__ import annotations

import json
import signal

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import run_stopped_at

from foldtune.config import ConfigError, load_config
from foldtune.data.demo import make_demo
from foldtune.training import stopping
from foldtune.training.cross_validation import run_cross_validation
from foldtune.training.resume import resume_run
from foldtune.training.state import StateError, load_state, save_state, state_files
from foldtune.training.trainer import FoldTrainer


@pytest.fixture(autouse=True)
def _no_stop_left_behind():
    stopping.clear_stop_request()
    yield
    stopping.clear_stop_request()


@pytest.fixture(scope="module")
def train_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("resume-data") / "train.csv"
    make_demo(n_train=24, n_test=0, seed=9)[0].to_csv(path, index=False)
    return path


def _cfg(train_csv, model, *extra):
    # dropout on, AWP and SWA from epoch 2: every piece of state must come back exactly
    return load_config(None, [
        f"data.train_file={train_csv}", "data.test_file=null", "data.max_len=40", "folds.n_splits=2",
        f"model.name={model}", "training.epochs=3", "training.batch_size=4", "training.eval_steps=2",
        "training.save_state_steps=2", "training.keep_states=2", "training.lr=1e-3",
        "awp.enabled=true", "awp.start_epoch=2", "averaging.method=swa", "averaging.start_epoch=2",
        "averaging.swa_lr=1e-4", "averaging.anneal_steps=2", *extra])


def _stop_at(monkeypatch, fold: int, step: int, signum=signal.SIGTERM):
    original = FoldTrainer._optimizer_step

    def stepping(self):
        original(self)
        if self.data.fold == fold and self.step == step:
            stopping.request_stop(signum)

    monkeypatch.setattr(FoldTrainer, "_optimizer_step", stepping)


def _oof(run):
    return pd.read_csv(run / "oof.csv")


@pytest.fixture(scope="module")
def uninterrupted(train_csv, tiny_deberta, tmp_path_factory):
    run = tmp_path_factory.mktemp("uninterrupted")
    scores = run_cross_validation(_cfg(train_csv, tiny_deberta), run)
    return run, scores


# 12 train rows at batch 4: 3 steps an epoch. Step 4: mid-epoch 2 (AWP and SWA on);
# step 6: an epoch end; step 3 with bucketed batches: the first epoch end.
@pytest.mark.parametrize(("stop_step", "extra"), [(4, ()), (6, ()), (2, ("training.bucket_batches=true",))])
def test_a_resumed_run_ends_with_the_uninterrupted_oof(stop_step, extra, train_csv, tiny_deberta, tmp_path,
                                                       monkeypatch, uninterrupted, request):
    cfg = _cfg(train_csv, tiny_deberta, *extra)
    if extra:   # its own reference run
        reference = tmp_path / "reference"
        run_cross_validation(cfg, reference)
    else:
        reference = uninterrupted[0]
    run = tmp_path / "run"
    _stop_at(monkeypatch, fold=1, step=stop_step)
    with pytest.raises(stopping.TrainingInterrupted) as stop:
        run_cross_validation(cfg, run)
    assert stop.value.exit_code == 143
    assert (run / "fold_0" / "result.json").is_file() and not state_files(run / "fold_0")
    saved = state_files(run / "fold_1")
    assert saved and load_state(saved[-1])["step"] == stop_step
    assert not (run / "oof.csv").exists()

    monkeypatch.undo()
    stopping.clear_stop_request()
    resume_run(run)
    np.testing.assert_allclose(_oof(run).iloc[:, 2:].to_numpy(), _oof(reference).iloc[:, 2:].to_numpy(),
                               rtol=0, atol=1e-6)
    assert _oof(run)["text_id"].tolist() == _oof(reference)["text_id"].tolist()
    ref_metrics = pd.read_csv(reference / "fold_1" / "metrics.csv")
    got_metrics = pd.read_csv(run / "fold_1" / "metrics.csv")
    pd.testing.assert_frame_equal(got_metrics, ref_metrics, rtol=0, atol=1e-6)
    assert not state_files(run / "fold_1")            # a finished fold keeps only its best checkpoint

    # resuming a finished run changes nothing
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "train.log"}
    resume_run(run)
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "train.log"}
    assert before == after


def test_a_resumed_fold_trains_only_its_remaining_steps_from_the_saved_weights(train_csv, tiny_deberta, tmp_path,
                                                                              monkeypatch):
    # A seeded retrain from step 0 ends with the uninterrupted OOF too: count the steps
    # trained after the resume, and change a weight in the saved state to see it carried.
    run = tmp_path / "run"
    run_stopped_at(monkeypatch, _cfg(train_csv, tiny_deberta), run, fold=0, step=4)
    saved = state_files(run / "fold_0")[-1]
    state = torch.load(saved, weights_only=True)
    assert state["step"] == 4
    changed = torch.tensor([0.5, -0.25, 1.0, 2.0, -1.5, 0.125])
    state["model"]["head.linear.bias"] = changed
    state.pop("format"), state.pop("sha256")
    save_state(run / "fold_0", state, keep=10)      # written as foldtune writes it: its SHA-256 anew

    steps, first_weights = [], {}
    original = FoldTrainer._optimizer_step

    def stepping(self):
        if not steps:           # the weights the first step after the resume starts from
            first_weights.update({k: v.clone() for k, v in self.model.state_dict().items()})
        original(self)
        steps.append((self.data.fold, self.step))

    monkeypatch.setattr(FoldTrainer, "_optimizer_step", stepping)
    resume_run(run)
    # 9 steps a fold (3 epochs of 3): fold 0 goes on from step 5, fold 1 trains them all
    assert steps == [(0, s) for s in range(5, 10)] + [(1, s) for s in range(1, 10)]
    assert torch.equal(first_weights["head.linear.bias"], changed)
    assert first_weights.keys() == state["model"].keys()
    for key, value in state["model"].items():
        assert torch.equal(first_weights[key], value), key


def test_states_rotate_and_the_best_checkpoint_stays(train_csv, tiny_deberta, tmp_path, monkeypatch):
    seen = []
    original = FoldTrainer._save_state

    def saving(self, *args):
        original(self, *args)
        self.writer.wait()          # states are written in the background: look once it is done
        seen.append(sorted(p.name for p in state_files(self.fold_dir)))
        assert (self.fold_dir / "best" / "model.safetensors").is_file()

    monkeypatch.setattr(FoldTrainer, "_save_state", saving)
    run_cross_validation(_cfg(train_csv, tiny_deberta, "training.keep_states=2"), tmp_path / "run")
    assert max(len(names) for names in seen) == 2
    # fold 0 saves at steps 2, 4, 8 (every 2, mid-epoch) and 3, 6 (epoch ends but the last,
    # after which the fold's result is written); two are kept; fold 1 starts again at 2
    names = lambda *steps: [f"state-{s:07d}.pt" for s in steps]  # noqa: E731
    assert seen[:6] == [names(2), names(2, 3), names(3, 4), names(4, 6), names(6, 8), names(2)]
    assert (tmp_path / "run" / "fold_1" / "best" / "model.safetensors").is_file()


def test_a_damaged_finished_fold_is_trained_again(uninterrupted, tmp_path, train_csv, tiny_deberta):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(uninterrupted[0], run)
    oof = pd.read_csv(run / "fold_0" / "oof.csv")
    oof.iloc[:3].to_csv(run / "fold_0" / "oof.csv", index=False)      # rows lost
    stamp = (run / "fold_1" / "best" / "model.safetensors").stat().st_mtime_ns
    resume_run(run)
    assert len(pd.read_csv(run / "fold_0" / "oof.csv")) == len(oof)      # fold 0 retrained
    assert (run / "fold_1" / "best" / "model.safetensors").stat().st_mtime_ns == stamp  # fold 1 untouched
    np.testing.assert_allclose(_oof(run).iloc[:, 2:].to_numpy(), _oof(uninterrupted[0]).iloc[:, 2:].to_numpy(),
                               atol=1e-6)


def test_a_damaged_state_names_the_file_and_what_to_do(train_csv, tiny_deberta, tmp_path, monkeypatch,
                                                       uninterrupted):
    run = tmp_path / "run"
    run_stopped_at(monkeypatch, _cfg(train_csv, tiny_deberta), run, fold=0, step=4)
    newest = state_files(run / "fold_0")[-1]
    newest.write_bytes(newest.read_bytes()[:500])
    with pytest.raises(StateError, match=rf"training state {newest} cannot be read .*delete it to resume from "
                                         r"the previous state \(state-0000003.pt\)"):
        resume_run(run)
    newest.unlink()                 # as the message says: the previous state takes over
    resume_run(run)
    np.testing.assert_allclose(_oof(run).iloc[:, 2:].to_numpy(), _oof(uninterrupted[0]).iloc[:, 2:].to_numpy(),
                               rtol=0, atol=1e-6)


def test_a_changed_config_is_refused_unless_forced(uninterrupted, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(uninterrupted[0], run)
    with pytest.raises(ConfigError, match=r"training.lr: 0.001 \(saved\) -> 0.002.*--force"):
        resume_run(run, ["training.lr=0.002"])
    scores = resume_run(run, ["training.lr=0.002"], force=True)     # every fold finished: nothing retrains
    assert load_config(run / "config.yaml").training.lr == 0.002
    assert scores["oof"]["mcrmse"] == pytest.approx(uninterrupted[1]["oof"]["mcrmse"])


def test_a_changed_train_file_is_refused(uninterrupted, tmp_path, train_csv):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(uninterrupted[0], run)
    changed = tmp_path / "train.csv"
    frame = pd.read_csv(train_csv)
    frame.loc[0, "cohesion"] = 1.0 if frame.loc[0, "cohesion"] != 1.0 else 2.0
    frame.to_csv(changed, index=False)
    cfg = load_config(run / "config.yaml")
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace(str(train_csv), str(changed)))
    assert load_config(run / "config.yaml").data.train_file == str(changed) != cfg.data.train_file
    with pytest.raises(ConfigError, match="has changed since .* started"):
        resume_run(run)


def test_two_runs_with_one_seed_give_identical_oof(train_csv, tiny_deberta, tmp_path, uninterrupted):
    run_cross_validation(_cfg(train_csv, tiny_deberta, "training.deterministic=true"), tmp_path / "again")
    assert _oof(tmp_path / "again").equals(_oof(uninterrupted[0]))
    assert torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(False)
    run_cross_validation(_cfg(train_csv, tiny_deberta, "training.seed=7"), tmp_path / "other_seed")
    assert not _oof(tmp_path / "other_seed").equals(_oof(uninterrupted[0]))
    assert json.loads((tmp_path / "again" / "scores.json").read_text())["oof"] == uninterrupted[1]["oof"]


def test_train_py_resuming_a_folder_that_does_not_exist_says_so(tmp_path, capsys):
    from foldtune.cli import train_main

    assert train_main(["--resume", str(tmp_path / "absent")]) == 2
    assert f"--resume: {tmp_path / 'absent'} does not exist: nothing to resume" in capsys.readouterr().err
    assert not (tmp_path / "absent").exists()
