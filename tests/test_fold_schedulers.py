"""Which fold scheduler trains a run's folds (training/schedulers.py), and the one place
that checks a config before anything starts (training/checks.py)."""

from __future__ import annotations

import pytest

from foldtune.config import ConfigError, load_config
from foldtune.training import cross_validation
from foldtune.training.distributed import ONE_PROCESS
from foldtune.training.schedulers import InProcesses, InThreads, Launched, Sequential, fold_scheduler


class _Launch:
    """Process `rank` of a launch of `world_size`, as far as a scheduler asks."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size, self.is_main = rank, world_size, rank == 0


class _Prepared:
    """Trains nothing: records which folds it was asked for, and in which group."""

    def __init__(self):
        self.trained, self.read_back, self.group = [], [], None

    def progress(self, folds):
        return None

    def train_fold(self, fold, progress=None, **_):
        self.trained.append(fold)
        return f"trained {fold}"

    def load_fold_result(self, fold):
        self.read_back.append(fold)
        return f"read {fold}"

    def unfinished_reason(self, fold):
        return None


@pytest.mark.parametrize("overrides,kind,parallel", [
    ([], Sequential, None),
    (["training.parallel_folds=3", "training.parallel_mode=threads"], InThreads, 3),
    (["training.parallel_folds=2", "training.parallel_mode=processes"], InProcesses, 2),
])
def test_one_process_trains_as_parallel_folds_and_parallel_mode_say(overrides, kind, parallel):
    scheduler = fold_scheduler(load_config(None, overrides), ONE_PROCESS, fold_parallel=False)
    assert type(scheduler) is kind
    assert getattr(scheduler, "parallel", None) == parallel


def test_side_by_side_with_one_fold_trains_it_here_one_after_another():
    prepared = _Prepared()
    assert InProcesses(2).run_folds(prepared, [3]) == {3: "trained 3"}      # no process of its own
    assert prepared.trained == [3]


def test_a_fold_parallel_launch_trains_this_process_s_share_and_the_main_reads_every_fold_back():
    cfg = load_config(None, ["training.parallel_folds=2", "training.parallel_mode=threads"])
    scheduler = fold_scheduler(cfg, _Launch(0, 2), fold_parallel=True)
    assert type(scheduler) is Launched and type(scheduler.here) is InThreads and scheduler.here.parallel == 2
    other = _Prepared()
    assert Launched(_Launch(1, 2), True, Sequential(), 1).run_folds(other, [0, 1, 2, 3, 4]) == {}
    assert other.trained == [1, 3] and other.group.world_size == 1     # every 2nd fold from rank 1, alone
    main = _Prepared()
    results = Launched(_Launch(0, 2), True, Sequential(), 1).run_folds(main, [0, 1, 2])
    assert results == {0: "read 0", 1: "read 1", 2: "read 2"}          # its own folds too, from their files
    assert main.trained == [0, 2]


def test_a_data_parallel_launch_trains_every_fold_in_every_process():
    prepared = _Prepared()
    scheduler = fold_scheduler(load_config(None, []), _Launch(1, 2), fold_parallel=False)
    assert scheduler.run_folds(prepared, [0, 1]) == {0: "trained 0", 1: "trained 1"}
    assert prepared.group.world_size == 2


def test_every_run_is_checked_once_against_its_device_and_launch_before_its_data_is_read(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(cross_validation, "check_run", lambda *args: calls.append(args))
    monkeypatch.setattr(cross_validation, "check_data_files", lambda *args: calls.append("data files"))
    monkeypatch.setattr(cross_validation, "load_train", lambda *args: "rows")
    cfg = load_config(None, ["data.demo=false", "data.test_file=null"])
    assert cross_validation.load_inputs(cfg, fold_parallel=True) == "rows"
    (checked, device, world_size, fold_parallel), data = calls
    assert (checked, device.type, world_size, fold_parallel, data) == (cfg, "cpu", 1, True, "data files")


def test_the_checks_refuse_what_the_device_cannot_do_with_the_setting_named():
    from foldtune.runtime.precision import resolve_device
    from foldtune.training.checks import check_run

    cfg = load_config(None, ["training.target_weights=[1.0, 2.0]"])
    with pytest.raises(ConfigError, match=r"training.target_weights has 2 values for 6 targets"):
        check_run(cfg, resolve_device("cpu"), 1, False)
