"""Where foldtune's log lines go: the console (above the progress bars) and a run's train.log.

Set up by the commands (cli.py) and by a fold's own process (training/fold_worker.py).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from tqdm.auto import tqdm

log = logging.getLogger("foldtune")


class _TqdmHandler(logging.Handler):
    """Log lines that do not tear the progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


def setup_console_logging() -> None:
    if not any(isinstance(h, _TqdmHandler) for h in log.handlers):
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def log_to_run_folder(run_dir: Path) -> logging.Handler:
    """The run's lines also go to its train.log, until the returned handler is closed
    (stop_logging_to): a second run in this process must not write into the first's."""
    handler = logging.FileHandler(run_dir / "train.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.info("run folder: %s", run_dir)
    return handler


def stop_logging_to(handler: logging.Handler) -> None:
    log.removeHandler(handler)
    handler.close()
