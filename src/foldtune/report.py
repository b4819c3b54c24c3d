"""A report a person can look at: `runs/X/report.md` and its plots.

    runs/<name>/
      report.md                  scores per fold and OOF, per target; the plots below
      plots/learning_curves.png  train loss and validation MCRMSE against the step, a line per fold
                                 (per fold and seed, in a run with training.seeds)
      plots/oof_vs_true.png      OOF prediction against the true score, a panel per target

Written at the end of every run (new or resumed); `foldtune report --run RUN_DIR`
writes it again. Plotting uses matplotlib's object API with the Agg canvas: no
display, no global backend switch.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from foldtune.commands import prog_of, runs_from_positionals
from foldtune.config import load_config
from foldtune.files import atomic_path, atomic_write_text

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger("foldtune")

REPORT_FILE = "report.md"
PLOTS_DIR = "plots"
CURVES_FILE = "learning_curves.png"
SCATTER_FILE = "oof_vs_true.png"


def scores_table(scores: dict, targets: Sequence[str]) -> str:
    """Markdown table: a row per fold and the OOF row, a column per target and MCRMSE. With
    training.seeds, a fold's row is its seeds' average, each seed's model follows it, and
    each seed's own OOF comes before the run's (the seeds' average)."""
    header = ["fold", *targets, "MCRMSE", "best step"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]

    def add(name: str, rep: dict, mcrmse: str = "{:.4f}") -> None:
        cells = [name, *(f"{rep['per_target'][t]:.4f}" for t in targets), mcrmse.format(rep["mcrmse"]),
                 str(rep.get("best_step", ""))]
        lines.append("| " + " | ".join(cells) + " |")

    for fold, rep in sorted(scores["folds"].items(), key=lambda kv: int(kv[0])):
        add(fold if "seeds" not in rep else f"{fold} (seeds averaged)", rep)
        for seed, seed_rep in rep.get("seeds", {}).items():
            add(f"{fold} seed {seed}", seed_rep)
    for seed, seed_rep in scores.get("seeds", {}).items():
        add(f"OOF seed {seed}", seed_rep)
    add("**OOF**" if "seeds" not in scores else "**OOF** (seeds averaged)", scores["oof"], "**{:.4f}**")
    return "\n".join(lines)


def _save_png(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        # zlib level 1: the encoding takes half the time of the default 6, for 20% more bytes
        fig.savefig(tmp, format="png", dpi=100, pil_kwargs={"compress_level": 1})
    return path


def preload_plotting() -> threading.Thread:
    """Import the plotting modules in a background thread, ahead of the report.

    Called once the last of the folds trained in threads is running: the import (0.7 s
    of a 20 s MiniLM run on the lent H100, where Python compiles matplotlib from source)
    then happens while they train, not after the last fold.
    """
    def load() -> None:
        try:
            for module in ("matplotlib.figure", "matplotlib.backends.backend_agg"):
                importlib.import_module(module)
        except Exception:  # noqa: BLE001 - the report says what is missing when it draws
            pass

    thread = threading.Thread(target=load, name="preload-plotting", daemon=True)
    thread.start()
    return thread


def plot_learning_curves(run_dir: Path, folds: Sequence[int], path: Path, seeds: Sequence[int] | None = None) -> Path:
    """Train loss and validation MCRMSE against the optimizer step, one line per fold (per
    fold and seed, with training.seeds)."""
    import pandas as pd
    from matplotlib.figure import Figure

    from foldtune.run_layout import fold_seeds

    fig = Figure(figsize=(11, 4))
    # Fixed margins: matplotlib's constrained layout measured every tick label and took
    # half of the time of drawing a report.
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.9, wspace=0.25)
    loss_ax, score_ax = fig.subplots(1, 2)
    for unit in fold_seeds(folds, seeds):
        metrics = pd.read_csv(unit.folder(run_dir) / "metrics.csv")
        loss_ax.plot(metrics["step"], metrics["train_loss"], marker=".", label=f"fold {unit}")
        score_ax.plot(metrics["step"], metrics["val_mcrmse"], marker=".", label=f"fold {unit}")
    loss_ax.set(title="train loss (mean since the previous evaluation)", xlabel="step", ylabel="loss")
    score_ax.set(title="validation MCRMSE", xlabel="step", ylabel="MCRMSE")
    for ax in (loss_ax, score_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    return _save_png(fig, path)


def plot_oof_vs_true(true: pd.DataFrame, pred: pd.DataFrame, targets: Sequence[str], path: Path) -> Path:
    """OOF prediction against the true score, one panel per target, with the diagonal."""
    from matplotlib.figure import Figure

    cols = min(3, len(targets))
    rows = math.ceil(len(targets) / cols)
    fig = Figure(figsize=(4 * cols, 3.6 * rows))
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.5 / (3.6 * rows), top=1 - 0.35 / (3.6 * rows),
                        wspace=0.3, hspace=0.42)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, target in zip(axes, targets):
        y, p = true[target].to_numpy(dtype=float), pred[target].to_numpy(dtype=float)
        rmse = float(np.sqrt(np.mean((y - p) ** 2)))
        ax.scatter(y, p, s=8, alpha=0.4)
        low, high = min(y.min(), p.min()), max(y.max(), p.max())
        ax.plot([low, high], [low, high], color="grey", linewidth=1)
        ax.set(title=f"{target} (RMSE {rmse:.4f})", xlabel="true", ylabel="OOF prediction")
        ax.grid(alpha=0.3)
    for ax in axes[len(targets):]:
        ax.set_visible(False)
    return _save_png(fig, path)


def _oof_with_truth(run_dir: Path, cfg) -> tuple[pd.DataFrame, pd.DataFrame]:
    """OOF predictions and the true targets of the same rows, in the same order."""
    from foldtune.data.validate import read_csv_text
    from foldtune.run_layout import read_run_csv

    id_column, targets = cfg.data.id_column, list(cfg.data.target_columns)
    oof = read_run_csv(run_dir / "oof.csv", id_column)
    train = read_csv_text(cfg.data.train_file)
    train[id_column] = train[id_column].str.strip()        # as training read them (data/validate.py)
    merged = oof.merge(train[[id_column, *targets]], on=id_column, suffixes=("", "_true"), validate="one_to_one")
    if len(merged) != len(oof):
        raise ValueError(f"{cfg.data.train_file} lacks {len(oof) - len(merged)} of the OOF ids")
    true = merged[[f"{t}_true" for t in targets]].set_axis(targets, axis=1)
    return true, merged[targets]


def _seeds_line(scores: dict) -> str:
    """' (the mean of seeds 42, 7: each alone 0.4567, 0.4612)' for a run with training.seeds."""
    seeds = scores.get("seeds")
    if not seeds:
        return ""
    alone = ", ".join(f"{rep['mcrmse']:.4f}" for rep in seeds.values())
    return f" (the mean of seeds {', '.join(seeds)}: each alone {alone})"


def write_report(run_dir: str | Path) -> Path:
    """report.md and its plots for a finished run (scores.json, oof.csv, fold metrics).

    A plot that cannot be drawn (say, the train file has moved) is named in the report
    and the log; the tables are written regardless.
    """
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    scores = json.loads((run_dir / "scores.json").read_text(encoding="utf-8"))
    run_info = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    targets = list(cfg.data.target_columns)
    folds = sorted(int(f) for f in scores["folds"])

    lines = [
        f"# {run_dir.name}",
        "",
        f"- started: {run_info.get('started', '?')}; device: {run_info.get('device', '?')}; "
        f"foldtune {run_info.get('foldtune', '?')}, torch {run_info.get('torch', '?')}, "
        f"transformers {run_info.get('transformers', '?')}",
        f"- backbone: `{cfg.model.name}`, pooling {cfg.model.pooling}, max_len {cfg.data.max_len}, "
        f"{cfg.training.epochs} epoch(s), lr {cfg.training.lr:g}, batch {cfg.training.batch_size}",
        f"- train file: `{cfg.data.train_file}` ({scores['n_rows']} rows scored out of fold), "
        f"{cfg.folds.n_splits} folds, {scores['seconds']:.0f} s of training",
        "",
        "## Scores (RMSE per target, MCRMSE)",
        "",
        scores_table(scores, targets),
        "",
        f"OOF MCRMSE **{scores['oof']['mcrmse']:.4f}**{_seeds_line(scores)}; predicting the training folds' mean scores: "
        f"{scores['mean_predictor_mcrmse']:.4f}.",
        "",
        "## Plots",
        "",
    ]
    plots_dir = run_dir / PLOTS_DIR
    plots = [
        ("Learning curves", CURVES_FILE, lambda path: plot_learning_curves(run_dir, folds, path,
                                                                           cfg.training.seeds)),
        ("OOF prediction against the true score", SCATTER_FILE,
         lambda path: plot_oof_vs_true(*_oof_with_truth(run_dir, cfg), targets, path)),
    ]
    for title, name, draw in plots:
        try:
            draw(plots_dir / name)
            lines += [f"### {title}", "", f"![{title}]({PLOTS_DIR}/{name})", ""]
        except Exception as err:  # a plot is a convenience: never lose the report for it
            log.warning("report of %s: could not draw %s (%s: %s)", run_dir, name, type(err).__name__, err)
            lines += [f"### {title}", "", f"(not drawn: {type(err).__name__}: {err})", ""]
    path = run_dir / REPORT_FILE
    atomic_write_text(path, "\n".join(lines))
    return path


def write_report_or_warn(run_dir: str | Path) -> Path | None:
    """write_report, with any failure logged as a warning: the run's results stay as they are."""
    try:
        path = write_report(run_dir)
    except Exception as err:
        log.warning("could not write the report of %s (%s: %s); the scores and checkpoints are unaffected. "
                    "Retry with: foldtune report --run %s", run_dir, type(err).__name__, err, run_dir)
        return None
    log.info("report: %s", path)
    return path


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog or prog_of("report"),
                                     description="Write report.md and its plots for a finished run.")
    parser.add_argument("--run", action="append",
                        help="run folder, e.g. runs/ellipse_minilm-20261125-101500; repeat to report on each")
    parser.add_argument("positional", nargs="*", help=argparse.SUPPRESS)   # RUN_DIR: before --run
    args = parser.parse_intermixed_args(argv)
    runs_from_positionals(parser, args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    failed = 0
    for run_dir in args.run:
        try:
            print(write_report(run_dir))
        except (OSError, ValueError, KeyError) as err:
            print(f"error: {run_dir} has no finished run to report on ({type(err).__name__}: {err})",
                  file=sys.stderr)
            failed += 1
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
