"""Blend runs trained on the same folds, with per-target weights fitted on their OOF
(the command is foldtune.ensemble: `foldtune ensemble --run A --run B --out blend.json`).

Each target gets its own weights: non-negative and summing to one. Two scores come out:
the in-sample OOF MCRMSE (weights fitted on every OOF row, then scored on the same rows:
optimistic, since the weights saw the answers) and the honest one, in which the rows of
fold k are blended with weights fitted on the other folds' OOF rows only. The honest
score is the one to compare with a single run's OOF.

blend.json holds the members (paths relative to the file), the targets, the weights,
both scores and every member's OOF score; `infer.py --blend blend.json` reads it.

The members, their aligned OOF and the true targets are read here for the stack too
(foldtune.stack).
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from foldtune.config import Config, load_config, path_problem
from foldtune.files import atomic_write_json
from foldtune.metrics import score_report
from foldtune.registry import Registry
from foldtune.run_layout import read_provenance, read_run_csv

if TYPE_CHECKING:
    import pandas as pd

BLEND_FORMAT = "foldtune-blend/1"
# Exact least squares tries every subset of members as the support of the weights.
MAX_EXACT_MEMBERS = 12


class EnsembleError(ValueError):
    """Runs that cannot be blended, or a blend file that cannot be used; says which and why."""


# --- weights for one target -------------------------------------------------------------

WEIGHT_FITTERS: Registry[Callable[[np.ndarray, np.ndarray], np.ndarray]] = Registry("blend method", "--method")


@WEIGHT_FITTERS.register("nnls")
def simplex_least_squares(preds: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Weights w >= 0 with sum(w) = 1 minimising ||preds @ w - y||, exactly.

    Because the weights sum to one, preds @ w - y = D @ w with D = preds - y (each
    member's errors), so this is the point of the members' errors' convex hull nearest
    the origin. The optimum is the equality-constrained minimum on its own support, so
    trying every support (at most 2^12 small linear systems) and keeping the best
    feasible one finds it without a tolerance or a step size.
    """
    preds = np.asarray(preds, dtype=np.float64)
    n_members = preds.shape[1]
    if n_members > MAX_EXACT_MEMBERS:
        raise EnsembleError(f"{n_members} members: exact least squares handles up to {MAX_EXACT_MEMBERS}; "
                            "use --method hill")
    errors = preds - np.asarray(y, dtype=np.float64)[:, None]
    gram = errors.T @ errors
    best, best_loss = None, np.inf
    for size in range(1, n_members + 1):
        for support in itertools.combinations(range(n_members), size):
            s = list(support)
            # KKT of min w' G w subject to sum(w) = 1:  G w = nu * 1,  1' w = 1
            kkt = np.zeros((size + 1, size + 1))
            kkt[:size, :size] = gram[np.ix_(s, s)]
            kkt[:size, size] = -1.0
            kkt[size, :size] = 1.0
            rhs = np.zeros(size + 1)
            rhs[size] = 1.0
            solution = np.linalg.lstsq(kkt, rhs, rcond=None)[0][:size]
            if solution.min() < -1e-12:
                continue
            w = np.zeros(n_members)
            w[s] = np.clip(solution, 0.0, None)
            w /= w.sum()
            loss = float(np.sum((errors @ w) ** 2))
            if best is None or loss < best_loss - 1e-12 * max(1.0, best_loss):   # ties: the smaller support
                best, best_loss = w, loss
    return best


@WEIGHT_FITTERS.register("hill")
def hill_climb(preds: np.ndarray, y: np.ndarray, max_steps: int = 100) -> np.ndarray:
    """Greedy ensemble selection with replacement (Caruana et al., 2004).

    Start from the best member; at each step add the member (again, if it helps) that
    lowers the blend's RMSE most; stop when none does or after max_steps. The weights
    are how often each member was picked, over the number of picks: multiples of
    1/picks, so coarser than least squares and harder to overfit with many members.
    """
    preds = np.asarray(preds, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)

    def sse(p: np.ndarray) -> float:
        return float(np.sum((p - y) ** 2))

    counts = np.zeros(preds.shape[1], dtype=np.int64)
    first = int(np.argmin([sse(preds[:, j]) for j in range(preds.shape[1])]))
    counts[first] = 1
    total = preds[:, first].copy()
    current = sse(total)
    for _ in range(max_steps):
        n = counts.sum() + 1
        losses = [sse((total + preds[:, j]) / n) for j in range(preds.shape[1])]
        j = int(np.argmin(losses))
        if losses[j] >= current:
            break
        counts[j] += 1
        total += preds[:, j]
        current = losses[j]
    return counts / counts.sum()


def fit_weights(preds: np.ndarray, y: np.ndarray, method: str = "nnls") -> np.ndarray:
    """Per-target weights, shape (targets, members), for preds (members, rows, targets)."""
    fitter = WEIGHT_FITTERS.get(method)
    return np.stack([fitter(preds[:, :, t].T, y[:, t]) for t in range(y.shape[1])])


def apply_weights(preds: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Blend of preds (members, rows, targets) with weights (targets, members)."""
    return np.einsum("mnt,tm->nt", np.asarray(preds, dtype=np.float64), np.asarray(weights, dtype=np.float64))


def honest_blend(preds: np.ndarray, y: np.ndarray, fold_of: np.ndarray,
                 method: str = "nnls") -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Blend each fold's rows with weights fitted on the other folds' rows only.

    Returns the blended predictions of every row and the weights used for each fold.
    """
    out = np.empty(y.shape, dtype=np.float64)
    fold_weights = {}
    for fold in np.unique(fold_of):
        inside, outside = fold_of == fold, fold_of != fold
        if not outside.any():
            raise EnsembleError("the OOF rows come from a single fold: an honest score needs at least two")
        fold_weights[int(fold)] = fit_weights(preds[:, outside], y[outside], method)
        out[inside] = apply_weights(preds[:, inside], fold_weights[int(fold)])
    return out, fold_weights


# --- members: runs, their OOF, the true targets ---------------------------------------


@dataclass
class Member:
    run_dir: Path
    cfg: Config
    oof: pd.DataFrame           # id, fold, targets; one row per OOF row of the run

    @property
    def name(self) -> str:
        return str(self.run_dir)


def load_member(run_dir: str | Path) -> Member:
    run_dir = Path(run_dir)
    for name in ("config.yaml", "oof.csv"):
        if not (run_dir / name).is_file():
            raise EnsembleError(f"{run_dir} has no {name}: is it a finished foldtune run?")
    cfg = load_config(run_dir / "config.yaml")
    id_column = cfg.data.id_column
    oof = read_run_csv(run_dir / "oof.csv", id_column)
    missing = [c for c in [id_column, "fold", *cfg.data.target_columns] if c not in oof.columns]
    if missing:
        raise EnsembleError(f"{run_dir / 'oof.csv'} lacks the column(s) {missing}")
    return Member(run_dir, cfg, oof)


def aligned_oof(members: Sequence[Member]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The ids, their fold and the members' OOF (members, rows, targets), in the first
    member's row order. Refuses members whose targets, rows or folds differ."""
    if len(members) < 2:
        raise EnsembleError("a blend needs at least two runs")
    first = members[0]
    targets = list(first.cfg.data.target_columns)
    id_column = first.cfg.data.id_column
    ids = first.oof[id_column].tolist()
    folds = dict(zip(ids, first.oof["fold"].astype(int)))
    for other in members[1:]:
        if list(other.cfg.data.target_columns) != targets:
            raise EnsembleError(f"{other.name} predicts {list(other.cfg.data.target_columns)}, "
                                f"{first.name} predicts {targets}: runs of other targets cannot be blended")
        if other.cfg.data.id_column != id_column:
            raise EnsembleError(f"{other.name} names its ids '{other.cfg.data.id_column}', {first.name} "
                                f"'{id_column}': were they trained on the same file?")
        theirs = dict(zip(other.oof[id_column].tolist(), other.oof["fold"].astype(int)))
        only_one = sorted(set(folds) ^ set(theirs))
        if only_one:
            where = first.name if only_one[0] in folds else other.name
            raise EnsembleError(f"runs {first.name} and {other.name} have OOF predictions for different rows: "
                                f"id {only_one[0]} is only in {where} ({len(only_one)} such ids); "
                                "blend runs trained on the same rows and folds")
        differ = [i for i in ids if folds[i] != theirs[i]]
        if differ:
            raise EnsembleError(f"runs {first.name} and {other.name} were trained on different folds: id "
                                f"{differ[0]} is in fold {folds[differ[0]]} of {first.name} and fold "
                                f"{theirs[differ[0]]} of {other.name} ({len(differ)} ids differ). Their OOF "
                                "predictions cannot be blended honestly; retrain with the same folds.seed "
                                "and folds.n_splits (or folds.column)")
    preds = np.stack([m.oof.set_index(id_column).loc[ids, targets].to_numpy(dtype=np.float64) for m in members])
    return ids, np.array([folds[i] for i in ids]), preds


def _find_train_file(member: Member) -> Path:
    """The run's train file: as the config names it, from here or from the folder
    train.py ran in (runs/<name>/../..)."""
    name = Path(member.cfg.data.train_file)
    for candidate in (name, member.run_dir.resolve().parent.parent / name):
        if candidate.is_file():
            return candidate
    raise EnsembleError(f"{member.name} was trained on {name}, which is not found from here nor from "
                        f"{member.run_dir.resolve().parent.parent}: pass --train FILE")


def true_targets(member: Member, ids: Sequence[str], train_file: str | Path | None = None) -> np.ndarray:
    """The true targets of `ids`, from the run's train file (checked against the SHA-256
    the run recorded, when it did)."""
    rows = train_rows(member, ids, train_file)
    return rows[list(member.cfg.data.target_columns)].to_numpy(dtype=np.float64)


def train_rows(member: Member, ids: Sequence[str], train_file: str | Path | None = None) -> pd.DataFrame:
    """The rows of `ids`, in that order, from the run's train file (checked against the
    SHA-256 the run recorded, when it did), indexed by id."""
    from foldtune.data.validate import load_train
    from foldtune.files import file_sha256

    path = Path(train_file) if train_file else _find_train_file(member)
    recorded = read_provenance(member.run_dir, missing_ok=True).get("train_file_sha256")
    if recorded and recorded != file_sha256(path):
        raise EnsembleError(f"{path} is not the file {member.name} was trained on (its SHA-256 differs from "
                            "run.json's): the OOF rows would be scored against other targets")
    frame = load_train(path, member.cfg.data, member.cfg.folds).set_index(member.cfg.data.id_column)
    unknown = [i for i in ids if i not in frame.index]
    if unknown:
        raise EnsembleError(f"{path} has no row with id {unknown[0]} ({len(unknown)} OOF ids missing)")
    return frame.loc[list(ids)]


# --- the blend file -------------------------------------------------------------------


def build_blend(run_dirs: Sequence[str | Path], out: str | Path, method: str = "nnls",
                train_file: str | Path | None = None) -> dict:
    """Fit the blend of `run_dirs`, write it to `out` (atomically) and return its contents."""
    WEIGHT_FITTERS.get(method)
    members = [load_member(r) for r in run_dirs]
    ids, fold_of, preds = aligned_oof(members)
    y = true_targets(members[0], ids, train_file)
    targets = list(members[0].cfg.data.target_columns)

    weights = fit_weights(preds, y, method)
    in_sample = score_report(y, apply_weights(preds, weights), targets)
    honest_preds, fold_weights = honest_blend(preds, y, fold_of, method)
    honest = score_report(y, honest_preds, targets)
    out = Path(out)
    base = out.resolve().parent
    blend = {
        "format": BLEND_FORMAT,
        "method": method,
        "members": [Path(os.path.relpath(m.run_dir.resolve(), base)).as_posix() for m in members],
        "target_columns": targets,
        "id_column": members[0].cfg.data.id_column,
        "n_rows": len(ids),
        "n_folds": int(len(np.unique(fold_of))),
        "weights": {t: [float(w) for w in weights[i]] for i, t in enumerate(targets)},
        "fold_weights": {str(k): {t: [float(w) for w in fw[i]] for i, t in enumerate(targets)}
                         for k, fw in fold_weights.items()},
        "oof_in_sample": in_sample,
        "oof_honest": honest,
        "members_oof": {m.name: score_report(y, preds[j], targets) for j, m in enumerate(members)},
    }
    atomic_write_json(out, blend)
    return blend


def read_record(path: Path, kind: str, fmt: str, named: str, written_by: str) -> dict:
    """The JSON record in `path` (a `kind`, e.g. "blend file", of format `fmt`), or an
    EnsembleError that says what is wrong with it, calling it `named`, and what writes one."""
    problem = path_problem(path, f"a {kind}")
    if problem is not None:
        raise EnsembleError(f"{named} {problem}: write one with {written_by}")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise EnsembleError(f"{path} is not valid JSON ({err})") from None
    if record.get("format") != fmt:
        raise EnsembleError(f"{path} is not a foldtune {kind} (format {record.get('format')!r})")
    return record


def read_blend(path: str | Path) -> tuple[dict, list[Path]]:
    """A blend file and its members' run folders (resolved from the file's folder)."""
    path = Path(path)
    blend = read_record(path, "blend file", BLEND_FORMAT, "blend file", "foldtune ensemble")
    runs = [(path.resolve().parent / m).resolve() for m in blend["members"]]
    for target, w in blend["weights"].items():
        if len(w) != len(runs) or min(w) < 0 or abs(sum(w) - 1) > 1e-6:
            raise EnsembleError(f"{path}: the weights of {target} must be {len(runs)} non-negative numbers "
                                f"summing to one, got {w}")
    return blend, runs


def blend_weights(blend: dict) -> np.ndarray:
    """The blend's weights as (targets, members)."""
    return np.array([blend["weights"][t] for t in blend["target_columns"]], dtype=np.float64)


def score_table(rows: Sequence[tuple[str, dict]], targets: Sequence[str]) -> list[str]:
    """The lines of a table of OOF scores (score_report's), one row per (name, report)."""
    width = max(len(name) for name, _ in rows)
    lines = [f"{'OOF':<{width}}  " + "  ".join(f"{t[:11]:>11}" for t in targets) + "       MCRMSE"]
    for name, rep in rows:
        lines.append(f"{name:<{width}}  " + "  ".join(f"{rep['per_target'][t]:>11.4f}" for t in targets)
                     + f"  {rep['mcrmse']:>11.4f}")
    return lines


def format_report(blend: dict) -> str:
    targets = blend["target_columns"]
    rows = [(name, rep) for name, rep in blend["members_oof"].items()]
    rows += [("blend, in-sample weights", blend["oof_in_sample"]), ("blend, honest (other folds' weights)",
                                                                     blend["oof_honest"])]
    lines = score_table(rows, targets)
    lines.append("weights (" + blend["method"] + "), members in the order above:")
    for t in targets:
        lines.append(f"  {t}: " + ", ".join(f"{w:.3f}" for w in blend["weights"][t]))
    return "\n".join(lines)
