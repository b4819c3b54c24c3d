"""The progress display (training/progress.py): lines every interval off a terminal, a bar on
one, nothing on the data-parallel processes that do not show; and what a real training writes."""

from __future__ import annotations

import io
import logging
import re
from types import SimpleNamespace

import pandas as pd
import pytest
from conftest import train_tiny_run

from foldtune.config import ConfigError
from foldtune.training.progress import (INTERVAL_ENV, PROGRESS_ENV, NoProgress, RunProgress, RunSteps,
                                        format_duration, format_speed, progress_settings)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Reads:
    """The trainer's (loss, lr) reader, counting its calls: each is a wait for the GPU."""

    def __init__(self, loss: float = 0.412, lr: float = 8.1e-5) -> None:
        self.calls, self.value = 0, (loss, lr)

    def __call__(self) -> tuple[float, float]:
        self.calls += 1
        return self.value


@pytest.fixture
def lines():
    """The foldtune logger's messages, caught by a handler of their own (the console setup of
    train_main turns propagation to pytest's off)."""
    caught: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: caught.append(record.getMessage())
    log = logging.getLogger("foldtune")
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    yield caught
    log.removeHandler(handler)
    log.setLevel(level)


def test_durations_and_speeds_read_as_written():
    assert [format_duration(s) for s in (0, 41.6, 59.4, 59.6, 114.8, 3599, 3600, 7530, None)] == [
        "0s", "42s", "59s", "1m00s", "1m55s", "59m59s", "1h00m", "2h05m", "?"]
    assert [format_speed(r) for r in (2.34, 1.0, 0.25, None)] == ["2.3 steps/s", "1.0 steps/s", "4.0 s/step",
                                                                  "? steps/s"]


def test_a_line_every_interval_with_the_fold_and_run_time_left(lines):
    clock, reads = FakeClock(), Reads()
    progress = RunProgress("log", interval=30, steps_of_fold={0: 384, 1: 384}, clock=clock).fold(0, 384, 0)
    for step in range(1, 121):              # two steps a second
        clock.now = step / 2
        progress.step(step, reads)
        if step == 59:                      # 29.5 s: no line yet, and the loss was never read
            assert lines == [] and reads.calls == 0
    # 60 steps done and 324 + 384 left at 2 steps/s; then 120 done, 264 + 384 left
    assert lines == [
        "fold 0: step 60/384 (15%), loss 0.4120, lr 8.1e-05, 2.0 steps/s, fold left 2m42s, run left 5m54s",
        "fold 0: step 120/384 (31%), loss 0.4120, lr 8.1e-05, 2.0 steps/s, fold left 2m12s, run left 5m24s",
    ]
    assert reads.calls == 2
    progress.doing("evaluating step 120 on 783 rows")
    assert lines[-1] == "fold 0: evaluating step 120 on 783 rows…"


def test_a_resumed_fold_counts_its_speed_from_where_it_began(lines):
    clock = FakeClock()
    clock.now = 100.0
    # a fold worker process: one fold, the run's others unknown, so no run time left
    progress = RunProgress("log", interval=10, clock=clock).fold(3, 50, 40)
    clock.now = 125.0
    progress.step(45, Reads(0.05, 2e-6))
    assert lines == ["fold 3: step 45/50 (90%), loss 0.0500, lr 2.0e-06, 5.0 s/step, fold left 25s"]


def test_folds_side_by_side_add_their_speeds_for_the_run_time_left():
    run = RunSteps({0: 10, 1: 10, 2: 10})
    run.begin(0, 0, 10, now=0.0)
    run.begin(1, 4, 10, now=1.0)        # resumed at step 4: its earlier steps are not this session's speed
    assert run.seconds_left(now=0.0) is None
    run.advance(0, 6)
    run.advance(1, 8)
    # 6 + 4 steps in 5 s; 4 + 2 + 10 (fold 2, not begun) left at 2 steps/s
    assert run.seconds_left(now=5.0) == 8.0


def test_a_bar_counts_the_fold_steps_and_shows_loss_lr_and_run_time_left():
    clock, reads, out = FakeClock(), Reads(0.5, 1e-4), io.StringIO()
    progress = RunProgress("bar", steps_of_fold={0: 10, 1: 12}, clock=clock, stream=out).fold(0, 10, 2)
    bar = progress.bar
    assert (bar.total, bar.n, bar.desc) == (10, 2, "fold 0")
    for step in range(3, 11):
        clock.now = (step - 2) * 0.25       # four steps a second
        progress.step(step, reads)
    assert bar.n == 10
    assert reads.calls == 2                 # at the first step and a second later (step 7), not at each
    # read at step 7 (1.25 s, 5 steps): 3 + 12 steps left at 4 steps/s
    assert bar.postfix == "loss 0.5000, lr 1.0e-04, run left 4s"
    progress.doing("evaluating step 10 on 6 rows")
    assert bar.postfix == "evaluating step 10 on 6 rows…"
    progress.close()
    assert bar.postfix == "loss 0.5000, lr 1.0e-04, run left 4s" and "fold 0: 100%" in out.getvalue()


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_mode_follows_the_terminal_unless_the_environment_chooses(monkeypatch):
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    monkeypatch.delenv(INTERVAL_ENV, raising=False)
    assert progress_settings(stream=Terminal()) == ("bar", 30.0)
    assert progress_settings(stream=io.StringIO()) == ("log", 30.0)
    assert progress_settings(bars=False, stream=Terminal()) == ("log", 30.0)    # processes sharing a terminal
    monkeypatch.setenv(PROGRESS_ENV, "off")
    monkeypatch.setenv(INTERVAL_ENV, "5")
    assert progress_settings(stream=Terminal()) == ("off", 5.0)
    monkeypatch.setenv(PROGRESS_ENV, "bar")
    assert progress_settings(stream=io.StringIO()) == ("bar", 5.0)
    assert isinstance(RunProgress("off").fold(0, 10, 0), NoProgress)
    monkeypatch.setenv(PROGRESS_ENV, "bars")
    with pytest.raises(ConfigError, match=r"^FOLDTUNE_PROGRESS=bars: expected bar, log or off$"):
        progress_settings()
    monkeypatch.setenv(PROGRESS_ENV, "log")
    monkeypatch.setenv(INTERVAL_ENV, "-1")
    with pytest.raises(ConfigError, match=r"^FOLDTUNE_PROGRESS_INTERVAL=-1: expected the seconds between two "
                                          r"progress lines, a number >= 0$"):
        progress_settings()


def test_only_the_main_process_of_a_data_parallel_fold_shows_progress():
    from foldtune.training.trainer import FoldTrainer

    shown = RunProgress("log", interval=0)
    main = FoldTrainer(None, None, None, "unused", SimpleNamespace(is_main=True), shown)
    other = FoldTrainer(None, None, None, "unused", SimpleNamespace(is_main=False), shown)
    assert main.run_progress is shown and other.run_progress.mode == "off"


def test_a_training_off_a_terminal_writes_a_line_per_step_at_interval_zero(tiny_deberta, tmp_path, monkeypatch,
                                                                          lines):
    monkeypatch.setenv(PROGRESS_ENV, "log")
    monkeypatch.setenv(INTERVAL_ENV, "0")
    run = train_tiny_run(tiny_deberta, tmp_path, "p")       # 2 folds of 12 train rows, batches of 6: 2 steps
    step_line = re.compile(r"fold (\d): step (\d+)/2 \((\d+)%\), loss (\S+), lr (\S+), \S+ (?:steps/s|s/step), "
                           r"fold left \S+, run left \S+$")
    for fold in (0, 1):
        log = (run / f"fold_{fold}" / "train.log").read_text().splitlines()
        shown = [match.groups() for match in map(step_line.search, log) if match]
        metrics = pd.read_csv(run / f"fold_{fold}" / "metrics.csv")
        # one line per step, with the loss since the last evaluation (every step here) and
        # the learning rate that metrics.csv records for the same step
        assert shown == [(str(fold), str(row.step), str(50 * row.step), f"{row.train_loss:.4f}", f"{row.lr:.1e}")
                         for row in metrics.itertuples()]
        assert [line.split("INFO ", 1)[1] for line in log if "evaluating" in line or "saving" in line] == [
            line for row in metrics.itertuples()
            for line in [f"fold {fold}: evaluating step {row.step} on 12 rows…"]
            + ([f"fold {fold}: saving the checkpoint of step {row.step}…"] if row.best == "trained" else [])]
