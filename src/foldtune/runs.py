"""A ledger of runs: `python -m foldtune.runs [RUNS_DIR] [--sort oof] [--diff A B]`.

The run folders under RUNS_DIR, grouped by data set and targets (the train file's
SHA-256 that run.json records, and data.target_columns): scores of different data do
not compare. The group with the latest run comes last. In a group the runs come oldest
first (--sort oof: finished runs best OOF first, then the others oldest first), each with
its start, backbone, OOF MCRMSE or status, the range of its fold scores, and the config
keys that differ from the run of the same group started before it. Every line fits
LINE_WIDTH characters: a longer value is cut, ending in CUT.

A run's status, read from its folder:
  finished     scores.json holds its OOF MCRMSE (shown in its place)
  training     a process that still runs holds its lock (.foldtune.lock, run_lock.py) to
               train or resume it
  unfinished   a fold began (a fold_k/ folder exists) and the run has no scores.json: it
               stopped or crashed; shown as `unfinished d/n`, d folds finished (their
               fold_k/result.json; with training.seeds, every seed's) of the n it was
               asked to train (run.json)
  pruned       a trial of `foldtune search` that its pruner stopped after a fold worse
               than the median (pruned.json); shown as `pruned d/n`, as unfinished
  failed       no fold began (no fold_k/ folder): it stopped while it started
  broken       its config.yaml cannot be read
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from foldtune.commands import prog_of, warn_deprecated
from foldtune.config import Config, ConfigError, config_diff, load_config
from foldtune.run_layout import PRUNED_FILE, RESULT_FILE
from foldtune.run_lock import live_holder

# Keys that differ between any two runs by design: not worth listing.
IGNORED_KEYS = ("output.name", "output.dir")
LINE_WIDTH = 120
CUT = "…"                   # ends a value cut to fit
# The most a column takes; "changed from the previous run" takes the rest of the line.
COLUMN_LIMITS = {"run": 32, "started": 11, "backbone": 18, "OOF": 16, "fold range": 11}
VALUE_LIMIT = 24            # a config value in the changes column
COLUMN_GAP = "  "


@dataclass
class RunEntry:
    path: Path
    started: str = ""
    config: Config | None = None
    train_sha256: str | None = None       # of the train file, as run.json recorded it
    oof: float | None = None
    folds: dict[int, float] = field(default_factory=dict)    # MCRMSE of each finished fold
    folds_asked: int = 0
    status: str = "finished"              # finished, training, unfinished, pruned, failed or broken
    problem: str = ""                     # why a broken run is broken
    changes: list[tuple[str, Any, Any]] = field(default_factory=list)

    @property
    def backbone(self) -> str:
        """The backbone's last name part (the hub organisation and local folders left out)."""
        if self.config is None:
            return "?"
        if self.config.model.type != "transformer":
            return self.config.model.type
        return Path(self.config.model.name).name or self.config.model.name

    @property
    def data_set(self) -> tuple[str | None, tuple[str, ...]] | None:
        """What the run was trained on: (train file SHA-256, targets); None if unknown (broken)."""
        if self.config is None:
            return None
        return self.train_sha256, tuple(self.config.data.target_columns)

    @property
    def score_or_status(self) -> str:
        if self.status == "finished":
            return f"{self.oof:.4f}"
        if self.status in ("unfinished", "pruned"):
            return f"{self.status} {len(self.folds)}/{self.folds_asked}"
        return self.status


def read_run(path: Path) -> RunEntry:
    """What a run folder says about itself; never raises for a broken folder."""
    entry = RunEntry(path)
    try:
        run_info = json.loads((path / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        run_info = {}
    run_info = run_info if isinstance(run_info, dict) else {}
    entry.started = run_info.get("started") if isinstance(run_info.get("started"), str) else ""
    entry.train_sha256 = run_info.get("train_file_sha256") or None
    try:
        entry.config = load_config(path / "config.yaml")
    except (ConfigError, OSError, UnicodeDecodeError) as err:
        entry.status, entry.problem = "broken", f"config.yaml unreadable: {str(err).splitlines()[0]}"
        return entry
    asked = run_info.get("folds")
    entry.folds_asked = len(asked) if isinstance(asked, list) else entry.config.folds.n_splits
    holder = live_holder(path)
    try:
        scores = json.loads((path / "scores.json").read_text(encoding="utf-8"))
        entry.oof = float(scores["oof"]["mcrmse"])
        entry.folds = {int(f): float(rep["mcrmse"]) for f, rep in scores["folds"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        entry.oof = None
        entry.folds = _finished_fold_scores(path, entry.config.training.seeds if entry.config else None)
        entry.status = ("pruned" if (path / PRUNED_FILE).is_file() else "unfinished") if _fold_folders(path) \
            else "failed"
    if holder is not None and holder.get("purpose") in ("training", "resume"):
        entry.status = "training"
    return entry


def _fold_folders(path: Path) -> list[Path]:
    """The fold_k folders: the trainer makes fold_k/ when it begins fold k."""
    return [p for p in path.glob("fold_*") if p.is_dir() and p.name[len("fold_"):].isdigit()]


def _finished_fold_scores(path: Path, seeds: Sequence[int] | None = None) -> dict[int, float]:
    """MCRMSE of each fold whose fold_k/result.json can be read. With training.seeds, a
    fold has finished when every seed's fold_k/seed_<s>/result.json can be read; its score
    here is the mean of its seeds' (the score of their averaged predictions comes with
    scores.json, when the run ends)."""
    scores = {}
    for folder in _fold_folders(path):
        results = [folder / RESULT_FILE] if not seeds else [folder / f"seed_{seed}" / RESULT_FILE for seed in seeds]
        try:
            seed_scores = [float(json.loads(result.read_text(encoding="utf-8"))["mcrmse"]) for result in results]
            scores[int(folder.name[len("fold_"):])] = sum(seed_scores) / len(seed_scores)
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return dict(sorted(scores.items()))


def list_runs(runs_dir: str | Path = "runs") -> list[RunEntry]:
    """Every run folder (one holding config.yaml or run.json) in start order, each with its
    config changes against the run of the same data set and targets started before it."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise FileNotFoundError(f"no runs folder {runs_dir}")
    folders = [p for p in runs_dir.iterdir()
               if p.is_dir() and ((p / "config.yaml").exists() or (p / "run.json").exists())]
    entries = sorted((read_run(p) for p in folders), key=lambda e: (e.started, e.path.name))
    previous: dict[tuple, Config] = {}
    for entry in entries:
        if entry.config is None:
            continue
        before = previous.get(entry.data_set)
        if before is not None:
            entry.changes = [c for c in config_diff(before, entry.config) if c[0] not in IGNORED_KEYS]
        previous[entry.data_set] = entry.config
    return entries


def sort_runs(entries: list[RunEntry], key: str) -> list[RunEntry]:
    """'date' keeps the start order; 'oof' ranks the finished runs by OOF MCRMSE, best
    first, and keeps the others after them in start order."""
    if key == "oof":
        return sorted(entries, key=lambda e: (e.oof is None, e.oof if e.oof is not None else math.inf))
    return list(entries)


def group_runs(entries: Sequence[RunEntry]) -> list[list[RunEntry]]:
    """The runs of each data set and targets, in start order; the group with the latest
    run comes last, and the broken runs (data unknown) after all."""
    groups: dict[Any, list[RunEntry]] = {}
    for entry in sorted(entries, key=lambda e: (e.started, e.path.name)):
        groups.setdefault(entry.data_set, []).append(entry)
    known = sorted((g for key, g in groups.items() if key is not None),
                   key=lambda g: (g[-1].started, g[-1].path.name))
    return known + ([groups[None]] if None in groups else [])


def cut(text: str, width: int) -> str:
    """text, or its start and CUT when it is longer than width."""
    return text if len(text) <= width else text[:max(width - len(CUT), 0)] + CUT


def cut_middle(text: str, width: int) -> str:
    """text, or its start, CUT and its end when it is longer than width: a run name keeps
    the time that ends a default name (config-YYYYmmdd-HHMMSS), which tells runs apart."""
    if len(text) <= width:
        return text
    head = (width - len(CUT)) // 2
    return text[:head] + CUT + text[len(text) - (width - len(CUT) - head):]


def _value(value: Any) -> str:
    return value if isinstance(value, str) and value else repr(value)


def format_changes(changes: Sequence[tuple[str, Any, Any]]) -> str:
    """`training.lr 0.0001->0.0003, ...`: each key with its value before and now."""
    return ", ".join(f"{key} {cut(_value(old), VALUE_LIMIT)}->{cut(_value(new), VALUE_LIMIT)}"
                     for key, old, new in changes)


def group_title(group: Sequence[RunEntry]) -> str:
    """`data set train.csv (sha256 1a2b3c4d), targets a, b`, named by the group's latest run."""
    latest = group[-1]
    if latest.config is None:
        return "config.yaml unreadable: data set and targets unknown"
    sha = f"sha256 {latest.train_sha256[:8]}" if latest.train_sha256 else "sha256 not recorded"
    return (f"data set {Path(latest.config.data.train_file).name} ({sha}), "
            f"targets {', '.join(latest.config.data.target_columns)}")


def _row(e: RunEntry) -> list[str]:
    scores = sorted(e.folds.values())
    spread = "-" if not scores else f"{scores[0]:.3f}" if len(scores) == 1 else f"{scores[0]:.3f}-{scores[-1]:.3f}"
    last = e.problem if e.status == "broken" else format_changes(e.changes) or "-"
    # month, day and time: the year is the same in a competition (the order uses the whole start)
    started = e.started.replace("T", " ")[5:16] or "?"
    return [e.path.name, started, e.backbone, e.score_or_status, spread, last]


def format_ledger(entries: Sequence[RunEntry], sort: str = "date") -> str:
    """The ledger's lines: a title, then per group (group_runs) its title, the column
    header and a row per run (sort_runs); a blank line before each group."""
    header = [*COLUMN_LIMITS, "changed from the previous run"]
    groups = [[_row(e) for e in sort_runs(group, sort)] + [group_title(group)] for group in group_runs(entries)]
    rows = [row for group in groups for row in group[:-1]]
    widths = [min(max([len(h), *(len(r[i]) for r in rows)]), limit)
              for i, (h, limit) in enumerate(COLUMN_LIMITS.items())]
    widths.append(LINE_WIDTH - sum(widths) - len(COLUMN_GAP) * len(widths))

    def line(cells: Sequence[str]) -> str:
        name, *others = cells
        return COLUMN_GAP.join([cut_middle(name, widths[0]).ljust(widths[0]),
                                *(cut(c, w).ljust(w) for c, w in zip(others, widths[1:]))]).rstrip()

    order = "best OOF first" if sort == "oof" else "oldest first"
    lines = [cut(f"{len(rows)} run(s), grouped by data set and targets; {order} in a group; changes: from the "
                 "group's run started before", LINE_WIDTH)]
    for *group_rows, title in groups:
        lines += ["", cut(title, LINE_WIDTH), line(header), *(line(row) for row in group_rows)]
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
                                     description="List the runs of a folder, grouped by data set and targets: start, "
                                                 "backbone, OOF MCRMSE or status (training, unfinished, pruned, failed, "
                                                 "broken), fold score range, and the config keys changed since the "
                                                 "group's run started before.")
    parser.add_argument("--runs-dir", help="folder of run folders (default: runs)")
    parser.add_argument("positional", nargs="?", help=argparse.SUPPRESS)   # RUNS_DIR: before --runs-dir
    parser.add_argument("--sort", choices=["date", "oof"], default="date",
                        help="order in each group; date: oldest first; oof: finished runs by OOF MCRMSE, best first, "
                             "then the others oldest first (default: %(default)s)")
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
    try:
        print(format_ledger(entries, args.sort), flush=True)
    except BrokenPipeError:
        # the reader has gone (foldtune runs | head): what it wanted is read; nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
