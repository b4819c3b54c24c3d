"""One fold in its own process: `python -m foldtune.training.fold_worker RUN_DIR FOLD`.

Started by `train_folds_in_processes` when `training.parallel_folds` > 1; reads the run's
config, folds and token ids from RUN_DIR and trains the fold as the sequential loop would.
"""

from __future__ import annotations

import sys

from foldtune.logs import setup_console_logging
from foldtune.training.prepared import PreparedRun
from foldtune.training.progress import RunProgress
from foldtune.training.stopping import TrainingInterrupted, install_signal_handlers


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m foldtune.training.fold_worker RUN_DIR FOLD", file=sys.stderr)
        return 2
    setup_console_logging()
    install_signal_handlers()
    try:
        # Lines, not bars: the other folds' processes write to the same terminal.
        PreparedRun.load(argv[0]).train_fold(int(argv[1]), progress=RunProgress.from_environment(bars=False))
    except TrainingInterrupted as stop:
        return stop.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
