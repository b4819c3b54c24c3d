"""`foldtune ensemble`: blend runs trained on the same folds (foldtune.blend), or stack
them under a level-2 model (foldtune.stack).

    foldtune ensemble --run runs/A --run runs/B --run runs/C --out blend.json [--method nnls|hill]
    foldtune ensemble --stack runs/A runs/B --out stacks/ab [--model ridge|hgb] [--features all|own]
                      [--no-text-stats]

The blend's names stay importable from here (EnsembleError, build_blend, read_blend, ...).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from foldtune.blend import (BLEND_FORMAT, EnsembleError, apply_weights, blend_weights, build_blend,  # noqa: F401
                            fit_weights, format_report, hill_climb, honest_blend, load_member, read_blend,
                            simplex_least_squares)
from foldtune.commands import prog_of, runs_from_positionals
from foldtune.stack import FEATURE_SETS


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog or prog_of("ensemble"),
        description="Fit per-target blend weights on the OOF predictions of runs trained on the same folds; "
                    "report the in-sample and the honest (weights from the other folds) OOF MCRMSE.")
    parser.add_argument("--run", action="append", help="a run folder (with oof.csv and config.yaml); repeat for "
                                                         "each run to blend")
    parser.add_argument("positional", nargs="*", help=argparse.SUPPRESS)   # RUN ...: before --run
    parser.add_argument("--out", required=True, help="blend file to write, e.g. blend.json (with --stack: a folder)")
    parser.add_argument("--method", default=None, help="nnls (exact least squares on the simplex) or hill "
                                                         "(greedy selection with replacement); default: nnls")
    parser.add_argument("--train", default=None, help="train CSV with the true targets (default: the first "
                                                      "run's data.train_file)")
    parser.add_argument("--stack", nargs="+", default=None, metavar="RUN",
                        help="instead of a blend, a level-2 model per target over these runs' OOF predictions and "
                             "text statistics, fitted and scored fold by fold (foldtune.stack); --out names its "
                             "folder")
    parser.add_argument("--model", default=None, help="with --stack: ridge (standardised, alpha by leave-one-out) "
                                                      "or hgb (HistGradientBoostingRegressor); default: ridge")
    parser.add_argument("--features", default=None, choices=FEATURE_SETS,
                        help="with --stack: what each target's model reads: all (every member's prediction of "
                             "every target; the default) or own (the members' predictions of that target)")
    parser.add_argument("--no-text-stats", action="store_true",
                        help="with --stack: leave the text statistics out of the features")
    args = parser.parse_intermixed_args(argv)
    if args.stack:
        if args.run or args.positional or args.method:
            parser.error("--stack names its runs: --run, RUN ... and --method do not apply")
        from foldtune.stack import build_stack, format_stack_report

        def build() -> str:
            return format_stack_report(build_stack(args.stack, args.out, args.model or "ridge", args.train,
                                                   args.features or "all", not args.no_text_stats))
    else:
        given = [name for name, value in (("--model", args.model), ("--features", args.features),
                                          ("--no-text-stats", args.no_text_stats)) if value]
        if given:
            parser.error(f"{', '.join(given)} applies to --stack only (a blend has --method)")
        runs_from_positionals(parser, args)

        def build() -> str:
            return format_report(build_blend(args.run, args.out, args.method or "nnls", args.train))
    from foldtune.config import ConfigError
    from foldtune.data.validate import DataError

    try:
        report = build()
    except (EnsembleError, ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
