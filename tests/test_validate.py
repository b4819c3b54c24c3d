"""Bad input is reported before training, every problem at once, with file, row and column."""

from pathlib import Path

import pytest

from foldtune.config import DataConfig, FoldsConfig
from foldtune.data.validate import DataError, load_test, load_train

DATA = DataConfig(target_columns=("cohesion", "syntax"))
FOLDS = FoldsConfig(n_splits=2)


def _write(tmp_path: Path, text: str, name="train.csv", encoding="utf-8") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return path


GOOD = "text_id,prompt,full_text,cohesion,syntax\nA1,p,first essay,3.0,2.5\nB2,p,\"second, essay\",4.0,3.5\n" \
       "C3,p,third,2.0,3.0\n"


def test_a_good_file_loads_with_float_targets_and_extra_columns_dropped(tmp_path):
    frame = load_train(_write(tmp_path, GOOD), DATA, FOLDS)
    assert list(frame.columns) == ["text_id", "full_text", "cohesion", "syntax"]
    assert frame["cohesion"].tolist() == [3.0, 4.0, 2.0]
    assert frame["full_text"].tolist() == ["first essay", "second, essay", "third"]


def test_a_bom_is_fine(tmp_path):
    frame = load_train(_write(tmp_path, GOOD, encoding="utf-8-sig"), DATA, FOLDS)
    assert frame["text_id"].tolist() == ["A1", "B2", "C3"]


def test_misspelt_column_suggests_the_closest_name(tmp_path):
    path = _write(tmp_path, GOOD.replace("cohesion", "cohesoin"))
    with pytest.raises(DataError) as err:
        load_train(path, DATA, FOLDS)
    assert str(path) in str(err.value)
    assert "missing target column 'cohesion'; did you mean 'cohesoin'?" in str(err.value)


def test_every_problem_is_reported_together_with_rows_and_ids(tmp_path):
    text = ("text_id,full_text,cohesion,syntax\n"
            "A1,fine,3.0,abc\n"        # row 1: syntax not a number
            "A1,   ,3.0,2.0\n"         # row 2: duplicate id, blank text
            "C3,ok,,inf\n"             # row 3: empty cohesion, infinite syntax
            "D4,ok,2.0,2.5\n")
    with pytest.raises(DataError) as err:
        load_train(_write(tmp_path, text), DATA, FOLDS)
    problems = err.value.problems
    assert problems == [
        "column 'text_id': rows 1, 2 (ids A1, A1): expected unique ids, found 1 id(s) repeated",
        "column 'full_text': row 2 (id A1): expected a text, found an empty or whitespace-only cell",
        "column 'cohesion': row 3 (id C3): expected a number, found an empty cell",
        "column 'syntax': row 1 (id A1): expected a number, found 'abc'",
        "column 'syntax': row 3 (id C3): expected a finite number, found infinity",
    ]


def test_constant_target_and_too_few_rows(tmp_path):
    text = "text_id,full_text,cohesion,syntax\nA,x,3.0,1.0\nB,y,3.0,2.0\n"
    with pytest.raises(DataError, match="column 'cohesion': every row holds 3: a target with a single value"):
        load_train(_write(tmp_path, text), DATA, FOLDS)
    with pytest.raises(DataError, match=r"2 data row\(s\): expected at least folds.n_splits=5"):
        load_train(_write(tmp_path, text), DATA, FoldsConfig(n_splits=5))


def test_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes(GOOD.encode() + b"D4,p,caf\xe9,1.0,1.0\n")
    with pytest.raises(DataError, match=r"not UTF-8: byte \d+ \(line 5\)"):
        load_train(path, DATA, FOLDS)


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(DataError, match="the file is empty"):
        load_train(_write(tmp_path, "\n"), DATA, FOLDS)
    with pytest.raises(DataError, match=f"{tmp_path.resolve() / 'nope.csv'} does not exist"):
        load_train(tmp_path / "nope.csv", DATA, FOLDS)


def test_user_fold_column_is_checked_and_used(tmp_path):
    folds = FoldsConfig(n_splits=2, column="kfold")
    good = "text_id,full_text,cohesion,syntax,kfold\nA,x,3.0,1.0,0\nB,y,2.0,2.0,1\nC,z,1.0,2.0,1\n"
    assert load_train(_write(tmp_path, good), DATA, folds)["fold"].tolist() == [0, 1, 1]
    bad = good.replace("C,z,1.0,2.0,1", "C,z,1.0,2.0,2")
    with pytest.raises(DataError, match=r"column 'kfold': row 3 \(id C\): expected a fold number 0..1"):
        load_train(_write(tmp_path, bad), DATA, folds)


def test_test_file_needs_only_id_and_text(tmp_path):
    frame = load_test(_write(tmp_path, "text_id,full_text\nX,hello\nY,world\n", "test.csv"), DATA)
    assert frame.to_dict("list") == {"text_id": ["X", "Y"], "full_text": ["hello", "world"]}
    with pytest.raises(DataError, match="missing text column 'full_text'; did you mean 'fulltext'"):
        load_test(_write(tmp_path, "text_id,fulltext\nX,hello\n", "test.csv"), DATA)


def test_targets_outside_the_declared_range(tmp_path):
    data = DataConfig(target_columns=("cohesion", "syntax"), target_range=(1.0, 5.0))
    text = "text_id,full_text,cohesion,syntax\nA,x,3.0,5.5\nB,y,0.5,2.0\nC,z,5.0,1.0\n"
    with pytest.raises(DataError) as err:
        load_train(_write(tmp_path, text), data, FOLDS)
    assert err.value.problems == [
        "column 'cohesion': row 2 (id B): expected a value in [1, 5] (data.target_range), found 0.5",
        "column 'syntax': row 1 (id A): expected a value in [1, 5] (data.target_range), found 5.5",
    ]


def test_nan_cells_are_not_numbers(tmp_path):
    text = "text_id,full_text,cohesion,syntax\nA,x,NaN,2.0\nB,y,3.0,nan\nC,z,2.0,1.0\n"
    with pytest.raises(DataError) as err:
        load_train(_write(tmp_path, text), DATA, FOLDS)
    assert err.value.problems == ["column 'cohesion': row 1 (id A): expected a number, found 'NaN'",
                                  "column 'syntax': row 2 (id B): expected a number, found 'nan'"]
