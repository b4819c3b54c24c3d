"""One process at a time in a run folder (run_lock.py), what killed processes left there
(files.remove_orphans at a resume), and each run's train.log holding its own lines only."""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path

import pytest
from conftest import ended_pid

from foldtune.cli import train_main
from foldtune.data.demo import make_demo
from foldtune.run_lock import LOCK_FILE, RunLock, RunLockError

HOST = socket.gethostname()
STARTED = "2026-11-30T10:00:00"


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    """A folder with 20 demo essays and a two-fold tfidf_ridge config (seconds to train), as the current folder."""
    train, test = make_demo(n_train=20, n_test=4, seed=1)
    train.to_csv(tmp_path / "train.csv", index=False)
    test.to_csv(tmp_path / "test.csv", index=False)
    (tmp_path / "tfidf.yaml").write_text("data:\n  train_file: train.csv\n  test_file: test.csv\n"
                                         "folds:\n  n_splits: 2\nmodel:\n  type: tfidf_ridge\ntfidf:\n  min_df: 1\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_lock(folder: Path, pid: int, host: str = HOST) -> None:
    (folder / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": host, "purpose": "training", "started": STARTED,
                                                "command": "train.py", "token": "0123"}) + "\n")


def busy(folder: Path, pid: int) -> str:
    return (f"run folder {folder} is in use by pid {pid} on host {HOST} (training since {STARTED}): wait for it to "
            f"end, or use another folder (if pid {pid} is not foldtune, remove {folder / LOCK_FILE})")


def contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def train_done_run(capsys) -> Path:
    assert train_main(["--config", "tfidf.yaml", "--name", "done"]) == 0
    capsys.readouterr()
    return Path("runs/done")


def test_a_new_run_into_a_folder_in_use_is_refused_and_writes_nothing(work, live_pid, capsys):
    taken = Path("runs/taken")
    taken.mkdir(parents=True)
    write_lock(taken, live_pid)
    before = contents(taken)
    assert train_main(["--config", "tfidf.yaml", "--name", "taken"]) == 2
    assert capsys.readouterr().err == f"error: {busy(taken, live_pid)}\n"
    assert contents(taken) == before


def test_a_resume_or_an_export_of_a_run_in_use_is_refused_and_writes_nothing(work, live_pid, capsys):
    from foldtune.export import main as export_main

    run = train_done_run(capsys)
    write_lock(run, live_pid)
    before = contents(run)
    assert train_main(["--resume", str(run)]) == 2
    assert capsys.readouterr().err == f"error: {busy(run, live_pid)}\n"
    assert export_main(["--run", str(run), "--out", "kaggle"]) == 2
    assert capsys.readouterr().err == f"error: {busy(run, live_pid)}\n"
    assert contents(run) == before
    assert not Path("kaggle").exists()


def test_a_lock_of_an_ended_process_is_taken_over_with_a_message(work, capsys):
    run = train_done_run(capsys)
    pid = ended_pid()
    write_lock(run, pid)
    assert train_main(["--resume", str(run)]) == 0
    assert (f"run folder {run}: took over the lock of pid {pid} on host {HOST} (training since {STARTED}), "
            "which has ended") in capsys.readouterr().err
    assert not (run / LOCK_FILE).exists()


def test_the_lock_is_held_while_the_run_trains_and_gone_after_it_ends_fails_or_stops(work, monkeypatch, capsys):
    from foldtune.models import tfidf_ridge
    from foldtune.training.stopping import TrainingInterrupted

    train_folds = tfidf_ridge.train_tfidf_folds
    seen, outcome = [], {}

    def training(cfg, run_dir, *args):
        seen.append(json.loads((run_dir / LOCK_FILE).read_text())["pid"])
        if outcome.get("stop"):
            raise TrainingInterrupted(signal.SIGINT)
        return train_folds(cfg, run_dir, *args)

    monkeypatch.setattr(tfidf_ridge, "train_tfidf_folds", training)
    assert train_main(["--config", "tfidf.yaml", "--name", "a"]) == 0
    assert seen == [os.getpid()] and not Path("runs/a", LOCK_FILE).exists()
    outcome["stop"] = True
    assert train_main(["--resume", "runs/a"]) == 128 + signal.SIGINT
    assert seen == [os.getpid()] * 2 and not Path("runs/a", LOCK_FILE).exists()
    assert train_main(["--resume", "runs/a", "tfidf.alpha=3"]) == 2          # a changed config: refused
    assert "the config differs" in capsys.readouterr().err
    assert not Path("runs/a", LOCK_FILE).exists()


def test_two_starts_of_one_run_name_get_one_folder(tmp_path):
    from foldtune.config import ConfigError, load_config
    from foldtune.training.cross_validation import new_run_dir

    cfg = load_config(None, [f"output.dir={tmp_path}", "output.name=same"])
    first = new_run_dir(cfg, "x")           # locked before config.yaml is written: the second must not pass
    assert first.folder == tmp_path / "same"
    with pytest.raises(RunLockError) as refused:
        new_run_dir(cfg, "x")
    assert str(refused.value).startswith(f"run folder {first.folder} is in use by pid {os.getpid()} on host {HOST} "
                                         "(training since ")
    (first.folder / "config.yaml").write_text("{}\n")
    first.release()
    with pytest.raises(ConfigError, match="already holds a run"):
        new_run_dir(cfg, "x")
    assert sorted(p.name for p in first.folder.iterdir()) == ["config.yaml"]


def test_a_new_run_refuses_fold_folders_it_did_not_write(tmp_path):
    """A run stopping while its folder was removed writes its last training state into a
    new fold folder: a new run of that name would have continued it."""
    from foldtune.config import ConfigError, load_config
    from foldtune.training.cross_validation import new_run_dir

    state = tmp_path / "same" / "fold_0" / "state" / "state-0000007.pt"
    state.parent.mkdir(parents=True)
    state.write_bytes(b"an earlier run's state")
    cfg = load_config(None, [f"output.dir={tmp_path}", "output.name=same"])
    with pytest.raises(ConfigError) as refused:
        new_run_dir(cfg, "x")
    assert str(refused.value) == (f"run folder {tmp_path / 'same'} holds fold_0 but no config.yaml: the folds of "
                                  "another run, which a new run would continue; move them away, or choose another "
                                  "output.name (or --name)")
    # nothing of it touched, and the folder not left locked
    assert state.read_bytes() == b"an earlier run's state" and not (tmp_path / "same" / LOCK_FILE).exists()


def test_a_lock_from_another_host_is_not_taken_over(tmp_path):
    write_lock(tmp_path, 1, host="other-machine")
    with pytest.raises(RunLockError) as refused:
        RunLock(tmp_path, "resume").acquire()
    assert str(refused.value) == (
        f"run folder {tmp_path} is locked by pid 1 on host other-machine (training since {STARTED}); this host cannot "
        f"tell whether that process still runs: wait for it, or if it has ended, remove {tmp_path / LOCK_FILE}")


def test_this_pid_in_a_lock_it_does_not_hold_is_an_earlier_process(tmp_path):
    """A restarted container hands out the same pids again."""
    write_lock(tmp_path, os.getpid())
    with RunLock(tmp_path, "export"):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["purpose"] == "export"
    assert list(tmp_path.iterdir()) == []


def test_a_resume_tidies_what_ended_processes_left_and_keeps_what_live_ones_write(work, live_pid, capsys):
    run = train_done_run(capsys)
    dead = ended_pid()
    (run / f".scores.json.tmp-{dead}").write_text("half")
    (run / "fold_0" / f".best.tmp-{dead}").mkdir()
    (run / "fold_0" / f".best.tmp-{dead}" / "model.joblib").write_bytes(b"half")
    (run / "fold_0" / f".state.tmp-{dead}").mkdir()                  # states being removed
    (run / "fold_1" / "best").rename(run / "fold_1" / f".best.old-{dead}")
    kept = [run / "fold_0" / f".best.tmp-{live_pid}", run / f".notes.txt.tmp-{os.getpid()}"]
    kept[0].mkdir()
    kept[1].write_text("ours")
    assert train_main(["--resume", str(run)]) == 0
    err = capsys.readouterr().err
    assert f"{run / 'fold_1' / 'best'} was missing: put back its previous copy .best.old-{dead}" in err
    left = sorted(str(p.relative_to(run)) for p in run.rglob(".*"))
    assert left == sorted(str(p.relative_to(run)) for p in kept)


def test_a_second_run_in_one_process_does_not_write_into_the_first_ones_log(work, capsys):
    assert train_main(["--config", "tfidf.yaml", "--name", "first"]) == 0
    assert train_main(["--config", "tfidf.yaml", "--name", "second"]) == 0
    first = Path("runs/first/train.log").read_text()
    second = Path("runs/second/train.log").read_text()
    assert "run folder: runs/first" in first and "done: runs/first" in first
    assert "runs/second" not in first
    assert "runs/first" not in second and "done: runs/second" in second
