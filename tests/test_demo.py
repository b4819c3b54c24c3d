"""Tests for the built-in synthetic demo data set (foldtune.data.demo)."""
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import Ridge
from sklearn.model_selection import KFold, cross_val_predict
from sklearn.pipeline import make_pipeline, make_union

from foldtune.data.demo import TARGETS, make_demo, write_demo

TRAIN_COLUMNS = ["text_id", "full_text", *TARGETS]


@pytest.fixture(scope="module")
def demo():
    return make_demo()


def test_same_seed_is_identical_and_other_seed_differs(demo):
    train, test = demo
    train2, test2 = make_demo()
    pd.testing.assert_frame_equal(train, train2)
    pd.testing.assert_frame_equal(test, test2)
    other_train, other_test = make_demo(seed=1)
    assert not train["full_text"].equals(other_train["full_text"])
    assert set(train["full_text"]).isdisjoint(other_train["full_text"])
    assert set(train["text_id"]).isdisjoint(other_train["text_id"])


def test_columns_and_row_counts(demo):
    train, test = demo
    assert TARGETS == ("cohesion", "syntax", "vocabulary", "phraseology", "grammar", "conventions")
    assert list(train.columns) == TRAIN_COLUMNS
    assert list(test.columns) == ["text_id", "full_text"]
    assert (len(train), len(test)) == (600, 150)
    small_train, small_test = make_demo(n_train=7, n_test=3)
    assert (len(small_train), len(small_test)) == (7, 3)
    # Rows are generated in sequence, so a smaller request is a prefix of the larger one.
    pd.testing.assert_frame_equal(small_train, train.head(7))
    empty_train, empty_test = make_demo(n_train=0, n_test=0)
    assert list(empty_train.columns) == TRAIN_COLUMNS and empty_train.empty and empty_test.empty
    with pytest.raises(ValueError):
        make_demo(n_train=-1)


def test_ids_unique_and_hex(demo):
    train, test = demo
    ids = pd.concat([train["text_id"], test["text_id"]])
    assert ids.is_unique
    assert all(re.fullmatch(r"[0-9A-F]{12}", i) for i in ids)


def test_texts_are_reasonable_essays(demo):
    train, test = demo
    texts = pd.concat([train["full_text"], test["full_text"]])
    assert texts.is_unique
    words = texts.str.split().str.len()
    # short enough to train three folds on a 2-core CPU in minutes, long enough to read as essays
    assert words.min() >= 40 and words.max() <= 160
    assert 75 <= words.median() <= 110
    assert texts.str.contains("\n\n").mean() > 0.9


def test_targets_on_half_point_grid(demo):
    train, _ = demo
    values = train[list(TARGETS)].to_numpy()
    assert values.dtype == np.float64
    assert ((values >= 1.0) & (values <= 5.0)).all()
    np.testing.assert_array_equal(values * 2, np.round(values * 2))


def test_target_spread_and_correlation(demo):
    train, _ = demo
    for t in TARGETS:
        assert 0.5 <= train[t].std() <= 0.9, t
        assert 2.7 <= train[t].mean() <= 3.3, t
        assert train[t].min() <= 1.5 and train[t].max() >= 4.5, t
    corr = train[list(TARGETS)].corr().to_numpy()
    off_diagonal = corr[~np.eye(len(TARGETS), dtype=bool)]
    assert ((off_diagonal > 0.2) & (off_diagonal < 0.95)).all()


def test_write_demo_round_trip_and_byte_identical(tmp_path):
    out = tmp_path / "nested" / "demo"
    train_path, test_path = write_demo(out, n_train=40, n_test=10, seed=3)
    assert (train_path, test_path) == (out / "train.csv", out / "test.csv")
    assert sorted(p.name for p in out.iterdir()) == ["test.csv", "train.csv"]  # no temp files left
    train, test = make_demo(n_train=40, n_test=10, seed=3)
    pd.testing.assert_frame_equal(pd.read_csv(train_path), train)
    pd.testing.assert_frame_equal(pd.read_csv(test_path), test)
    assert train_path.read_bytes().startswith(b"text_id,full_text,cohesion,syntax,")
    first = train_path.read_bytes(), test_path.read_bytes()
    write_demo(out, n_train=40, n_test=10, seed=3)
    assert (train_path.read_bytes(), test_path.read_bytes()) == first


def _mcrmse(y, pred):
    return float(np.mean(np.sqrt(np.mean((y - pred) ** 2, axis=0))))


def test_targets_are_learnable_from_text(demo):
    train, _ = demo
    y = train[list(TARGETS)].to_numpy()
    features = make_union(
        TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True),
        TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True),
    )
    model = make_pipeline(features, Ridge(alpha=1.0))
    folds = KFold(n_splits=5, shuffle=True, random_state=0)
    pred = cross_val_predict(model, train["full_text"], y, cv=folds)
    baseline = _mcrmse(y, np.broadcast_to(y.mean(axis=0), y.shape))
    model_score = _mcrmse(y, pred)
    print(f"MCRMSE ridge={model_score:.4f} mean-predictor={baseline:.4f}")
    assert model_score <= 0.8 * baseline


# --- the demo's files: written only at the demo's own paths, where absent ------------------

@pytest.fixture
def user_data(tmp_path, monkeypatch):
    """A user's kdata/train.csv and kdata/test.csv (not the demo's), the current folder their parent."""
    (tmp_path / "kdata").mkdir()
    train, test = make_demo(n_train=20, n_test=4, seed=1)
    train.to_csv(tmp_path / "kdata" / "train.csv", index=False)
    test.to_csv(tmp_path / "kdata" / "test.csv", index=False)
    monkeypatch.chdir(tmp_path)
    return {p.name: p.read_bytes() for p in (tmp_path / "kdata").iterdir()}


@pytest.mark.parametrize(("train_file", "test_file", "missing"), [
    ("kdata/train.csv", "kdata/tset.csv", "data.test_file"),
    ("kdata/trian.csv", "kdata/test.csv", "data.train_file"),
])
def test_a_typo_in_a_data_path_is_an_error_that_writes_nothing(user_data, tmp_path, capsys, train_file, test_file,
                                                              missing):
    from foldtune.cli import train_main

    # configs/default.yaml, data.demo: true, with only the paths overridden
    assert train_main([f"data.train_file={train_file}", f"data.test_file={test_file}", "model.type=tfidf_ridge",
                       "tfidf.min_df=1"]) == 2
    typo = train_file if missing == "data.train_file" else test_file
    assert capsys.readouterr().err == (f"error: {missing}: {(tmp_path / typo).resolve()} does not exist "
                                       "(set on the command line)\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kdata"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "kdata").iterdir()} == user_data


def test_a_missing_data_file_names_the_yaml_file_that_set_it(user_data, tmp_path, capsys):
    from foldtune.cli import train_main

    (tmp_path / "mine.yaml").write_text("data:\n  demo: true\n  train_file: kdata/train.csv\n"
                                        "  test_file: kdata/test_v2.csv\nmodel:\n  type: tfidf_ridge\n")
    assert train_main(["--config", "mine.yaml"]) == 2
    assert capsys.readouterr().err == (f"error: data.test_file: {(tmp_path / 'kdata/test_v2.csv').resolve()} does not "
                                       "exist (set in mine.yaml)\n")


def test_the_demo_writes_its_own_absent_files_and_never_over_a_present_one(tmp_path, monkeypatch):
    from foldtune.cli import DEFAULT_CONFIG
    from foldtune.config import load_config
    from foldtune.training.cross_validation import load_inputs

    monkeypatch.chdir(tmp_path)
    cfg = load_config(DEFAULT_CONFIG, ["model.type=tfidf_ridge"])
    demo_train, demo_test = make_demo()
    assert len(load_inputs(cfg)) == 600                 # nothing there: the whole demo
    pd.testing.assert_frame_equal(pd.read_csv("data/demo/test.csv"), demo_test)
    # the user's own essays where the demo's train.csv goes: kept, and only the test file written
    make_demo(n_train=20, n_test=0, seed=1)[0].to_csv("data/demo/train.csv", index=False)
    Path("data/demo/test.csv").unlink()
    mine = Path("data/demo/train.csv").read_bytes()
    assert len(load_inputs(cfg)) == 20
    assert Path("data/demo/train.csv").read_bytes() == mine
    pd.testing.assert_frame_equal(pd.read_csv("data/demo/test.csv"), demo_test)


def test_the_demo_writes_no_test_file_for_a_users_train_file(user_data, tmp_path):
    from foldtune.cli import DEFAULT_CONFIG
    from foldtune.config import ConfigError, ConfigOrigin, load_config
    from foldtune.training.cross_validation import load_inputs

    overrides = ("data.train_file=kdata/train.csv", "model.type=tfidf_ridge")
    with pytest.raises(ConfigError) as missing:
        load_inputs(load_config(DEFAULT_CONFIG, overrides), origin=ConfigOrigin(DEFAULT_CONFIG, overrides))
    assert str(missing.value) == (
        f"data.test_file: {(tmp_path / 'data/demo/test.csv').resolve()} does not exist (set in {DEFAULT_CONFIG}); "
        "the demo's essays are written there only by a demo run (data.demo: true with the demo's data.train_file)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kdata"]
