"""What a run shows while its folds train: a bar per fold on a terminal, a line every so
often where nobody watches a terminal (a log file, a notebook's captured output), or nothing.

`FOLDTUNE_PROGRESS=bar|log|off` chooses (default: a bar when stderr, where tqdm writes, is
a terminal; else lines) and `FOLDTUNE_PROGRESS_INTERVAL` sets the seconds between two lines
(default 30). Environment variables, not config keys: how a run is watched is no part of
the experiment, and a resumed run may be watched another way without --force.

The trainer calls `step()` after every optimizer step and `doing()` before what is not a
step (an evaluation, a checkpoint). The loss lives on the device, where a read waits for
the GPU: it is read only when it is shown, about once a second for a bar, once a line.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from typing import Callable, Protocol, TextIO

from tqdm.auto import tqdm

from foldtune.config import ConfigError
from foldtune.runtime.launch_lock import CUDA_LAUNCH_LOCK

log = logging.getLogger("foldtune")

PROGRESS_ENV = "FOLDTUNE_PROGRESS"
INTERVAL_ENV = "FOLDTUNE_PROGRESS_INTERVAL"
MODES = ("bar", "log", "off")
DEFAULT_INTERVAL = 30.0
BAR_READ_SECONDS = 1.0      # a bar's loss, learning rate and run time left: read this often

Clock = Callable[[], float]
# What the trainer shows, read when shown: (mean training loss, backbone learning rate).
LossAndLr = Callable[[], "tuple[float, float]"]


def progress_settings(bars: bool = True, stream: TextIO | None = None) -> tuple[str, float]:
    """(mode, seconds between two lines) from the environment.

    bars: whether this process may draw bars. Several processes that share a terminal
    (fold worker processes, a fold-parallel launch) write lines instead, asked for bars
    or not: their bars would overwrite each other.
    """
    asked = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if asked not in ("", *MODES):
        raise ConfigError(f"{PROGRESS_ENV}={asked}: expected bar, log or off")
    text = os.environ.get(INTERVAL_ENV, "").strip()
    try:
        interval = float(text) if text else DEFAULT_INTERVAL
    except ValueError:
        interval = math.nan
    if not interval >= 0 or math.isinf(interval):
        raise ConfigError(f"{INTERVAL_ENV}={text}: expected the seconds between two progress lines, a number >= 0")
    stream = sys.stderr if stream is None else stream
    mode = asked or ("bar" if _is_terminal(stream) else "log")
    if mode == "bar" and not bars:
        mode = "log"
    return mode, interval


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):     # no isatty, or a closed stream
        return False


def format_duration(seconds: float | None) -> str:
    """42s, 1m54s, 2h05m; '?' while there is no speed to tell from."""
    if seconds is None:
        return "?"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def format_speed(steps_per_second: float | None) -> str:
    """2.3 steps/s; below one step a second, the seconds a step takes: 4.2 s/step."""
    if not steps_per_second:
        return "? steps/s"
    if steps_per_second >= 1:
        return f"{steps_per_second:.1f} steps/s"
    return f"{1 / steps_per_second:.1f} s/step"


class RunSteps:
    """The steps of the folds one process trains, for the time the run has left.

    Folds in threads share one. The speed is the steps of every fold in this session over
    the time since the first began, so the building and evaluations between steps count,
    and folds side by side add up. A fold not begun yet has all its steps left.
    """

    def __init__(self, steps_of_fold: dict[int, int]):
        self._total = dict(steps_of_fold)
        self._at = {fold: 0 for fold in steps_of_fold}
        self._first: dict[int, int] = {}        # the step each fold began this session at
        self._started: float | None = None
        self._lock = threading.Lock()

    def begin(self, fold: int, step: int, total: int, now: float) -> None:
        with self._lock:
            self._started = now if self._started is None else self._started
            self._total[fold], self._first[fold], self._at[fold] = total, step, step

    def advance(self, fold: int, step: int) -> None:
        self._at[fold] = step

    def seconds_left(self, now: float) -> float | None:
        with self._lock:
            done = sum(self._at[fold] - first for fold, first in self._first.items())
            if self._started is None or done <= 0 or now <= self._started:
                return None
            left = sum(total - self._at[fold] for fold, total in self._total.items())
            return left * (now - self._started) / done


class FoldProgress(Protocol):
    def step(self, step: int, read: LossAndLr) -> None:
        """After optimizer step `step`; read() is called only when the loss is shown."""

    def doing(self, what: str) -> None:
        """Before something that is not a step: 'evaluating step 40 on 200 rows'."""

    def close(self) -> None:
        """At the fold's end; a second call does nothing."""


class NoProgress:
    """Nothing shown: the processes of a data-parallel fold other than the main one."""

    def step(self, step: int, read: LossAndLr) -> None:
        pass

    def doing(self, what: str) -> None:
        pass

    def close(self) -> None:
        pass


class _Pace:
    """A fold's speed and time left in this session, and the run's."""

    def __init__(self, fold: int, total: int, initial: int, run: RunSteps | None, clock: Clock):
        self.fold, self.total, self.initial, self.run, self.clock = fold, total, initial, run, clock
        self.started = clock()
        if run is not None:
            run.begin(fold, initial, total, self.started)

    def advance(self, step: int) -> None:
        if self.run is not None:
            self.run.advance(self.fold, step)

    def speed(self, step: int, now: float) -> float | None:
        return (step - self.initial) / (now - self.started) if now > self.started and step > self.initial else None

    def fold_left(self, step: int, now: float) -> float | None:
        speed = self.speed(step, now)
        return None if speed is None else (self.total - step) / speed

    def run_left(self, now: float) -> str:
        """', run left 9m40s'; nothing when this process trains one fold it knows of."""
        return "" if self.run is None else f", run left {format_duration(self.run.seconds_left(now))}"


class LogProgress:
    """A line every `interval` seconds, the first one interval after the fold began:
    fold 0: step 120/384 (31%), loss 0.4120, lr 8.1e-05, 2.3 steps/s, fold left 1m54s, run left 9m40s"""

    def __init__(self, fold: int, total: int, initial: int, run: RunSteps | None, interval: float,
                 clock: Clock = time.monotonic):
        self.pace = _Pace(fold, total, initial, run, clock)
        self.interval = interval
        self.last_line = self.pace.started

    def step(self, step: int, read: LossAndLr) -> None:
        self.pace.advance(step)
        now = self.pace.clock()
        if now - self.last_line < self.interval:
            return
        self.last_line = now
        loss, lr = read()
        pace = self.pace
        line = (f"fold {pace.fold}: step {step}/{pace.total} ({100 * step // pace.total}%), loss {loss:.4f}, "
                f"lr {lr:.1e}, {format_speed(pace.speed(step, now))}, "
                f"fold left {format_duration(pace.fold_left(step, now))}{pace.run_left(now)}")
        with CUDA_LAUNCH_LOCK.released():       # files are written outside the launch lock: other folds go on launching
            log.info(line)

    def doing(self, what: str) -> None:
        with CUDA_LAUNCH_LOCK.released():
            log.info("fold %s: %s…", self.pace.fold, what)

    def close(self) -> None:
        pass


class BarProgress:
    """A tqdm bar: steps, steps/s and the fold's time left (tqdm's own), then the loss, the
    learning rate and the run's time left, read every BAR_READ_SECONDS; `doing` shows
    there until the next read."""

    def __init__(self, fold: int, total: int, initial: int, run: RunSteps | None, clock: Clock = time.monotonic,
                 stream: TextIO | None = None):
        self.pace = _Pace(fold, total, initial, run, clock)
        # Folds in threads each get a line of their own: tqdm gives each bar a free position.
        self.bar = tqdm(total=total, initial=initial, desc=f"fold {fold}", unit="step", dynamic_ncols=True,
                        file=sys.stderr if stream is None else stream)
        self.last_read = -math.inf
        self.numbers = ""

    def step(self, step: int, read: LossAndLr) -> None:
        self.pace.advance(step)
        now = self.pace.clock()
        if now - self.last_read >= BAR_READ_SECONDS:
            self.last_read = now
            loss, lr = read()
            self.numbers = f"loss {loss:.4f}, lr {lr:.1e}{self.pace.run_left(now)}"
            self.bar.set_postfix_str(self.numbers, refresh=False)      # drawn by the update
        self.bar.update(step - self.bar.n)

    def doing(self, what: str) -> None:
        self.bar.set_postfix_str(f"{what}…")
        self.last_read = -math.inf           # the next step shows the numbers again

    def close(self) -> None:
        """Leave the bar with the numbers, not what was done last; once closed, nothing."""
        self.bar.set_postfix_str(self.numbers, refresh=False)
        self.bar.close()


class RunProgress:
    """How one process shows its folds' progress; `fold()` makes each fold's display.

    steps_of_fold: the optimizer steps of each fold this process trains, for the run's
    time left; None when it trains one fold of a run whose others it does not see (a fold
    worker process, a distillation's student): its lines leave the run's time out.
    """

    def __init__(self, mode: str, interval: float = DEFAULT_INTERVAL, steps_of_fold: dict[int, int] | None = None,
                 clock: Clock = time.monotonic, stream: TextIO | None = None):
        if mode not in MODES:
            raise ValueError(f"progress mode {mode!r}: expected one of {', '.join(MODES)}")
        self.mode, self.interval, self.clock, self.stream = mode, interval, clock, stream
        self.run = None if steps_of_fold is None else RunSteps(steps_of_fold)

    @classmethod
    def from_environment(cls, bars: bool = True, steps_of_fold: dict[int, int] | None = None) -> "RunProgress":
        mode, interval = progress_settings(bars)
        return cls(mode, interval, steps_of_fold)

    def fold(self, fold: int, total: int, initial: int) -> FoldProgress:
        if self.mode == "bar":
            return BarProgress(fold, total, initial, self.run, self.clock, self.stream)
        if self.mode == "log":
            return LogProgress(fold, total, initial, self.run, self.interval, self.clock)
        return NoProgress()


NO_PROGRESS = RunProgress("off")
