"""The end of a run: its OOF predictions, scores.json and the table of scores in the log."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from foldtune.config import Config
from foldtune.files import atomic_write_csv, atomic_write_json
from foldtune.metrics import score_report
from foldtune.run_layout import OOF_FILE, SCORES_FILE, FoldResult, oof_frame

log = logging.getLogger("foldtune")


def summarize(cfg: Config, run_dir: Path, frame: pd.DataFrame, fold_of: np.ndarray, targets: np.ndarray,
              results: dict[int, FoldResult]) -> dict:
    names = list(cfg.data.target_columns)
    scored = np.concatenate([r.valid_index for r in results.values()])
    scored.sort()
    oof = np.full(targets.shape, np.nan, dtype=np.float32)
    baseline = np.full(targets.shape, np.nan, dtype=np.float32)
    for fold, result in results.items():
        oof[result.valid_index] = result.oof
        baseline[result.valid_index] = targets[fold_of != fold].mean(axis=0)
    oof_report = score_report(targets[scored], oof[scored], names)
    baseline_score = score_report(targets[scored], baseline[scored], names)["mcrmse"]
    fold_reports = {f: {"mcrmse": r.score, "per_target": r.per_target} for f, r in results.items()}
    # training time of the folds (their own clocks, resumed sessions included): the same
    # however often the run is resumed afterwards
    seconds = sum(r.seconds for r in results.values())

    atomic_write_csv(run_dir / OOF_FILE, oof_frame(frame[cfg.data.id_column].to_numpy()[scored], fold_of[scored],
                                                   oof[scored], names, cfg.data.id_column))
    scores = {
        "oof": oof_report,
        "folds": {str(f): {**rep, "best_step": results[f].best_step, "seconds": round(results[f].seconds, 1)}
                  for f, rep in fold_reports.items()},
        "mean_predictor_mcrmse": baseline_score,
        "n_rows": int(len(scored)),
        "seconds": round(seconds, 1),
    }
    atomic_write_json(run_dir / SCORES_FILE, scores)
    table = format_table(fold_reports, oof_report, baseline_score, names)
    log.info("run %s: %d fold(s), %.0f s of training\n%s", run_dir, len(results), seconds, table)
    return scores


def format_table(fold_reports: dict[int, dict], oof_report: dict, baseline: float, targets: Sequence[str]) -> str:
    header = ["fold"] + list(targets) + ["MCRMSE"]
    rows = [[str(fold)] + [f"{r['per_target'][t]:.4f}" for t in targets] + [f"{r['mcrmse']:.4f}"]
            for fold, r in sorted(fold_reports.items())]
    rows.append(["OOF"] + [f"{oof_report['per_target'][t]:.4f}" for t in targets] + [f"{oof_report['mcrmse']:.4f}"])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) for c, w in zip(cells, widths))

    body = [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]
    body.append(f"(predicting the training folds' mean scores: OOF MCRMSE {baseline:.4f})")
    return "\n".join(body)
