"""Read the train and test CSVs and reject bad input before anything is tokenized.

Every problem found is reported together, each naming the file, the rows (1-based
data rows, with their ids) and the column, and what was expected, so a user fixes a
hand-assembled CSV in one pass instead of one crash per problem.
"""

from __future__ import annotations

import dataclasses
import difflib
import io
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from foldtune.config import Config, ConfigError, ConfigOrigin, DataConfig, FoldsConfig, path_problem
from foldtune.data.demo import DEMO_TEST_FILE, DEMO_TRAIN_FILE, demo_files, is_demo_file

MAX_EXAMPLES = 5


class DataError(ValueError):
    """The input files cannot be used; the message lists every problem found."""

    def __init__(self, path: str | Path, problems: Sequence[str]):
        self.path = str(path)
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{self.path}: {len(self.problems)} problem(s) found before training:\n{lines}")


def read_csv_text(path: str | Path) -> pd.DataFrame:
    """Every cell as a string, exactly as written (no NaN guessing); UTF-8, BOM allowed."""
    path = Path(path)
    problem = path_problem(path, "a CSV file")
    if problem is not None:
        raise DataError(path, [problem])
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(path, [f"not UTF-8: byte {err.start} (line {line}) is {raw[err.start:err.start + 1]!r}; "
                               "save the file as UTF-8"]) from None
    if not text.strip():
        raise DataError(path, ["the file is empty: expected a header row and data rows"])
    try:
        return pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except pd.errors.ParserError as err:
        raise DataError(path, [f"not a readable CSV: {err}"]) from None


def _rows(frame: pd.DataFrame, mask: np.ndarray, id_column: str | None) -> str:
    """'rows 3, 9 (ids A1, B2)' for the first few positions where mask is true."""
    positions = np.flatnonzero(mask)
    shown = positions[:MAX_EXAMPLES]
    text = "row" + ("s " if len(positions) > 1 else " ") + ", ".join(str(p + 1) for p in shown)
    if id_column is not None and id_column in frame.columns:
        text += " (" + ("ids " if len(shown) > 1 else "id ") + ", ".join(frame[id_column].iloc[shown]) + ")"
    if len(positions) > len(shown):
        text += f" and {len(positions) - len(shown)} more"
    return text


def _missing_columns(frame: pd.DataFrame, wanted: Sequence[tuple[str, str]]) -> list[str]:
    problems = []
    for column, role in wanted:
        if column not in frame.columns:
            close = difflib.get_close_matches(column, list(frame.columns), n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            problems.append(f"missing {role} column '{column}'{hint} (columns present: {', '.join(frame.columns)})")
    return problems


def _check_ids_and_texts(frame: pd.DataFrame, data: DataConfig) -> list[str]:
    problems = []
    ids = frame[data.id_column].str.strip()
    empty_id = (ids == "").to_numpy()
    if empty_id.any():
        problems.append(f"column '{data.id_column}': {_rows(frame, empty_id, None)}: expected a non-empty id")
    dup = ids.duplicated(keep=False).to_numpy() & ~empty_id
    if dup.any():
        problems.append(f"column '{data.id_column}': {_rows(frame, dup, data.id_column)}: expected unique ids, "
                        f"found {ids[dup].nunique()} id(s) repeated")
    blank = (frame[data.text_column].str.strip() == "").to_numpy()
    if blank.any():
        problems.append(f"column '{data.text_column}': {_rows(frame, blank, data.id_column)}: "
                        "expected a text, found an empty or whitespace-only cell")
    return problems


def _parse_targets(frame: pd.DataFrame, data: DataConfig) -> tuple[pd.DataFrame, list[str]]:
    problems = []
    values = {}
    for column in data.target_columns:
        cells = frame[column].str.strip()
        numbers = pd.to_numeric(cells, errors="coerce").astype("float64")
        bad = numbers.isna().to_numpy() & (cells != "").to_numpy()
        if bad.any():
            first = cells.iloc[np.flatnonzero(bad)[0]]
            problems.append(f"column '{column}': {_rows(frame, bad, data.id_column)}: "
                            f"expected a number, found {first!r}")
        empty = (cells == "").to_numpy()
        if empty.any():
            problems.append(f"column '{column}': {_rows(frame, empty, data.id_column)}: "
                            "expected a number, found an empty cell")
        infinite = np.isinf(numbers.to_numpy())
        if infinite.any():
            problems.append(f"column '{column}': {_rows(frame, infinite, data.id_column)}: "
                            "expected a finite number, found infinity")
        if data.target_range is not None:
            low, high = data.target_range
            outside = np.isfinite(numbers.to_numpy()) & ((numbers < low) | (numbers > high)).to_numpy()
            if outside.any():
                first = numbers.iloc[np.flatnonzero(outside)[0]]
                problems.append(f"column '{column}': {_rows(frame, outside, data.id_column)}: "
                                f"expected a value in [{low:g}, {high:g}] (data.target_range), found {first:g}")
        finite = numbers[np.isfinite(numbers.to_numpy())]
        if len(finite) == len(frame) and finite.nunique() == 1:
            problems.append(f"column '{column}': every row holds {finite.iloc[0]:g}: "
                            "a target with a single value cannot be learned or stratified")
        values[column] = numbers
    return pd.DataFrame(values), problems


def _parse_folds(frame: pd.DataFrame, data: DataConfig, folds: FoldsConfig) -> tuple[pd.Series, list[str]]:
    cells = frame[folds.column].str.strip()
    numbers = pd.to_numeric(cells, errors="coerce")
    valid = numbers.notna() & (numbers % 1 == 0) & (numbers >= 0) & (numbers < folds.n_splits)
    if not valid.all():
        bad = (~valid).to_numpy()
        first = cells.iloc[np.flatnonzero(bad)[0]]
        return numbers, [f"column '{folds.column}': {_rows(frame, bad, data.id_column)}: expected a fold number "
                         f"0..{folds.n_splits - 1} (folds.n_splits={folds.n_splits}), found {first!r}"]
    empty = sorted(set(range(folds.n_splits)) - set(numbers.astype(int)))
    if empty:
        return numbers, [f"column '{folds.column}': no rows in fold(s) {', '.join(map(str, empty))} "
                         f"of folds.n_splits={folds.n_splits}"]
    return numbers.astype("int64"), []


def check_data_files(data: DataConfig, origin: ConfigOrigin | None = None) -> None:
    """Each data file the config names exists, or is one of the demo's to write (demo_files).

    A missing file is a typo or a wrong folder: the error names the key, the absolute
    path and (origin given) where the value was set."""
    provided = demo_files(data)
    for key, value, demo_path in (("data.train_file", data.train_file, DEMO_TRAIN_FILE),
                                  ("data.test_file", data.test_file, DEMO_TEST_FILE)):
        problem = None if value is None or key in provided else path_problem(value, "a CSV file")
        if problem is None:
            continue
        where = f" ({origin.of(key)})" if origin is not None else ""
        demo = ("; the demo's essays are written there only by a demo run (data.demo: true with the demo's "
                "data.train_file)" if is_demo_file(value, demo_path) else "")
        raise ConfigError(f"{key}: {problem}{where}{demo}")


def with_folds_of_column(cfg: Config, origin: ConfigOrigin) -> Config:
    """cfg with folds.n_splits the number of folds in the train file's folds.column.

    A file that numbers its own folds says how many there are: a 2-fold column needs no
    folds.n_splits=2. The folds must be numbered 0..K-1 (as the run's fold_<k> folders
    and --folds are), else the error lists the numbers found. A folds.n_splits set in the
    config or on the command line (origin) that differs is an error naming both: that
    user expects another split, and runs on other folds do not compare. A file
    that cannot be read, or a column that is absent, is left to load_train to report."""
    path = Path(cfg.data.train_file)
    if cfg.folds.column is None or not path.is_file():
        return cfg
    frame = read_csv_text(path)
    if cfg.folds.column not in frame.columns:
        return cfg
    numbers = pd.to_numeric(frame[cfg.folds.column].str.strip(), errors="coerce").dropna()
    found = sorted({int(n) for n in numbers if n % 1 == 0})
    if not found:
        return cfg                          # load_train names the rows that hold no fold number
    n_splits = len(found)
    if found != list(range(n_splits)):
        shown = ", ".join(map(str, found[:10])) + (f" and {len(found) - 10} more" if len(found) > 10 else "")
        raise DataError(path, [f"column '{cfg.folds.column}' numbers its folds {shown}: expected 0..{n_splits - 1}, "
                               f"counting from 0 (with folds.column the number of folds is the column's)"])
    if n_splits == cfg.folds.n_splits:
        return cfg
    where = origin.of("folds.n_splits")
    if where != "the default":
        raise ConfigError(f"folds.n_splits={cfg.folds.n_splits} ({where}) but column '{cfg.folds.column}' of "
                          f"{path} numbers {n_splits} folds (0..{n_splits - 1}): leave folds.n_splits out (with "
                          f"folds.column it is the column's number of folds) or set it to {n_splits}",
                          "folds.n_splits")
    return dataclasses.replace(cfg, folds=dataclasses.replace(cfg.folds, n_splits=n_splits))


def load_train(path: str | Path, data: DataConfig, folds: FoldsConfig) -> pd.DataFrame:
    """The training rows as id, text, float targets (and fold, if the user gave one)."""
    frame = read_csv_text(path)
    wanted = [(data.id_column, "id"), (data.text_column, "text")]
    wanted += [(c, "target") for c in data.target_columns]
    if folds.column is not None:
        wanted.append((folds.column, "fold"))
    problems = _missing_columns(frame, wanted)
    if problems:
        raise DataError(path, problems)
    if len(frame) < folds.n_splits:
        raise DataError(path, [f"{len(frame)} data row(s): expected at least folds.n_splits={folds.n_splits}"])
    problems = _check_ids_and_texts(frame, data)
    targets, target_problems = _parse_targets(frame, data)
    problems += target_problems
    out = pd.DataFrame({data.id_column: frame[data.id_column].str.strip(), data.text_column: frame[data.text_column]})
    out = pd.concat([out, targets], axis=1)
    if folds.column is not None:
        fold_values, fold_problems = _parse_folds(frame, data, folds)
        problems += fold_problems
        out["fold"] = fold_values
    if problems:
        raise DataError(path, problems)
    return out


def load_test(path: str | Path, data: DataConfig) -> pd.DataFrame:
    """The rows to predict as id and text; other columns are ignored."""
    frame = read_csv_text(path)
    problems = _missing_columns(frame, [(data.id_column, "id"), (data.text_column, "text")])
    if problems:
        raise DataError(path, problems)
    if len(frame) == 0:
        raise DataError(path, ["no data rows: expected at least one text to predict"])
    problems = _check_ids_and_texts(frame, data)
    if problems:
        raise DataError(path, problems)
    return pd.DataFrame({data.id_column: frame[data.id_column].str.strip(), data.text_column: frame[data.text_column]})
