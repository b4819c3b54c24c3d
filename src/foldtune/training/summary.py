"""The end of a run: its OOF predictions, scores.json and the table of scores in the log.

With training.seeds a fold's prediction of a row is the mean of its seeds' models'
(written to fold_k/oof.csv as well), and each seed is scored too: its models' own
predictions over every fold.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from foldtune.config import Config
from foldtune.files import atomic_write_csv, atomic_write_json
from foldtune.metrics import score_report
from foldtune.run_layout import OOF_FILE, SCORES_FILE, FoldResult, FoldSeed, fold_dir, fold_seeds, oof_frame

log = logging.getLogger("foldtune")


def seed_average(predictions: Sequence[np.ndarray]) -> np.ndarray:
    """The mean of a fold's seeds' predictions (summed in float64), as float32 like every
    prediction; one seed's come back unchanged."""
    return np.mean(np.stack(predictions), axis=0, dtype=np.float64).astype(np.float32)


def summarize(cfg: Config, run_dir: Path, frame: pd.DataFrame, fold_of: np.ndarray, targets: np.ndarray,
              results: dict[FoldSeed, FoldResult]) -> dict:
    names = list(cfg.data.target_columns)
    ids = frame[cfg.data.id_column].to_numpy()
    by_fold: dict[int, dict[FoldSeed, FoldResult]] = {}
    for unit, result in results.items():
        by_fold.setdefault(unit.fold, {})[unit] = result
    seeds = cfg.training.seeds
    scored = np.sort(np.concatenate([next(iter(units.values())).valid_index for units in by_fold.values()]))
    oof = np.full(targets.shape, np.nan, dtype=np.float32)
    baseline = np.full(targets.shape, np.nan, dtype=np.float32)
    fold_reports, fold_scores = {}, {}
    for fold, units in by_fold.items():
        rows = next(iter(units.values())).valid_index
        oof[rows] = seed_average([result.oof for result in units.values()])
        baseline[rows] = targets[fold_of != fold].mean(axis=0)
        seconds = sum(result.seconds for result in units.values())
        if seeds is None:
            (result,) = units.values()
            fold_reports[fold] = {"mcrmse": result.score, "per_target": result.per_target}
            fold_scores[str(fold)] = {**fold_reports[fold], "best_step": result.best_step, "seconds": round(seconds, 1)}
            continue
        # the trainer wrote each seed's OOF; the fold's is their average
        atomic_write_csv(fold_dir(run_dir, fold) / OOF_FILE, oof_frame(ids[rows], fold, oof[rows], names,
                                                                      cfg.data.id_column))
        fold_reports[fold] = score_report(targets[rows], oof[rows], names)
        fold_scores[str(fold)] = {**fold_reports[fold], "seconds": round(seconds, 1), "seeds": {
            str(unit.seed): {"mcrmse": r.score, "per_target": r.per_target, "best_step": r.best_step,
                             "seconds": round(r.seconds, 1)}
            for unit in fold_seeds([fold], seeds) for r in [units[unit]]}}     # in the config's order
    oof_report = score_report(targets[scored], oof[scored], names)
    baseline_score = score_report(targets[scored], baseline[scored], names)["mcrmse"]
    seed_reports = {} if seeds is None else {seed: _seed_report(seed, results, targets, scored, names)
                                             for seed in seeds}
    # training time of the folds (their own clocks, resumed sessions included): the same
    # however often the run is resumed afterwards
    seconds = sum(r.seconds for r in results.values())

    atomic_write_csv(run_dir / OOF_FILE, oof_frame(ids[scored], fold_of[scored], oof[scored], names,
                                                   cfg.data.id_column))
    scores = {
        "oof": oof_report,
        "folds": fold_scores,
        "mean_predictor_mcrmse": baseline_score,
        "n_rows": int(len(scored)),
        "seconds": round(seconds, 1),
    }
    if seed_reports:
        scores["seeds"] = {str(seed): report for seed, report in seed_reports.items()}
    atomic_write_json(run_dir / SCORES_FILE, scores)
    table = format_table(fold_reports, oof_report, baseline_score, names, seed_reports)
    models = f" x {len(seeds)} seed(s)" if seeds else ""
    log.info("run %s: %d fold(s)%s, %.0f s of training\n%s", run_dir, len(by_fold), models, seconds, table)
    return scores


def _seed_report(seed: int, results: dict[FoldSeed, FoldResult], targets: np.ndarray, scored: np.ndarray,
                 names: Sequence[str]) -> dict:
    """The OOF scores of one seed's models alone, over every fold."""
    oof = np.full(targets.shape, np.nan, dtype=np.float32)
    for unit, result in results.items():
        if unit.seed == seed:
            oof[result.valid_index] = result.oof
    return score_report(targets[scored], oof[scored], names)


def format_table(fold_reports: dict[int, dict], oof_report: dict, baseline: float, targets: Sequence[str],
                 seed_reports: dict[int, dict] | None = None) -> str:
    """A row per fold, per seed (its own OOF, with training.seeds) and the run's OOF."""
    header = ["fold"] + list(targets) + ["MCRMSE"]

    def row(name: str, report: dict) -> list[str]:
        return [name] + [f"{report['per_target'][t]:.4f}" for t in targets] + [f"{report['mcrmse']:.4f}"]

    rows = [row(str(fold), r) for fold, r in sorted(fold_reports.items())]
    rows += [row(f"OOF seed {seed}", r) for seed, r in (seed_reports or {}).items()]
    rows.append(row("OOF", oof_report))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) for c, w in zip(cells, widths))

    body = [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]
    body.append(f"(predicting the training folds' mean scores: OOF MCRMSE {baseline:.4f})")
    return "\n".join(body)
