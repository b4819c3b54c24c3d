"""`foldtune search` (python -m foldtune.search): the command line of a search."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from foldtune.commands import as_typed, prog_of

log = logging.getLogger("foldtune")


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    prog = prog or prog_of("search")
    parser = argparse.ArgumentParser(
        prog=prog, description="Search config keys with optuna: each trial a run folder trained fold by fold, "
                               "pruned when its folds so far average worse than the median; the best trial's "
                               "config in best.yaml.",
        epilog=f"example: {as_typed(prog)} --config configs/ellipse_minilm.yaml --space search.yaml --trials 20 "
               "training.epochs=3\n\nThe space file maps dotted config keys to a range or choices:\n"
               "  training.lr: {low: 1.0e-5, high: 1.0e-4, log: true}\n"
               "  training.epochs: {low: 2, high: 5, step: 1}\n"
               "  model.pooling: {choices: [mean, cls, attention]}\n"
               "Run the same command again to resume (--trials counts the trials already ended).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the base YAML config of every trial")
    parser.add_argument("--space", required=True, help="YAML file: config key -> {low, high[, log][, step]} or "
                                                       "{choices: [...]}")
    parser.add_argument("--trials", type=int, required=True,
                        help="complete and pruned trials the study should hold (a resumed search counts its own)")
    parser.add_argument("--out", default=None,
                        help="the search folder (default: <output.dir>/search-<config name>)")
    parser.add_argument("--startup-trials", type=int, default=2,
                        help="complete trials before the pruner stops any (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of optuna's TPE sampler (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="overrides of the base config")
    args = parser.parse_intermixed_args(argv)
    if args.trials < 1:
        parser.error(f"--trials {args.trials}: expected an integer >= 1")
    if args.startup_trials < 0:
        parser.error(f"--startup-trials {args.startup_trials}: expected an integer >= 0")

    from foldtune.logs import setup_console_logging

    setup_console_logging()
    # imported once the arguments are read: --help answers before torch and optuna load
    from foldtune.config import ConfigError
    from foldtune.data.validate import DataError
    from foldtune.files import as_write_error
    from foldtune.run_lock import RunLockError
    from foldtune.search.records import BEST_FILE, best_trial
    from foldtune.search.definition import prepare_search
    from foldtune.search.study import run_search
    from foldtune.training.stopping import TrainingInterrupted, install_signal_handlers

    install_signal_handlers()
    try:
        search = prepare_search(args.config, args.overrides, args.space, args.out)
        study = run_search(search, args.trials, args.startup_trials, args.seed)
    except (ConfigError, DataError, RunLockError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingInterrupted as stop:
        print(f"{stop}: the trial that was training is marked failed and will be tried again. Continue with the "
              "same command.", file=sys.stderr)
        return stop.exit_code
    except OSError as err:
        failure = as_write_error(err)
        if failure is None:
            raise
        print(f"error: {failure}", file=sys.stderr)
        return 1
    best = best_trial(study)
    if best is None:
        print(f"{search.out}: no trial is complete yet")
    else:
        print(f"{search.out}: best trial {best.number}, OOF MCRMSE {best.value:.4f}: {search.out / BEST_FILE}")
    return 0
