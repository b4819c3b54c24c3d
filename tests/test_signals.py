"""SIGTERM and SIGINT stop train.py after the current step with a saved state (exit 143
and 130), `--resume` then finishes the run; a second signal exits at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from foldtune.data.demo import make_demo

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def _args(model, csv):
    return [f"model.name={model}", f"data.train_file={csv}", "data.test_file=null", "data.max_len=40",
            "folds.n_splits=2", "training.epochs=8", "training.batch_size=4", "training.save_state_steps=5",
            "training.eval_steps=0"]


@pytest.fixture(scope="module")
def csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("signals") / "train.csv"
    make_demo(n_train=24, n_test=0, seed=11)[0].to_csv(path, index=False)
    return path


def _wait_for(path_glob, folder: Path, process: subprocess.Popen, limit=300.0):
    waited = 0.0
    while not list(folder.glob(path_glob)):
        assert process.poll() is None, process.communicate()[1][-2000:]
        time.sleep(0.05)
        waited += 0.05
        assert waited < limit, f"no {path_glob} under {folder}"


@pytest.fixture(scope="module")
def straight(csv, tiny_deberta, tmp_path_factory):
    """The same run without a stop."""
    work = tmp_path_factory.mktemp("straight")
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "--name", "straight", *_args(tiny_deberta, csv)],
                            cwd=work, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return work / "runs" / "straight"


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_the_state_and_resume_finishes_the_run(signum, code, csv, tiny_deberta, tmp_path,
                                                             straight):
    process = subprocess.Popen([sys.executable, str(REPO / "train.py"), "--name", "stopped", *_args(tiny_deberta, csv)],
                               cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "runs" / "stopped"
    _wait_for("fold_0/state/state-*.pt", run, process)
    process.send_signal(signum)
    _, err = process.communicate(timeout=300)
    assert process.returncode == code, err[-2000:]
    assert f"python train.py --resume {Path('runs') / 'stopped'}" in err
    assert list((run / "fold_0" / "state").glob("state-*.pt"))
    assert not (run / "oof.csv").exists()

    resumed = subprocess.run([sys.executable, str(REPO / "train.py"), "--resume", "runs/stopped"], cwd=tmp_path,
                             env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "continuing from" in resumed.stderr
    a = pd.read_csv(run / "oof.csv")
    b = pd.read_csv(straight / "oof.csv")
    np.testing.assert_allclose(a.iloc[:, 2:].to_numpy(), b.iloc[:, 2:].to_numpy(), rtol=0, atol=1e-6)


def test_a_second_signal_exits_at_once(tmp_path):
    script = tmp_path / "wait.py"
    script.write_text(
        "import os, signal, sys, time\n"
        f"sys.path.insert(0, {str(REPO / 'src')!r})\n"
        "from foldtune.training.stopping import install_signal_handlers, stop_requested\n"
        "install_signal_handlers()\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "assert stop_requested() == signal.SIGINT\n"
        "print('first signal recorded', flush=True)\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "time.sleep(30)\n"
        "print('not reached')\n")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 130
    assert result.stdout == "first signal recorded\n"
