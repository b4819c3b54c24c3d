"""A ledger of runs: `python -m foldtune.runs [RUNS_DIR] [--sort oof] [--diff A B]`.

Every run folder under RUNS_DIR, oldest first (or best OOF first with --sort oof),
with its start date, backbone, OOF MCRMSE, fold scores and the config keys that
differ from the run started before it. A folder without scores.json is listed as
unfinished (with its finished folds); one whose config cannot be read, as broken.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from foldtune.commands import prog_of, warn_deprecated
from foldtune.config import Config, ConfigError, config_diff, load_config

# Keys that differ between any two runs by design: not worth listing.
IGNORED_KEYS = ("output.name", "output.dir")


@dataclass
class RunEntry:
    path: Path
    started: str = ""
    config: Config | None = None
    oof: float | None = None
    folds: dict[int, float] = field(default_factory=dict)
    status: str = "finished"
    changes: list[tuple[str, Any, Any]] = field(default_factory=list)

    @property
    def backbone(self) -> str:
        return self.config.model.name if self.config is not None else "?"


def read_run(path: Path) -> RunEntry:
    """What a run folder says about itself; never raises for a broken folder."""
    entry = RunEntry(path)
    try:
        entry.started = json.loads((path / "run.json").read_text(encoding="utf-8"))["started"]
    except (OSError, ValueError, KeyError, TypeError):
        entry.started = ""
    try:
        entry.config = load_config(path / "config.yaml")
    except (ConfigError, OSError, UnicodeDecodeError) as err:
        entry.status = f"broken: config.yaml unreadable ({str(err).splitlines()[0][:80]})"
        return entry
    try:
        scores = json.loads((path / "scores.json").read_text(encoding="utf-8"))
        entry.oof = float(scores["oof"]["mcrmse"])
        entry.folds = {int(f): float(rep["mcrmse"]) for f, rep in scores["folds"].items()}
    except (OSError, ValueError, KeyError, TypeError):
        entry.oof = None
        done = sorted(int(p.parent.name.split("_")[1]) for p in path.glob("fold_*/result.json"))
        entry.status = f"unfinished ({len(done)}/{entry.config.folds.n_splits} folds done)"
    return entry


def list_runs(runs_dir: str | Path = "runs") -> list[RunEntry]:
    """Every run folder (one holding config.yaml or run.json) in start order, each with its
    config changes against the previous run that has a readable config."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise FileNotFoundError(f"no runs folder {runs_dir}")
    folders = [p for p in runs_dir.iterdir()
               if p.is_dir() and ((p / "config.yaml").exists() or (p / "run.json").exists())]
    entries = sorted((read_run(p) for p in folders), key=lambda e: (e.started, e.path.name))
    previous = None
    for entry in entries:
        if entry.config is None:
            continue
        if previous is not None:
            entry.changes = [c for c in config_diff(previous, entry.config) if c[0] not in IGNORED_KEYS]
        previous = entry.config
    return entries


def sort_runs(entries: list[RunEntry], key: str) -> list[RunEntry]:
    """'date' keeps the start order; 'oof' ranks by OOF MCRMSE, best first, unfinished last."""
    if key == "oof":
        return sorted(entries, key=lambda e: (e.oof is None, e.oof if e.oof is not None else math.inf))
    return list(entries)


def format_changes(changes: Sequence[tuple[str, Any, Any]]) -> str:
    return ", ".join(f"{key}={new!r} (was {old!r})" for key, old, new in changes)


def format_ledger(entries: Sequence[RunEntry]) -> str:
    header = ["run", "started", "backbone", "OOF", "folds", "changed from the previous run"]
    rows = []
    for e in entries:
        oof = f"{e.oof:.4f}" if e.oof is not None else e.status
        folds = " ".join(f"{f}:{s:.4f}" for f, s in sorted(e.folds.items())) or "-"
        rows.append([e.path.name, e.started.replace("T", " ") or "?", e.backbone, oof, folds,
                     format_changes(e.changes) or "-"])
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def _resolve(name: str, runs_dir: Path) -> Path:
    """A run given as a path, or as a folder name under runs_dir."""
    path = Path(name)
    return path if (path / "config.yaml").is_file() or not (runs_dir / name).is_dir() else runs_dir / name


def diff_runs(a: str | Path, b: str | Path) -> list[tuple[str, Any, Any]]:
    """Config keys whose values differ between runs a and b (output keys included)."""
    return config_diff(load_config(Path(a) / "config.yaml"), load_config(Path(b) / "config.yaml"))


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog or prog_of("runs"),
                                     description="List the runs of a folder: date, backbone, OOF MCRMSE, fold "
                                                 "scores and the config keys changed since the previous run.")
    parser.add_argument("--runs-dir", help="folder of run folders (default: runs)")
    parser.add_argument("positional", nargs="?", help=argparse.SUPPRESS)   # RUNS_DIR: before --runs-dir
    parser.add_argument("--sort", choices=["date", "oof"], default="date",
                        help="date: oldest first; oof: best OOF MCRMSE first (default: %(default)s)")
    parser.add_argument("--diff", nargs=2, metavar=("A", "B"), help="print the config differences of two runs "
                                                                    "(paths, or names under RUNS_DIR)")
    args = parser.parse_intermixed_args(argv)
    if args.positional is not None:
        if args.runs_dir is not None:
            parser.error(f"unrecognized arguments: {args.positional} (the folder is --runs-dir {args.runs_dir})")
        warn_deprecated(parser.prog, [args.positional], ["--runs-dir", args.positional])
        args.runs_dir = args.positional
    runs_dir = Path(args.runs_dir or "runs")
    try:
        if args.diff:
            a, b = (_resolve(name, runs_dir) for name in args.diff)
            changes = diff_runs(a, b)
            print(f"{a} -> {b}: " + (f"{len(changes)} key(s) differ" if changes else "same config"))
            for key, old, new in changes:
                print(f"  {key}: {old!r} -> {new!r}")
            return 0
        entries = list_runs(runs_dir)
    except (ConfigError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not entries:
        print(f"no run folders under {runs_dir}")
        return 0
    print(format_ledger(sort_runs(entries, args.sort)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
