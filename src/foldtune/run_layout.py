"""A run folder: its paths, a fold's result, the OOF frame and the run's provenance.

    runs/<name>/
      config.yaml   the resolved config          folds.csv   id -> fold
      run.json      versions, device, command    oof.csv     id, fold, predictions
      scores.json   per fold and OOF, per target    report.md   tables, plots/ (foldtune.report)
      tokens.npz    token ids, for fold processes
      fold_<k>/     best/ (checkpoint), oof.csv, metrics.csv, train.log, result.json

A run with training.seeds trains a model of each fold per seed, each in a folder of its own,
and averages them:

      fold_<k>/oof.csv          the seeds' average
      fold_<k>/seed_<s>/        best/, oof.csv, metrics.csv, train.log, result.json of seed s

Cross-validation, distillation, the TF-IDF baseline and blends write through here;
training (resume), inference, export, reports and blends read back through here.

A run's ids are whatever the input file held, read as text (data/validate.py). Pandas
left to itself reads `0001` as 1, `1e3` as 1000.0 and `NA` as a missing value, and the
ids no longer match the input's; so every CSV a run wrote is read back with its id
column as the exact text written.
"""

from __future__ import annotations

import datetime as dt
import json
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from foldtune import __version__
from foldtune.config import Config, save_config
from foldtune.files import atomic_write_csv, atomic_write_json, file_sha256

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

CONFIG_FILE = "config.yaml"      # the run's resolved config
RUN_FILE = "run.json"            # provenance: versions, device, command, the folds asked for
FOLDS_FILE = "folds.csv"         # id -> fold
OOF_FILE = "oof.csv"             # the run's (and in each fold_k, the fold's) out-of-fold predictions
SCORES_FILE = "scores.json"      # per fold and OOF, per target
TOKENS_FILE = "tokens.npz"       # token ids of every row, for fold processes
RESULT_FILE = "result.json"      # per fold: its scores, written when the fold has finished
BEST_DIR = "best"                # per fold: the checkpoint of its best evaluation
PRUNED_FILE = "pruned.json"      # a search trial stopped by the search's pruner (search/study.py)


def fold_dir(run_dir: str | Path, fold: int) -> Path:
    return Path(run_dir) / f"fold_{fold}"


@dataclass(frozen=True, order=True)
class FoldSeed:
    """What a run trains, one at a time: a model of fold `fold`, seeded with `seed`.

    seed None: the run has no training.seeds, so one model a fold, seeded with
    training.seed, whose files are in fold_k itself (as before seeds existed).
    """

    fold: int
    seed: int | None = None

    def folder(self, run_dir: str | Path) -> Path:
        """Where its checkpoint (best/), OOF, metrics, log and result are."""
        folder = fold_dir(run_dir, self.fold)
        return folder if self.seed is None else folder / f"seed_{self.seed}"

    def __str__(self) -> str:
        """As the logs name it after the word fold: '0', or '0 seed 7'."""
        return str(self.fold) if self.seed is None else f"{self.fold} seed {self.seed}"


def fold_seeds(folds: Sequence[int], seeds: Sequence[int] | None) -> list[FoldSeed]:
    """What training `folds` means: each fold's seeds in turn (seeds None: one model a fold)."""
    return [FoldSeed(fold, seed) for fold in folds for seed in (seeds or (None,))]


@dataclass
class FoldResult:
    """A fold's outcome: its best score and step, its OOF predictions (rows valid_index of
    the run's frame) and where its checkpoint is."""

    fold: int
    score: float
    per_target: dict[str, float]
    best_step: int
    oof: np.ndarray
    valid_index: np.ndarray
    checkpoint: Path
    seconds: float


def write_fold_result(folder: str | Path, result: FoldResult) -> None:
    """fold_k/result.json: written last, once the fold has finished (see fold_finished)."""
    atomic_write_json(Path(folder) / RESULT_FILE, {
        "fold": result.fold, "mcrmse": result.score, "per_target": result.per_target,
        "best_step": result.best_step, "seconds": result.seconds,
    })


def read_fold_result(folder: str | Path) -> dict:
    """A fold's result.json: fold, mcrmse, per_target, best_step, seconds."""
    return json.loads((Path(folder) / RESULT_FILE).read_text(encoding="utf-8"))


def oof_frame(ids: Sequence, fold: int | np.ndarray, preds: np.ndarray, target_columns: Sequence[str],
              id_column: str) -> pd.DataFrame:
    """Out-of-fold predictions as the run writes them: id, fold (one for all rows, or one
    per row), then a column per target."""
    import pandas as pd     # here: the commands that import this module answer --help without it

    frame = pd.DataFrame(preds, columns=list(target_columns))
    frame.insert(0, "fold", fold)
    frame.insert(0, id_column, ids)
    return frame


def start_run_folder(cfg: Config, run_dir: Path, ids: Sequence, fold_of: np.ndarray, folds_to_run: Sequence[int],
                     launch: dict | None = None) -> None:
    """Write what a new run records before training: its config, its provenance (and how
    it was launched, when several processes train it), the fold of each row."""
    import pandas as pd
    import torch
    import transformers

    save_config(cfg, run_dir / CONFIG_FILE)
    atomic_write_json(run_dir / RUN_FILE, {
        **(launch or {}),
        "started": dt.datetime.now().isoformat(timespec="seconds"),
        "command": sys.argv,
        "folds": list(folds_to_run),
        "train_file_sha256": file_sha256(cfg.data.train_file),
        "foldtune": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
    })
    atomic_write_csv(run_dir / FOLDS_FILE, pd.DataFrame({cfg.data.id_column: ids, "fold": fold_of}))


def read_provenance(run_dir: str | Path, missing_ok: bool = False) -> dict:
    """The run's run.json; with missing_ok, {} for a folder without one (an export or a
    compressed copy of an old run)."""
    path = Path(run_dir) / RUN_FILE
    if missing_ok and not path.is_file():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


def read_run_csv(path: str | Path, id_column: str) -> pd.DataFrame:
    """A CSV a run wrote (folds.csv, oof.csv, ...): numbers parsed as usual, the id column
    (when present) exactly as written."""
    import pandas as pd     # here: the commands that import this module answer --help without it

    frame = pd.read_csv(path)
    if id_column in frame.columns:
        # a second read of one column: pandas cannot turn NA detection off for one column only
        ids = pd.read_csv(path, usecols=[id_column], dtype=str, keep_default_na=False)
        frame[id_column] = ids[id_column].to_numpy()
    return frame


def fold_finished(run_dir: str | Path, fold: int, seed: int | None = None) -> bool:
    """A fold (its model of `seed`, in a run with training.seeds) has finished training when
    its result file exists: it is written after the last checkpoint (a best/ alone may be an
    early epoch's, still training)."""
    return (FoldSeed(fold, seed).folder(run_dir) / RESULT_FILE).is_file()
