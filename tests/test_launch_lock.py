"""Turns at the CUDA API for folds trained in threads (runtime/launch_lock.py), and the GIL's
switch interval while they train."""

import subprocess
import sys
import threading
import time

import pytest
import torch

from foldtune.config import load_config
from foldtune.runtime.launch_lock import LeavableLock, to_host
from foldtune.training.progress import NO_PROGRESS
from foldtune.training.schedulers import THREADS_SWITCH_INTERVAL, train_folds_in_threads


def test_the_lock_is_reentrant_and_its_holder_can_step_out_at_any_depth():
    lock = LeavableLock()
    order = []
    entered, released = threading.Event(), threading.Event()

    def other():
        with lock:
            order.append("other has the lock")
            entered.set()
        released.set()

    with lock:
        with lock:                              # depth 2
            thread = threading.Thread(target=other)
            thread.start()
            assert not entered.wait(0.2)        # held: the other thread waits
            with lock.released():
                assert not lock.held()
                assert released.wait(5)         # it took the lock and gave it back
                order.append("back")
            assert lock.held()
        assert lock.held()                      # depth 1 again: still this thread's
        blocked = threading.Thread(target=lambda: (lock.__enter__(), order.append("third"), lock.__exit__()))
        blocked.start()
        blocked.join(0.2)
        assert order == ["other has the lock", "back"]
    blocked.join(5)
    thread.join(5)
    assert order == ["other has the lock", "back", "third"]
    assert not lock.held()


def test_stepping_out_without_the_lock_does_nothing():
    lock = LeavableLock()
    with lock.released():
        assert not lock.held()
    with lock:
        pass
    assert not lock.held()


def test_to_host_of_a_cpu_tensor_is_its_value():
    value = torch.tensor([[1.5, -2.0]], requires_grad=True) * 2
    host = to_host(value)
    assert host.device.type == "cpu" and not host.requires_grad
    assert host.tolist() == [[3.0, -4.0]]


class _Prep:
    """What train_folds_in_threads uses of a PreparedRun: its config and train_fold."""

    def __init__(self, fail: int | None = None):
        self.cfg = load_config(None, ["training.device=cpu", "model.backbone_dropout=0.0"])
        self.fail = fail
        self.seen: dict[int, float] = {}
        self.in_threads: dict[int, bool] = {}
        self.running: list[int] = []
        self.running_before: dict[int, list[int]] = {}     # the folds running when a fold began

    def progress(self, folds):
        return NO_PROGRESS

    def train_fold(self, fold: int, in_threads: bool = False, on_running=None, progress=None) -> str:
        assert progress is NO_PROGRESS        # the display made for the folds side by side reaches each one
        self.seen[fold] = sys.getswitchinterval()
        self.in_threads[fold] = in_threads
        self.running_before[fold] = sorted(self.running)
        if fold != self.fail:
            time.sleep(0.05)            # building and the first steps take a while
            self.running.append(fold)
            on_running()
        if fold == self.fail:
            raise RuntimeError(f"fold {fold} failed")
        return f"result {fold}"


def test_folds_in_threads_train_with_a_short_switch_interval_and_restore_it(monkeypatch):
    from foldtune.training import schedulers

    preloads = []
    monkeypatch.setattr(schedulers, "preload_plotting", lambda: preloads.append(1))
    before = sys.getswitchinterval()
    prep = _Prep()
    assert train_folds_in_threads(prep, [0, 1, 2], 3) == {0: "result 0", 1: "result 1", 2: "result 2"}
    assert preloads == [1]              # once, when the last fold was running
    assert prep.seen == {fold: pytest.approx(THREADS_SWITCH_INTERVAL) for fold in (0, 1, 2)}
    assert prep.in_threads == {0: True, 1: True, 2: True}
    assert prep.running_before == {0: [], 1: [0], 2: [0, 1]}   # each begun once the one before ran
    assert sys.getswitchinterval() == before

    failing = _Prep(fail=1)
    with pytest.raises(RuntimeError, match="fold 1 failed"):
        train_folds_in_threads(failing, [0, 1], 2)
    assert sys.getswitchinterval() == before
    failing_first = _Prep(fail=0)       # a fold that fails before running lets the next one begin
    with pytest.raises(RuntimeError, match="fold 0 failed"):
        train_folds_in_threads(failing_first, [0, 1, 2], 3)
    assert failing_first.running_before == {0: [], 1: [], 2: [1]}


def test_the_plotting_modules_are_preloaded_in_a_thread():
    code = ("import sys; from foldtune.report import preload_plotting; "
            "assert 'matplotlib.figure' not in sys.modules; preload_plotting().join(); "
            "print('matplotlib.figure' in sys.modules, 'matplotlib.backends.backend_agg' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"]
