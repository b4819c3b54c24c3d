"""folds.column: the number of folds is the column's, so a 2-fold column needs no folds.n_splits=2."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from foldtune.config import ConfigError, ConfigOrigin, load_config
from foldtune.data.demo import make_demo
from foldtune.data.validate import DataError, with_folds_of_column


def _train_file(folder: Path, folds: list[int]) -> Path:
    """Demo essays, one per fold number of `folds`, each row's fold in column kfold."""
    train, _ = make_demo(n_train=len(folds), n_test=0, seed=5)
    train["kfold"] = folds
    train.to_csv(folder / "train.csv", index=False)
    return folder / "train.csv"


def _resolved(path: Path, *overrides: str):
    overrides = (f"data.train_file={path}", "folds.column=kfold", *overrides)
    return with_folds_of_column(load_config(None, overrides), ConfigOrigin(None, overrides))


def test_n_splits_is_the_number_of_folds_in_the_column(tmp_path):
    path = _train_file(tmp_path, [0, 1] * 6)
    assert _resolved(path).folds.n_splits == 2                       # the default 5 does not conflict
    assert _resolved(path, "folds.n_splits=2").folds.n_splits == 2   # an explicit 2 agrees


def test_an_explicit_n_splits_that_the_column_contradicts_is_an_error(tmp_path):
    path = _train_file(tmp_path, [0, 1] * 6)
    with pytest.raises(ConfigError) as err:
        _resolved(path, "folds.n_splits=3")
    assert str(err.value) == (f"folds.n_splits=3 (set on the command line) but column 'kfold' of {path} numbers 2 "
                              "folds (0..1): leave folds.n_splits out (with folds.column it is the column's number "
                              "of folds) or set it to 2")
    (tmp_path / "run.yaml").write_text("folds:\n  n_splits: 5\n")    # 5, the default's value, set in a file
    with pytest.raises(ConfigError, match=r"^folds.n_splits=5 \(set in .*run.yaml\) but column 'kfold'"):
        overrides = (f"data.train_file={path}", "folds.column=kfold")
        with_folds_of_column(load_config(tmp_path / "run.yaml", overrides), ConfigOrigin(tmp_path / "run.yaml",
                                                                                        overrides))


def test_folds_numbered_from_1_are_an_error_listing_them(tmp_path):
    path = _train_file(tmp_path, [1, 2] * 6)
    with pytest.raises(DataError) as err:
        _resolved(path)
    assert str(err.value) == (f"{path}: 1 problem(s) found before training:\n  - column 'kfold' numbers its folds "
                              "1, 2: expected 0..1, counting from 0 (with folds.column the number of folds is the "
                              "column's)")


def test_a_two_fold_column_trains_two_folds_and_records_them(tmp_path, monkeypatch):
    from foldtune.cli import train_main

    _train_file(tmp_path, [0, 1] * 6)
    # the fastest model: train.py's handling of the folds is the same for every model type
    (tmp_path / "run.yaml").write_text("data:\n  train_file: train.csv\n  test_file: null\nfolds:\n  column: kfold\n"
                                       "model:\n  type: tfidf_ridge\ntfidf:\n  min_df: 1\n")
    monkeypatch.chdir(tmp_path)
    assert train_main(["--config", "run.yaml", "--name", "all"]) == 0
    assert sorted(p.name for p in Path("runs/all").glob("fold_*")) == ["fold_0", "fold_1"]
    # resume, infer and ensemble read the folds from the run's config
    assert yaml.safe_load(Path("runs/all/config.yaml").read_text())["folds"]["n_splits"] == 2
    assert train_main(["--config", "run.yaml", "--name", "first", "--folds", "0"]) == 0
    assert sorted(p.name for p in Path("runs/first").glob("fold_*")) == ["fold_0"]
    np.testing.assert_array_equal(np.loadtxt("runs/first/folds.csv", delimiter=",", skiprows=1, usecols=1),
                                  [0, 1] * 6)
