"""A write that fails ends train.py in one line that names the file, the cause and the
resume command, with what was written before intact: on a real full file system (a
tmpfs too small) and a real read-only folder (a read-only bind mount), both as root."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from foldtune.cli import train_main

REPO = Path(__file__).resolve().parents[1]


def _args(model, csv, runs: Path, *overrides: str) -> list[str]:
    """Two folds of 13 training rows: 3 steps each."""
    return [f"model.name={model}", f"data.train_file={csv}", "data.test_file=null", "data.max_len=40",
            "folds.n_splits=2", "training.epochs=1", "training.batch_size=6", f"output.dir={runs}",
            "output.name=x", *overrides]


@pytest.fixture
def mount():
    """mount(*arguments): runs mount, or skips the test where it cannot; every mount is
    undone at the end (the run logs this process opened there are closed first)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs or a read-only bind needs root and mount(8)")
    mounted: list[Path] = []

    def run(*arguments: str) -> None:
        done = subprocess.run(["mount", *arguments], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"mount {' '.join(arguments)} failed: {done.stderr.strip()}")
        target = Path(arguments[-1])
        if target not in mounted:
            mounted.append(target)

    yield run
    logger = logging.getLogger("foldtune")
    for folder in reversed(mounted):
        for handler in list(logger.handlers):
            if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).is_relative_to(folder):
                logger.removeHandler(handler)
                handler.close()
        if subprocess.run(["umount", str(folder)]).returncode != 0:
            subprocess.run(["umount", "--lazy", str(folder)], check=True)     # a file still open there


def _last_line(err: str) -> str:
    assert "Traceback" not in err, err[-3000:]
    return err.strip().splitlines()[-1]


def test_a_full_disk_at_the_first_checkpoint_ends_in_one_line(small_train_csv, tiny_deberta, tmp_path, mount):
    # 96 KiB hold the run's small files, not the first checkpoint (~165 KiB)
    runs = tmp_path / "runs"
    runs.mkdir()
    mount("-t", "tmpfs", "-o", "size=96k", "tmpfs", str(runs))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(REPO / "train.py"),
                             *_args(tiny_deberta, small_train_csv, runs, "training.eval_steps=1",
                                    "training.save_state_steps=0")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    run = runs / "x"
    assert result.returncode == 1, result.stderr[-3000:]
    assert _last_line(result.stderr) == (
        f"error: could not write {run}/fold_0/best: no space left on the device. "
        f"Free space on the device, then continue with: python train.py --resume {run}")
    log = (run / "fold_0" / "train.log").read_text()
    assert "(best: trained)" in log and "saved" not in log
    assert sorted(path.name for path in (run / "fold_0").iterdir()) == ["metrics.csv", "train.log"]
    assert {"config.yaml", "run.json", "folds.csv"} <= {path.name for path in run.iterdir()}


def test_a_full_disk_at_a_training_state_keeps_the_one_before_and_resume_finishes(small_train_csv, tiny_deberta,
                                                                                  tmp_path, mount, capsys):
    # 640 KiB hold the small files and one state (~460 KiB), not the next one beside it
    runs = tmp_path / "runs"
    runs.mkdir()
    mount("-t", "tmpfs", "-o", "size=640k", "tmpfs", str(runs))
    run, states = runs / "x", runs / "x" / "fold_0" / "state"
    assert train_main(_args(tiny_deberta, small_train_csv, runs, "training.eval_steps=0",
                            "training.save_state_steps=1")) == 1
    assert _last_line(capsys.readouterr().err) == (
        f"error: could not write {states}/state-0000002.pt: no space left on the device. "
        f"Free space on the device, then continue with: python train.py --resume {run}")
    assert [path.name for path in states.iterdir()] == ["state-0000001.pt"]       # no temporary file left
    assert torch.load(states / "state-0000001.pt", weights_only=True)["step"] == 1
    log = (run / "fold_0" / "train.log").read_text()
    assert "training state saved at step 1" in log and "at step 2" not in log

    mount("-o", "remount,size=8m", str(runs))
    assert train_main(["--resume", str(run)]) == 0
    assert f"fold 0: continuing from {states}/state-0000001.pt" in capsys.readouterr().err
    assert (run / "scores.json").is_file()


def test_a_read_only_run_folder_ends_in_one_line(small_train_csv, tiny_deberta, tmp_path, mount, monkeypatch, capsys):
    """The run folder turns read-only just before the first checkpoint is written (the
    logs, open already, go on)."""
    from foldtune.training.trainer import FoldTrainer

    run = tmp_path / "runs" / "x"
    original = FoldTrainer.save_checkpoint

    def read_only_first(self, *args, **kwargs):
        mount("--bind", str(run), str(run))
        mount("-o", "remount,bind,ro", str(run))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FoldTrainer, "save_checkpoint", read_only_first)
    assert train_main(_args(tiny_deberta, small_train_csv, tmp_path / "runs", "training.eval_steps=1")) == 1
    assert _last_line(capsys.readouterr().err) == (
        f"error: could not write {run}/fold_0/best: read-only file system. "
        f"Make the folder writable, then continue with: python train.py --resume {run}")
    assert "saved" not in (run / "fold_0" / "train.log").read_text()


def test_write_failures_are_told_by_their_cause(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    from foldtune import files
    from foldtune.files import WriteError, as_write_error, write_failure

    target = tmp_path / "fold_0" / "best"

    def cause(err):
        failure = write_failure(err, target)
        return None if failure is None else (failure.strerror, failure.errno, failure.filename)

    assert cause(OSError(errno.ENOSPC, "No space left on device")) == ("no space left on the device", errno.ENOSPC,
                                                                        str(target))
    assert cause(PermissionError(errno.EACCES, "Permission denied")) == ("permission denied", errno.EACCES,
                                                                         str(target))
    # what safetensors and torch.save raise on a full disk and a read-only one (seen on a tmpfs)
    assert cause(SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")) == (
        "no space left on the device", errno.ENOSPC, str(target))
    assert cause(RuntimeError("[enforce fail at inline_container.cc:747] . open file failed with strerror: "
                              "Read-only file system")) == ("read-only file system", errno.EROFS, str(target))
    unexpected_pos = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    monkeypatch.setattr(files, "_free_bytes", lambda folder: 4096)
    assert cause(unexpected_pos) == ("no space left on the device", errno.ENOSPC, str(target))
    monkeypatch.setattr(files, "_free_bytes", lambda folder: 10 << 30)
    assert cause(unexpected_pos) == ("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534", None,
                                     str(target))
    assert cause(RuntimeError("CUDA error: an illegal memory access was encountered")) is None
    assert cause(ValueError("bad value")) is None

    assert str(WriteError(target, "no space left on the device", errno.ENOSPC)) == (
        f"could not write {target}: no space left on the device")
    # a failed write elsewhere (a log file, a folder) is told by its errno; a missing file is not one
    assert str(as_write_error(OSError(errno.EROFS, "Read-only file system", "runs/x/train.log"))) == (
        "could not write runs/x/train.log: read-only file system")
    assert as_write_error(FileNotFoundError(errno.ENOENT, "No such file or directory", "train.csv")) is None


def test_a_folder_that_cannot_be_renamed_in_leaves_the_previous_one(tmp_path, monkeypatch):
    from foldtune.files import WriteError, atomic_directory

    best = tmp_path / "best"
    best.mkdir()
    (best / "model.safetensors").write_text("previous")
    replace = os.replace

    def no_room_for_the_new_folder(source, destination):
        if Path(source).name.startswith(".best.tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        replace(source, destination)

    monkeypatch.setattr(os, "replace", no_room_for_the_new_folder)
    with pytest.raises(WriteError, match=r"could not write .*/best: no space left on the device"):
        with atomic_directory(best) as tmp:
            (tmp / "model.safetensors").write_text("new")
    assert [path.name for path in tmp_path.iterdir()] == ["best"]
    assert (best / "model.safetensors").read_text() == "previous"


def test_infer_on_a_full_disk_ends_in_one_line_and_leaves_no_file(tiny_runs, tmp_path, mount, capsys):
    from foldtune.cli import infer_main

    _, run, _ = tiny_runs
    out = tmp_path / "out"
    out.mkdir()
    mount("-t", "tmpfs", "-o", "size=16k", "tmpfs", str(out))
    fd = os.open(out / "filler", os.O_WRONLY | os.O_CREAT)     # the device full before the submission is written
    try:
        with pytest.raises(OSError) as full:
            while True:
                os.write(fd, b"\0" * 1024)
        assert full.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    code = infer_main(["--run", str(run), "--out", str(out / "submission.csv"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1
    assert _last_line(err) == (f"error: could not write {out / 'submission.csv'}: no space left on the device; no "
                               "submission was written (the folds are untouched): mend that, then run infer.py again")
    assert sorted(p.name for p in out.iterdir()) == ["filler"]
