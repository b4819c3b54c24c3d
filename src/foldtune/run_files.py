"""The files of a run folder that are read back, and how: training (resume), inference,
export, reports and blends all read them through here.

A run's ids are whatever the input file held, read as text (data/validate.py). Pandas
left to itself reads `0001` as 1, `1e3` as 1000.0 and `NA` as a missing value, and the
ids no longer match the input's; so every CSV a run wrote is read back with its id
column as the exact text written.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

RESULT_FILE = "result.json"      # per fold: its scores, written when the fold has finished


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


def fold_finished(run_dir: str | Path, fold: int) -> bool:
    """A fold has finished training when its result file exists: it is written after the
    fold's last checkpoint (a fold_k/best/ alone may be an early epoch's, still training)."""
    return (Path(run_dir) / f"fold_{fold}" / RESULT_FILE).is_file()
