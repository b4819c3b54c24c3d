"""Clean stops: SIGINT or SIGTERM finishes the current step, saves the training state and
exits with 130 or 143; a second signal exits at once.

The handler only records the request; the training loop asks `stop_requested()` after
each optimizer step, where the state is whole and can be saved.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger("foldtune")

# Set by the signal handler: a signal reaches the process, not one of its folds.
_requested: int | None = None


class TrainingInterrupted(Exception):
    """Training stopped on a signal after saving its state; resume with --resume."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum
        self.exit_code = 128 + signum


def _handle(signum, frame) -> None:
    global _requested
    if _requested is not None:
        os._exit(128 + signum)           # second signal: no more waiting
    _requested = signum
    log.warning("%s received: finishing the current step and saving the training state "
                "(send it again to exit at once)", signal.Signals(signum).name)


def install_signal_handlers() -> None:
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _handle)


def request_stop(signum: int = signal.SIGTERM) -> None:
    """What the handler does; for code (and tests) that stop a run themselves."""
    global _requested
    _requested = signum


def stop_requested() -> int | None:
    """The signal that asked training to stop, or None."""
    return _requested


def clear_stop_request() -> None:
    global _requested
    _requested = None
