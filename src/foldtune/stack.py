"""A level-2 model per target over the OOF predictions of runs trained on the same folds.

    foldtune ensemble --stack runs/A runs/B --out stacks/ab [--model ridge|hgb] [--features all|own]
                      [--no-text-stats]

Features (--features all, the default), the same for every target: every target's
prediction of every member (the targets move together, and a member's grammar score tells
something of its conventions score), then the text's statistics (foldtune.text_stats:
length, words, sentences, mean word length, type/token ratio, share of words outside the
vocabulary of the training essays). --features own gives each target's model only the
members' predictions of that target (and the statistics); --no-text-stats leaves the
statistics out. Over strong, correlated members the extra columns cost more than they
bring: on the real essays (docs/benchmarks.md, "The stack") every stack of MiniLM runs
scored better with `--features own --no-text-stats`, by 0.0006-0.0009.

The model: ridge on standardised features by default, its alpha chosen among RIDGE_ALPHAS
by the leave-one-out error of the rows it is fitted on (RidgeCV's exact shortcut: no
random split, nothing to tune by hand); or (--model hgb) scikit-learn's
HistGradientBoostingRegressor with the settings of HGB_SETTINGS, seeded.

Nested: the OOF score of the stack is out-of-fold at level 2 too. The rows of fold k are
predicted by a model fitted on the other folds' OOF rows only; the model kept for the
test texts is fitted on every OOF row.

The stack folder (written whole or not at all):

    stack.json       format, members (paths relative to this folder), targets, the feature
                     names, the model per target, the scores
    vocabulary.json  the words text_stats counts as known
    oof.csv          the stack's nested OOF predictions, as a run writes them (id, fold, targets)
    scores.json      its OOF and per-fold scores, as a run's; config.yaml the first member's:
                     so the stack reads as a run in `foldtune runs` and as a blend member
    hgb_<i>.joblib   --model hgb only: the fitted model of the i-th target, a pickle (it can
                     run code when loaded: load only stacks you made); its SHA-256 is in
                     stack.json and checked before it is loaded

A ridge model is stored as numbers in stack.json (the scaler's mean and scale, the
coefficients, the intercept): reading it runs no code. `infer.py --blend STACK` predicts
with it (inference.run_stack_inference).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from foldtune.config import path_problem, save_config
from foldtune.blend import (MAX_EXACT_MEMBERS, EnsembleError, aligned_oof, honest_blend, load_member, read_record,
                            score_table, train_rows)
from foldtune.files import atomic_directory, file_sha256
from foldtune.metrics import score_report
from foldtune.registry import Registry
from foldtune.run_layout import CONFIG_FILE, OOF_FILE, SCORES_FILE, oof_frame
from foldtune.text_stats import MIN_ESSAYS, STAT_NAMES, leave_one_out_stats, stats_matrix

STACK_FORMAT = "foldtune-stack/1"
STACK_FILE = "stack.json"
VOCABULARY_FILE = "vocabulary.json"
# Half decades from 0.01 to 10,000: on standardised features this spans a fit that is
# almost plain least squares to one that almost only predicts the mean.
RIDGE_ALPHAS = tuple(float(a) for a in np.logspace(-2, 4, 13))
# Shallow, slow trees: a level-2 model has few features and a few thousand rows. No early
# stopping, so that no random validation split is drawn and the fit is the same each time.
HGB_SETTINGS = dict(learning_rate=0.05, max_iter=200, max_leaf_nodes=15, min_samples_leaf=20,
                    l2_regularization=1.0, early_stopping=False, random_state=0)


# --- level-2 models: fit on (rows, features), predict, stored and read back -------------


@dataclass
class RidgeModel:
    """(x - mean) / scale @ coef + intercept: a StandardScaler and a RidgeCV, as numbers."""

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float
    alpha: float

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray) -> "RidgeModel":
        from sklearn.linear_model import RidgeCV
        from sklearn.preprocessing import StandardScaler

        scaler = StandardScaler().fit(x)
        ridge = RidgeCV(alphas=RIDGE_ALPHAS).fit(scaler.transform(x), y)
        return cls(scaler.mean_, scaler.scale_, ridge.coef_, float(ridge.intercept_), float(ridge.alpha_))

    def predict(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=np.float64) - self.mean) / self.scale @ self.coef + self.intercept

    def record(self, folder: Path, index: int) -> dict:
        return {"alpha": self.alpha, "mean": self.mean.tolist(), "scale": self.scale.tolist(),
                "coef": self.coef.tolist(), "intercept": self.intercept}

    @classmethod
    def from_record(cls, record: dict, folder: Path) -> "RidgeModel":
        return cls(*(np.asarray(record[k], dtype=np.float64) for k in ("mean", "scale", "coef")),
                   float(record["intercept"]), float(record["alpha"]))


@dataclass
class HgbModel:
    """scikit-learn's HistGradientBoostingRegressor with HGB_SETTINGS; stored as a joblib pickle."""

    estimator: object

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray) -> "HgbModel":
        from sklearn.ensemble import HistGradientBoostingRegressor

        return cls(HistGradientBoostingRegressor(**HGB_SETTINGS).fit(x, y))

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.estimator.predict(np.asarray(x, dtype=np.float64))

    def record(self, folder: Path, index: int) -> dict:
        import joblib

        name = f"hgb_{index}.joblib"
        joblib.dump(self.estimator, folder / name)
        return {"file": name, "sha256": file_sha256(folder / name)}

    @classmethod
    def from_record(cls, record: dict, folder: Path) -> "HgbModel":
        import joblib

        path = folder / record["file"]
        problem = path_problem(path, "a joblib file")
        if problem is not None:
            raise EnsembleError(f"the stack's model {problem}")
        if file_sha256(path) != record["sha256"]:
            # refused before it is unpickled: a pickle runs code as it loads
            raise EnsembleError(f"{path} does not match the SHA-256 that {folder / STACK_FILE} recorded: "
                                "it was changed after the stack was written; write the stack again")
        return cls(joblib.load(path))


LEVEL2_MODELS: Registry[type] = Registry("stack model", "--model")
LEVEL2_MODELS.register("ridge")(RidgeModel)
LEVEL2_MODELS.register("hgb")(HgbModel)


# --- features and the nested fit --------------------------------------------------------


# all: every member's prediction of every target feeds each target's model; own: only the
# members' predictions of that target. Either way followed by the text statistics, if any.
FEATURE_SETS = ("all", "own")


def feature_names(n_members: int, targets: Sequence[str], text_stats: bool = True) -> list[str]:
    """The columns of stack_features: member j's prediction of target t, then the text statistics."""
    names = [f"member{j}.{t}" for j in range(n_members) for t in targets]
    return names + ([f"text.{s}" for s in STAT_NAMES] if text_stats else [])


def target_inputs(n_members: int, targets: Sequence[str], feature_set: str, text_stats: bool = True) -> list[list[int]]:
    """For each target, the columns of stack_features its model reads."""
    names = feature_names(n_members, targets, text_stats)
    stats = [i for i, name in enumerate(names) if name.startswith("text.")]
    if feature_set == "all":
        return [list(range(len(names))) for _ in targets]
    return [[names.index(f"member{j}.{t}") for j in range(n_members)] + stats for t in targets]


def stack_features(preds: np.ndarray, stats: np.ndarray | None) -> np.ndarray:
    """(rows, features): preds (members, rows, targets) member by member, then the text statistics (if any)."""
    preds = np.asarray(preds, dtype=np.float64)
    by_member = preds.transpose(1, 0, 2).reshape(preds.shape[1], -1)
    if stats is None:
        return by_member
    return np.hstack([by_member, np.asarray(stats, dtype=np.float64)])


def nested_oof(model: type, x: np.ndarray, y: np.ndarray, fold_of: np.ndarray,
               inputs: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """Each fold's rows predicted by models (one per target, reading the columns `inputs`
    names for it; default all) fitted on the other folds' rows only."""
    out = np.empty(y.shape, dtype=np.float64)
    inputs = inputs or [range(x.shape[1])] * y.shape[1]
    for fold in np.unique(fold_of):
        inside, outside = fold_of == fold, fold_of != fold
        if not outside.any():
            raise EnsembleError("the OOF rows come from a single fold: a nested stack needs at least two")
        for t, columns in enumerate(inputs):
            columns = list(columns)
            out[inside, t] = model.fit(x[outside][:, columns], y[outside, t]).predict(x[inside][:, columns])
    return out


# --- the stack folder -------------------------------------------------------------------


def _check_out(out: Path) -> None:
    """The stack replaces `out` whole: only an earlier stack (or nothing, or an empty folder) may be there."""
    if out.is_file():
        raise EnsembleError(f"--out {out.resolve()} is a file: a stack is a folder; choose a folder name")
    if out.is_dir() and any(out.iterdir()) and not (out / STACK_FILE).is_file():
        raise EnsembleError(f"--out {out.resolve()} holds files and no {STACK_FILE}: it is not a stack, and writing "
                            "one would replace it; choose another folder")


def build_stack(run_dirs: Sequence[str | Path], out: str | Path, model: str = "ridge",
                train_file: str | Path | None = None, features: str = "all", text_stats: bool = True) -> dict:
    """Fit the stack of `run_dirs`, write its folder `out` (atomically) and return stack.json's contents."""
    level2 = LEVEL2_MODELS.get(model)
    if features not in FEATURE_SETS:
        raise EnsembleError(f"--features {features!r}: expected one of {', '.join(FEATURE_SETS)}")
    out = Path(out)
    _check_out(out)
    members = [load_member(r) for r in run_dirs]
    ids, fold_of, preds = aligned_oof(members)
    first = members[0]
    data = first.cfg.data
    targets = list(data.target_columns)
    rows = train_rows(first, ids, train_file)
    y = rows[targets].to_numpy(dtype=np.float64)
    stats, vocabulary = leave_one_out_stats(rows[data.text_column].astype(str).tolist()) if text_stats else (None, [])
    x = stack_features(preds, stats)
    inputs = target_inputs(len(members), targets, features, text_stats)

    stacked = nested_oof(level2, x, y, fold_of, inputs)
    final = [level2.fit(x[:, columns], y[:, t]) for t, columns in enumerate(inputs)]
    blended, _ = honest_blend(preds, y, fold_of, "nnls" if len(members) <= MAX_EXACT_MEMBERS else "hill")
    scores = {
        "members_oof": {m.name: score_report(y, preds[j], targets) for j, m in enumerate(members)},
        "blend_honest": score_report(y, blended, targets),
        "stack_nested_oof": score_report(y, stacked, targets),
    }
    run_scores = {"oof": scores["stack_nested_oof"], "n_rows": len(ids),
                  "folds": {str(k): score_report(y[fold_of == k], stacked[fold_of == k], targets)
                            for k in np.unique(fold_of)}}
    with atomic_directory(out) as tmp:
        base = out.resolve()
        stack = {
            "format": STACK_FORMAT,
            "model": model,
            "members": [Path(os.path.relpath(m.run_dir.resolve(), base)).as_posix() for m in members],
            "target_columns": targets,
            "id_column": data.id_column,
            "text_column": data.text_column,
            "features": feature_names(len(members), targets, text_stats),
            "feature_set": features,
            "text_stats": text_stats,
            "vocabulary": {"file": VOCABULARY_FILE, "min_essays": MIN_ESSAYS, "words": len(vocabulary)},
            "n_rows": len(ids),
            "n_folds": int(len(np.unique(fold_of))),
            "models": {t: final[i].record(tmp, i) for i, t in enumerate(targets)},
            "scores": scores,
            "sklearn": _sklearn_version(),
        }
        (tmp / STACK_FILE).write_text(json.dumps(stack, indent=2) + "\n", encoding="utf-8")
        (tmp / VOCABULARY_FILE).write_text(json.dumps(vocabulary) + "\n", encoding="utf-8")
        (tmp / SCORES_FILE).write_text(json.dumps(run_scores, indent=2) + "\n", encoding="utf-8")
        oof_frame(ids, fold_of, stacked, targets, data.id_column).to_csv(tmp / OOF_FILE, index=False)
        save_config(first.cfg, tmp / CONFIG_FILE)
    return stack


def _sklearn_version() -> str:
    import sklearn

    return sklearn.__version__


@dataclass
class Stack:
    """A stack folder read back: its stack.json, member runs, vocabulary and a model per target."""

    folder: Path
    record: dict
    runs: list[Path]
    vocabulary: list[str]
    models: list

    @property
    def target_columns(self) -> list[str]:
        return list(self.record["target_columns"])

    @property
    def text_stats(self) -> bool:
        return _switches(self.record)[1]

    @property
    def inputs(self) -> list[list[int]]:
        return target_inputs(len(self.runs), self.target_columns, *_switches(self.record))

    def predict(self, member_preds: np.ndarray, texts: Sequence[str]) -> np.ndarray:
        """(texts, targets) from the members' predictions (members, texts, targets) of `texts`."""
        x = stack_features(member_preds, stats_matrix(texts, self.vocabulary) if self.text_stats else None)
        return np.stack([m.predict(x[:, columns]) for m, columns in zip(self.models, self.inputs)], axis=1)


def _switches(record: dict) -> tuple[str, bool]:
    """(feature_set, text_stats) of a stack.json; one written before the switches had every
    prediction and the statistics."""
    return record.get("feature_set", "all"), record.get("text_stats", True)


def is_stack(path: str | Path) -> bool:
    """A folder (a stack's, or not a blend at all), or a JSON file whose format is a stack's."""
    path = Path(path)
    if path.is_dir():
        return True
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("format") == STACK_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_stack(path: str | Path) -> Stack:
    """The stack folder `path` (or its stack.json), its models loaded."""
    path = Path(path)
    file = path / STACK_FILE if path.is_dir() else path
    record = read_record(file, "stack file", STACK_FORMAT, "stack", "foldtune ensemble --stack")
    folder = file.resolve().parent
    runs = [(folder / m).resolve() for m in record["members"]]
    feature_set, text_stats = _switches(record)
    if feature_set not in FEATURE_SETS:
        raise EnsembleError(f"{file}: its feature_set {feature_set!r} is not one of {', '.join(FEATURE_SETS)}; "
                            "write the stack again")
    expected = feature_names(len(runs), record["target_columns"], text_stats)
    if record["features"] != expected:
        raise EnsembleError(f"{file}: its features {record['features']} are not those this foldtune computes "
                            f"({expected}); write the stack again")
    level2 = LEVEL2_MODELS.get(record["model"])
    models = [level2.from_record(record["models"][t], folder) for t in record["target_columns"]]
    vocabulary = json.loads((folder / record["vocabulary"]["file"]).read_text(encoding="utf-8"))
    return Stack(folder, record, runs, vocabulary, models)


def format_stack_report(stack: dict) -> str:
    scores = stack["scores"]
    rows = list(scores["members_oof"].items())
    rows += [("blend, honest (other folds' weights)", scores["blend_honest"]),
             (f"stack ({stack['model']}), nested OOF", scores["stack_nested_oof"])]
    lines = score_table(rows, stack["target_columns"])
    lines.append(f"features: {'each target its own predictions' if stack['feature_set'] == 'own' else 'every prediction'} "
                 f"of every member{', and the text statistics' if stack['text_stats'] else ''}")
    if stack["model"] == "ridge":
        lines.append("ridge alpha per target: " + ", ".join(f"{t} {m['alpha']:g}" for t, m in stack["models"].items()))
    return "\n".join(lines)
