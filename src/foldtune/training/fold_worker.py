"""One fold in its own process: `python -m foldtune.training.fold_worker RUN_DIR FOLD [SEED]`.

Started by `train_folds_in_processes` when `training.parallel_folds` > 1; reads the run's
config, folds and token ids from RUN_DIR and trains the fold (its model of SEED, in a run
with training.seeds) as the sequential loop would.
"""

from __future__ import annotations

import logging
import sys

import torch

from foldtune.logs import setup_console_logging
from foldtune.run_layout import FoldSeed
from foldtune.training.prepared import PreparedRun
from foldtune.training.progress import RunProgress
from foldtune.training.schedulers import OUT_OF_MEMORY_EXIT
from foldtune.training.stopping import TrainingInterrupted, install_signal_handlers

log = logging.getLogger("foldtune")


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print("usage: python -m foldtune.training.fold_worker RUN_DIR FOLD [SEED]", file=sys.stderr)
        return 2
    setup_console_logging()
    install_signal_handlers()
    try:
        # Lines, not bars: the other folds' processes write to the same terminal.
        unit = FoldSeed(int(argv[1]), int(argv[2]) if len(argv) == 3 else None)
        PreparedRun.load(argv[0]).train_fold(unit, progress=RunProgress.from_environment(bars=False))
    except TrainingInterrupted as stop:
        return stop.exit_code
    except torch.OutOfMemoryError:
        # the run's process names the fold and what to change; the traceback goes to this process's output
        log.exception("fold %s: the GPU ran out of memory", argv[1])
        return OUT_OF_MEMORY_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
