"""Pseudo-labels fold by fold: extra training texts scored by a teacher that never saw the fold.

    pseudo:
      teacher: runs/w128          # a run folder, or a blend.json of runs
      file: ../shared/data/ellipse/test.csv

Fold k of the run trains on its own rows plus every text of pseudo.file, whose targets
are the predictions of the teacher's models of fold k (a blend: each member's fold-k
model, blended with the weights fitted on the other folds' OOF, as distillation does).
Those models were trained on the other folds only, so nothing of fold k's scores reaches
its training rows: the fold's validation score stays held out and the run's OOF is as
honest as any run's, fit to join a blend or a stack. That is why the teacher's folds must
be this run's folds, row by row; a teacher on other folds is refused before training.

The targets are computed once, when the run starts, and written to the run folder
(pseudo_labels.csv: id, fold, targets); a resumed run reads them back, so it needs
neither the teacher nor a GPU for them again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from foldtune.config import Config, ConfigError, path_problem
from foldtune.files import atomic_write_csv

log = logging.getLogger("foldtune")

PSEUDO_FILE = "pseudo_labels.csv"


@dataclass
class PseudoLabels:
    """The texts of pseudo.file and, for each fold, the targets they train with."""

    ids: list[str]
    texts: list[str]
    targets: dict[int, np.ndarray]      # fold -> (texts, targets)

    def __len__(self) -> int:
        return len(self.ids)


def _texts(cfg: Config) -> tuple[list[str], list[str]]:
    from foldtune.data.validate import load_test

    problem = path_problem(cfg.pseudo.file, "a CSV file")
    if problem is not None:
        raise ConfigError(f"pseudo.file: {problem}")
    frame = load_test(cfg.pseudo.file, cfg.data)
    return frame[cfg.data.id_column].astype(str).tolist(), frame[cfg.data.text_column].astype(str).tolist()


def check_teacher_folds(cfg: Config, teacher, frame: pd.DataFrame, fold_of: np.ndarray) -> None:
    """The teacher's rows and folds are this run's, row by row; else a ConfigError naming the first difference."""
    if list(cfg.data.target_columns) != list(teacher.target_columns):
        raise ConfigError(f"pseudo.teacher {teacher.source} predicts {teacher.target_columns}; this run's "
                          f"data.target_columns are {list(cfg.data.target_columns)}")
    ids = frame[cfg.data.id_column].astype(str).tolist()
    teacher_fold = dict(zip(map(str, teacher.ids), teacher.fold_of.tolist()))
    for row, (text_id, fold) in enumerate(zip(ids, fold_of.tolist())):
        if text_id not in teacher_fold:
            raise ConfigError(f"pseudo.teacher {teacher.source} was not trained on the rows of {cfg.data.train_file}: "
                              f"id {text_id} (row {row + 2} of the file) is not in its OOF")
        if teacher_fold[text_id] != fold:
            raise ConfigError(
                f"pseudo.teacher {teacher.source} has id {text_id} (row {row + 2} of {cfg.data.train_file}) in "
                f"its fold {teacher_fold[text_id]}, this run in fold {fold}: its fold models would score the "
                "pseudo-labels of a fold with a model that saw that fold's essays. Train with the teacher's "
                "folds (its folds.n_splits, folds.seed, folds.column)")
    if len(teacher_fold) != len(ids):
        raise ConfigError(f"pseudo.teacher {teacher.source} was trained on {len(teacher_fold)} rows, "
                          f"{cfg.data.train_file} holds {len(ids)}: train with the teacher's rows")


def check_pseudo(cfg: Config, frame: pd.DataFrame, fold_of: np.ndarray):
    """(the teacher, pseudo.file's ids and texts), after checking that the teacher was trained
    on these rows and folds and that no text of pseudo.file is a training essay."""
    from foldtune.distill import load_teacher
    from foldtune.inference import fold_checkpoints

    teacher = load_teacher(cfg.pseudo.teacher, "pseudo.teacher")
    check_teacher_folds(cfg, teacher, frame, fold_of)
    for run in teacher.runs:        # a teacher still training fails now, naming its unfinished folds
        fold_checkpoints(run, False, sorted(set(fold_of.tolist())))
    ids, texts = _texts(cfg)
    overlap = sorted(set(ids) & set(frame[cfg.data.id_column].astype(str)))
    if overlap:
        raise ConfigError(f"pseudo.file {cfg.pseudo.file} holds id {overlap[0]} of {cfg.data.train_file} "
                          f"({len(overlap)} such): a training essay would train again with the teacher's score")
    return teacher, ids, texts


def make_pseudo_labels(cfg: Config, run_dir: Path, frame: pd.DataFrame, fold_of: np.ndarray) -> PseudoLabels:
    """Score pseudo.file with the teacher's model of each fold; write pseudo_labels.csv."""
    teacher, ids, texts = check_pseudo(cfg, frame, fold_of)
    targets = {}
    for fold in sorted(set(fold_of.tolist())):
        targets[fold] = np.asarray(teacher.predict(texts, fold, cfg.training.device), dtype=np.float32)
    log.info("pseudo-labels: %d texts of %s, each fold's scored by the models of that fold of %s", len(ids),
             cfg.pseudo.file, teacher.source)
    names = list(cfg.data.target_columns)
    table = pd.concat([pd.DataFrame({cfg.data.id_column: ids, "fold": fold, **dict(zip(names, preds.T))})
                       for fold, preds in targets.items()], ignore_index=True)
    atomic_write_csv(run_dir / PSEUDO_FILE, table)
    return PseudoLabels(ids, texts, targets)


def read_pseudo_labels(cfg: Config, run_dir: Path) -> PseudoLabels:
    """The pseudo-labels a run wrote when it started, with their texts read again from pseudo.file."""
    from foldtune.run_layout import read_run_csv

    table = read_run_csv(run_dir / PSEUDO_FILE, cfg.data.id_column)
    ids, texts = _texts(cfg)
    names = list(cfg.data.target_columns)
    targets = {}
    for fold, rows in table.groupby("fold", sort=True):
        if rows[cfg.data.id_column].astype(str).tolist() != ids:
            raise ConfigError(f"{cfg.pseudo.file} no longer holds the texts of {run_dir / PSEUDO_FILE} (fold {fold}): "
                              "it changed after the run started; restore it or train a new run")
        targets[int(fold)] = rows[names].to_numpy(dtype=np.float32)
    return PseudoLabels(ids, texts, targets)


def pseudo_labels_of_run(cfg: Config, run_dir: Path, frame: pd.DataFrame, fold_of: np.ndarray) -> PseudoLabels | None:
    """None without pseudo.teacher; the run folder's pseudo-labels if it has them (a resume), else new ones."""
    if cfg.pseudo.teacher is None:
        return None
    if (Path(run_dir) / PSEUDO_FILE).is_file():
        return read_pseudo_labels(cfg, Path(run_dir))
    return make_pseudo_labels(cfg, Path(run_dir), frame, fold_of)
