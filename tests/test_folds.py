import numpy as np
import pandas as pd
import pytest
from sklearn.model_selection import KFold

from foldtune.config import load_config
from foldtune.data.folds import assign_folds, stratification_matrix, target_categories
from foldtune.training.cross_validation import make_fold_column


def _scores(n=400, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.normal(3.0, 0.6, size=(n, 1))
    return np.clip(np.round((base + rng.normal(0, 0.4, size=(n, 6))) * 2) / 2, 1.0, 5.0)


def _level_deviation(y, folds, k):
    """Sum over targets and score levels of |rows of that level in a fold - its fair share|."""
    total = 0.0
    for j in range(y.shape[1]):
        for level in np.unique(y[:, j]):
            rows = y[:, j] == level
            total += np.abs(np.bincount(folds[rows], minlength=k) - rows.sum() / k).sum()
    return total


def test_folds_are_disjoint_cover_every_row_and_are_near_equal_in_size():
    folds = assign_folds(_scores(), n_splits=5, seed=42)
    assert folds.shape == (400,)
    assert set(folds.tolist()) == {0, 1, 2, 3, 4}   # one fold per row: disjoint and covering
    sizes = np.bincount(folds)
    assert sizes.sum() == 400 and np.all(np.abs(sizes - 80) <= 8)


def test_same_seed_same_folds_other_seed_other_folds():
    y = _scores()
    assert np.array_equal(assign_folds(y, 5, seed=7), assign_folds(y, 5, seed=7))
    assert not np.array_equal(assign_folds(y, 5, seed=7), assign_folds(y, 5, seed=8))


# 12 rows, two discrete targets: a in six levels of two rows each, b alternating 3 and 2
PAIRS = pd.DataFrame({"a": [1.0, 1.0, 1.5, 1.5, 2.0, 2.0, 2.5, 2.5, 3.0, 3.0, 3.5, 3.5],
                      "b": [3.0, 2.0] * 6})


@pytest.mark.parametrize(("seed", "expected"), [(0, [1, 0, 0, 1, 2, 0, 1, 2, 0, 2, 1, 2]),
                                                (1, [2, 1, 2, 0, 0, 1, 1, 0, 2, 0, 1, 2]),
                                                (42, [1, 0, 2, 1, 0, 1, 2, 1, 0, 2, 2, 0])])
def test_a_run_splits_its_rows_by_its_folds_seed(seed, expected):
    cfg = load_config(None, [f"folds.seed={seed}", "folds.n_splits=3", "data.target_columns=[a, b]"])
    folds = make_fold_column(PAIRS, cfg)
    assert folds.tolist() == expected
    assert np.bincount(folds).tolist() == [4, 4, 4]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_score_levels_are_balanced_far_better_than_a_random_split(seed):
    y = _scores(n=500, seed=seed)
    folds = assign_folds(y, n_splits=5, seed=seed)
    shuffled = np.empty(500, dtype=np.int64)
    for k, (_, valid) in enumerate(KFold(5, shuffle=True, random_state=seed).split(y)):
        shuffled[valid] = k
    assert _level_deviation(y, folds, 5) < 0.5 * _level_deviation(y, shuffled, 5)
    for j in range(y.shape[1]):
        means = np.array([y[folds == f, j].mean() for f in range(5)])
        assert means.max() - means.min() < 0.1


def test_discrete_scores_are_their_own_categories_continuous_ones_are_binned():
    assert target_categories(np.array([1.0, 1.5, 1.0, 5.0]), n_bins=10).tolist() == [0, 1, 0, 2]
    continuous = np.linspace(0.0, 1.0, 100)
    codes = target_categories(continuous, n_bins=4)
    assert np.bincount(codes).tolist() == [25, 25, 25, 25]
    assert np.all(np.diff(codes) >= 0)


def test_indicator_matrix_has_one_active_category_per_target():
    m = stratification_matrix(np.array([[1.0, 2.0], [2.0, 2.0], [1.0, 3.0]]), n_bins=10)
    assert m.tolist() == [[1, 0, 1, 0], [0, 1, 1, 0], [1, 0, 0, 1]]


def test_too_few_rows_is_an_error():
    with pytest.raises(ValueError, match="3 rows cannot be split into 5 folds"):
        assign_folds(np.ones((3, 2)), n_splits=5, seed=0)
