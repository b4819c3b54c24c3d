"""The foldtune commands as one family: `foldtune COMMAND ...` or `python -m foldtune COMMAND ...`.

The table names each command's module and function without importing them, so the
list answers at once, and each command parses its arguments before it imports torch:
`--help` answers in a fraction of a second. The older spellings run the same
functions: `python train.py`, `python infer.py`, `python -m foldtune.export` and the
`foldtune-<command>` console scripts.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import importlib.util
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence


@dataclass(frozen=True)
class Command:
    module: str
    function: str               # function(argv, prog) -> exit status
    summary: str
    script: str | None = None   # the script of a checkout that runs it too


COMMANDS = {
    "train": Command("foldtune.cli", "train_main",
                     "train every fold of a config: checkpoints, OOF predictions, scores, report (python train.py)",
                     "train.py"),
    "infer": Command("foldtune.cli", "infer_main",
                     "average the folds of one or more runs, or a blend, into a submission CSV (python infer.py)",
                     "infer.py"),
    "runs": Command("foldtune.runs", "main",
                    "list the runs of a folder: date, backbone, OOF MCRMSE, config keys changed"),
    "report": Command("foldtune.report", "main", "write a finished run's report.md and plots again"),
    "export": Command("foldtune.export", "main",
                      "write a run (or a blend or stack with its runs) as a self-contained folder to upload "
                      "as a Kaggle dataset"),
    "ensemble": Command("foldtune.ensemble", "main",
                        "fit per-target blend weights on the OOF of runs trained on the same folds: blend.json"),
    "compress": Command("foldtune.compress", "main",
                        "write a smaller copy of a run: fewer encoder layers, low-rank factors"),
    "search": Command("foldtune.search.command", "main",
                      "search config keys with optuna, trials pruned fold by fold: trials.csv, best.yaml, report.md"),
    "distill": Command("foldtune.cli", "distill_main",
                       "train one student on targets mixed from the true scores and a teacher's (train with "
                       "distill.teacher)"),
}


def prog_of(name: str) -> str:
    """The command as the user started it, for its usage line: `train.py`, `foldtune-export`,
    `python -m foldtune.export`; called from Python (a notebook, a test), `foldtune <name>`.
    The family passes its own (`foldtune export`, `python -m foldtune export`)."""
    command = COMMANDS[name]
    script = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if script is None:
        return f"foldtune {name}"
    typed = script.name.removesuffix(".exe")
    if typed in (f"foldtune-{name}", command.script):
        return typed
    if command.module != "foldtune.cli" and script.suffix == ".py":
        # python -m foldtune.export runs export.py as __main__: sys.argv[0] is that file
        spec = importlib.util.find_spec(command.module)
        if spec is not None and spec.origin and Path(spec.origin).resolve() == script.resolve():
            return f"python -m {command.module}"
    return f"foldtune {name}"


def as_typed(prog: str) -> str:
    """A prog as a command line to type again: `train.py` -> `python train.py`."""
    return f"python {prog}" if prog.endswith(".py") else prog


def warn_deprecated(prog: str, old: Sequence[str], new: Sequence[str]) -> None:
    """One line on stderr for a spelling kept for one release: what was typed, and its replacement."""
    print(f"warning: {as_typed(prog)} {shlex.join(old)} is deprecated; use {as_typed(prog)} {shlex.join(new)}",
          file=sys.stderr)


def runs_from_positionals(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Runs given as RUN ... (the spelling before --run, kept for one release) become
    args.run, with a deprecation line; no run at all is an error."""
    if args.positional:
        if args.run:
            parser.error(f"unrecognized arguments: {shlex.join(args.positional)} (give every run as --run RUN)")
        args.run = list(args.positional)
        warn_deprecated(parser.prog, args.positional, [part for run in args.run for part in ("--run", run)])
    if not args.run:
        parser.error("the following arguments are required: --run")


class Once(argparse.Action):
    """An option that may be given once (`--run` of a command that reads one run): a second
    one is an error, not silently the one kept."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest) is not None:
            parser.error(f"{option_string} given twice: {parser.prog} reads one run "
                         f"({getattr(namespace, self.dest)} and {values})")
        setattr(namespace, self.dest, values)


def _family_prog() -> str:
    main_file = Path(__file__).with_name("__main__.py").resolve()
    return "python -m foldtune" if sys.argv and Path(sys.argv[0]).resolve() == main_file else "foldtune"


def command_list(family: str) -> str:
    width = max(map(len, COMMANDS))
    lines = [f"usage: {family} COMMAND [options]   ({family} COMMAND --help: its options)", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {command.summary}" for name, command in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    family = _family_prog()
    if not argv or argv[0] in ("-h", "--help"):
        print(command_list(family))
        return 0
    name = argv[0]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        guess = f"did you mean '{close[0]}'? " if close else ""
        print(f"{family}: unknown command '{name}'; {guess}the commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    command = COMMANDS[name]
    run = getattr(importlib.import_module(command.module), command.function)
    return run(argv[1:], prog=f"{family} {name}")
