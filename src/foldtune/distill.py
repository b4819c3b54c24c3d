"""Distillation: one student model trained with targets mixed from the true scores and a
teacher's predictions (a blend file or one run), so one forward pass does the work of
an ensemble's K x members.

    student target = alpha * true + (1 - alpha) * teacher

How the student is scored honestly (distill.holdout_fold = h, the default h = 0): the
folds are the teacher's (every member run shares them). The student trains on the
essays of every fold but h; the essays of fold h are its validation rows and its
score. With distill.holdout_targets = fold_models (the default) the teacher
predictions of the student's training essays come from the members' fold-h models,
which were trained on exactly those essays and never saw fold h, blended with the
weights fitted on the other folds' OOF (the honest blend's weights for fold h). So
neither the student nor any model that made its targets saw an essay or a score of
fold h. The teacher is scored on the same essays: its fold-h OOF blended with the same
weights, which is the honest blend restricted to fold h. (holdout_targets = oof uses
the teachers' OOF instead: the fold models behind it trained on fold h, so the score
leaks, and the run says so.) As for every fold of a run, the student's best checkpoint
is chosen on those validation rows.

With distill.holdout_fold = null the student trains on every essay with the teacher's
OOF predictions: the model to ship, with no held-out score (its validation rows are its
training rows, scored in-sample). Pseudo-labelled texts (distill.pseudo_label_file) get
the teacher's predictions as targets.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from foldtune.config import Config, ConfigError, load_config
from foldtune.files import atomic_write_csv, atomic_write_json
from foldtune.metrics import score_report

log = logging.getLogger("foldtune")

TARGETS_FILE = "student_targets.csv"


@dataclass
class Teacher:
    """The runs of a blend (or one run) and how their predictions are combined."""

    source: Path
    runs: list[Path]
    weights: np.ndarray                     # (targets, members): the blend's, fitted on every OOF row
    fold_weights: dict[int, np.ndarray]     # fold k -> weights fitted on the other folds' OOF rows
    target_columns: list[str]
    ids: list[str]
    fold_of: np.ndarray
    oof: np.ndarray                         # (members, rows, targets), rows in `ids` order

    def blend(self, preds: np.ndarray, fold: int | None = None) -> np.ndarray:
        from foldtune.blend import apply_weights

        return apply_weights(preds, self.weights if fold is None else self.fold_weights[fold])

    def blended_oof(self) -> np.ndarray:
        return self.blend(self.oof)

    def predict(self, texts: Sequence[str], fold: int | None = None, device: str = "auto") -> np.ndarray:
        """The teacher on new texts: every member's fold average (fold None) or only its
        model of `fold`, blended with the weights that go with it."""
        from foldtune.inference import predict_run

        preds = [predict_run(run, texts, load_config(run / "config.yaml").training.eval_batch_size, device,
                             folds=None if fold is None else [fold])[0] for run in self.runs]
        return self.blend(np.stack(preds).astype(np.float64), fold)


def load_teacher(path: str | Path, key: str = "distill.teacher") -> Teacher:
    """A blend file, or a run folder (a blend of one with weight one); `key` names it in errors."""
    from foldtune.blend import aligned_oof, blend_weights, load_member, read_blend

    path = Path(path)
    if path.is_dir():
        member = load_member(path)
        targets = list(member.cfg.data.target_columns)
        ids = member.oof[member.cfg.data.id_column].tolist()
        fold_of = member.oof["fold"].to_numpy(dtype=np.int64)
        oof = member.oof[targets].to_numpy(dtype=np.float64)[None]
        ones = np.ones((len(targets), 1))
        return Teacher(path, [path], ones, {int(k): ones for k in np.unique(fold_of)}, targets, ids, fold_of, oof)
    if not path.is_file():
        what = "is neither a run folder nor a blend file" if path.exists() else "does not exist"
        raise ConfigError(f"{key}: {path.resolve()} {what}")
    blend, runs = read_blend(path)
    members = [load_member(r) for r in runs]
    ids, fold_of, oof = aligned_oof(members)
    targets = blend["target_columns"]
    fold_weights = {int(k): np.array([w[t] for t in targets]) for k, w in blend["fold_weights"].items()}
    return Teacher(path, runs, blend_weights(blend), fold_weights, targets, ids, fold_of, oof)


def mixed_targets(true: np.ndarray, teacher: np.ndarray, alpha: float) -> np.ndarray:
    return alpha * np.asarray(true, dtype=np.float64) + (1 - alpha) * np.asarray(teacher, dtype=np.float64)


@dataclass
class StudentRows:
    """What the student trains and is scored on; indices are rows of the train frame."""

    train_index: np.ndarray
    train_targets: np.ndarray
    valid_index: np.ndarray
    fold: int                                 # the held-out fold, or 0 with no holdout
    holdout: bool
    fold_of: np.ndarray                       # the teacher's fold of every frame row


def student_rows(cfg: Config, teacher: Teacher, frame: pd.DataFrame, device: str = "auto") -> StudentRows:
    """The student's training rows with their mixed targets, and its scored rows."""
    d = cfg.distill
    targets = list(cfg.data.target_columns)
    if targets != teacher.target_columns:
        raise ConfigError(f"the teacher {teacher.source} predicts {teacher.target_columns}, the config's "
                          f"data.target_columns are {targets}")
    ids = frame[cfg.data.id_column].tolist()
    if sorted(ids) != sorted(teacher.ids):
        unknown = sorted(set(ids) ^ set(teacher.ids))[0]
        raise ConfigError(f"{cfg.data.train_file} and the teacher's OOF ({teacher.source}) hold different rows "
                          f"(id {unknown} is in one only): distil on the essays the teacher was trained on")
    row_of = {i: r for r, i in enumerate(teacher.ids)}
    order = np.array([row_of[i] for i in ids])          # teacher row of each frame row
    fold_of = teacher.fold_of[order]
    true = frame[targets].to_numpy(dtype=np.float64)
    if d.holdout_fold is None:
        train_index = np.arange(len(frame))
        teacher_preds = teacher.blended_oof()[order]
        return StudentRows(train_index, mixed_targets(true, teacher_preds, d.alpha), train_index, 0, False, fold_of)
    if d.holdout_fold not in set(fold_of.tolist()):
        raise ConfigError(f"distill.holdout_fold={d.holdout_fold}: the teacher's folds are "
                          f"{sorted(set(fold_of.tolist()))}")
    train_index = np.flatnonzero(fold_of != d.holdout_fold)
    valid_index = np.flatnonzero(fold_of == d.holdout_fold)
    if d.holdout_targets == "fold_models":
        texts = frame[cfg.data.text_column].to_numpy(dtype=object)[train_index].tolist()
        teacher_preds = teacher.predict(texts, d.holdout_fold, device)
    else:
        log.warning("distill.holdout_targets=oof: the teacher's OOF predictions of the training essays come from "
                    "fold models that trained on the held-out fold %d; its score is not held out", d.holdout_fold)
        teacher_preds = teacher.blended_oof()[order][train_index]
    return StudentRows(train_index, mixed_targets(true[train_index], teacher_preds, d.alpha), valid_index,
                       d.holdout_fold, True, fold_of)


def run_distillation(cfg: Config, run_dir: Path, frame: pd.DataFrame) -> dict:
    """Train the student into run_dir (the run layout with one fold); return scores.json."""
    import torch

    from foldtune.data.dataset import TextDataset, encode_data
    from foldtune.data.validate import load_test
    from foldtune.models.regressor import load_tokenizer
    from foldtune.files import file_sha256
    from foldtune.run_layout import OOF_FILE, SCORES_FILE, fold_dir, oof_frame, start_run_folder, write_fold_result
    from foldtune.runtime.precision import resolve_device
    from foldtune.training.checks import resolve_attention
    from foldtune.training.trainer import FoldData, FoldTrainer

    if cfg.model.type != "transformer":
        raise ConfigError("distillation trains a transformer student: model.type must be transformer")
    cfg = resolve_attention(cfg, resolve_device(cfg.training.device))
    d = cfg.distill
    teacher = load_teacher(d.teacher)
    rows = student_rows(cfg, teacher, frame, cfg.training.device)
    names = list(cfg.data.target_columns)
    id_column, text_column = cfg.data.id_column, cfg.data.text_column
    ids = frame[id_column].to_numpy()
    texts = frame[text_column].tolist()
    true = frame[names].to_numpy(dtype=np.float64)

    train_ids = list(ids[rows.train_index])
    train_texts = [texts[i] for i in rows.train_index]
    train_targets = rows.train_targets
    source = ["train"] * len(train_ids)
    if d.pseudo_label_file is not None:
        log.warning("distill.pseudo_label_file=%s: its texts are trained on with the teacher's predictions; "
                    "if they are the texts you are scored on (e.g. test.csv), choosing settings by that score "
                    "leaks", d.pseudo_label_file)
        extra = load_test(d.pseudo_label_file, cfg.data)
        extra_texts = extra[text_column].tolist()
        # the holdout student's pseudo-labels come from the fold-h models too: none saw fold h
        pseudo = teacher.predict(extra_texts, rows.fold if rows.holdout else None, cfg.training.device)
        train_ids += [f"pseudo:{i}" for i in extra[id_column]]
        train_texts += extra_texts
        train_targets = np.concatenate([train_targets, pseudo])
        source += ["pseudo"] * len(extra)
    table = pd.DataFrame(train_targets, columns=names)
    table.insert(0, "source", source)
    table.insert(0, id_column, train_ids)

    start_run_folder(cfg, run_dir, frame[id_column], rows.fold_of, [rows.fold])    # folds.csv: the teacher's folds
    atomic_write_csv(run_dir / TARGETS_FILE, table)

    tokenizer = load_tokenizer(cfg.model.name)
    encode = lambda t: encode_data(tokenizer, t, cfg.data).input_ids  # noqa: E731
    train_tokens = encode(train_texts)
    valid_tokens = encode([texts[i] for i in rows.valid_index])
    data = FoldData(
        fold=rows.fold,
        train=TextDataset(train_tokens, train_targets.astype(np.float32)),
        valid=TextDataset(valid_tokens, true[rows.valid_index].astype(np.float32)),
        valid_ids=list(ids[rows.valid_index]),
        valid_index=rows.valid_index,
        target_columns=cfg.data.target_columns,
        target_range=(float(true[rows.train_index].min()), float(true[rows.train_index].max())),
    )
    log.info("student: %d training rows (%d essays%s), alpha %.2f, teacher %s; scored on %s",
             len(train_ids), len(rows.train_index), f" + {len(train_ids) - len(rows.train_index)} pseudo-labelled"
             if len(source) > len(rows.train_index) else "", d.alpha, teacher.source,
             f"the {len(rows.valid_index)} essays of held-out fold {rows.fold}" if rows.holdout
             else "its own training essays (in-sample: no held-out score)")
    folder = fold_dir(run_dir, rows.fold)
    result = FoldTrainer(cfg, data, tokenizer, folder).setup().train()
    write_fold_result(folder, result)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    atomic_write_csv(run_dir / OOF_FILE, oof_frame(ids[rows.valid_index], rows.fold, result.oof, names, id_column))
    scores = {
        "student": score_report(true[rows.valid_index], result.oof, names),
        "scored_on": f"held-out fold {rows.fold}" if rows.holdout else "training essays (in-sample)",
        "teacher": str(teacher.source), "alpha": d.alpha, "holdout_fold": d.holdout_fold,
        "holdout_targets": d.holdout_targets if rows.holdout else None,
        "n_train_essays": int(len(rows.train_index)), "n_pseudo": int(len(train_ids) - len(rows.train_index)),
        "n_scored": int(len(rows.valid_index)), "seconds": round(result.seconds, 1),
        "train_file_sha256": file_sha256(cfg.data.train_file),
    }
    if rows.holdout:
        # the honest blend on the same essays: fold-h OOF with the weights from the other folds
        row_of = {i: r for r, i in enumerate(teacher.ids)}
        at = np.array([row_of[i] for i in ids[rows.valid_index]])
        scores["teacher_holdout"] = score_report(true[rows.valid_index],
                                                 teacher.blend(teacher.oof[:, at], rows.fold), names)
    atomic_write_json(run_dir / SCORES_FILE, scores)
    log.info("student on %s: MCRMSE %.4f%s", scores["scored_on"], scores["student"]["mcrmse"],
             f"; teacher on the same essays: {scores['teacher_holdout']['mcrmse']:.4f}" if rows.holdout else "")
    return scores
