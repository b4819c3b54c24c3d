import numpy as np
import pytest

from foldtune.metrics import column_rmse, mcrmse, score_report


def test_mcrmse_hand_computed():
    y_true = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [2.0, 2.0]])
    y_pred = np.array([[1.0, 3.0], [3.0, 2.0], [2.0, 6.0], [2.0, 2.0]])
    # column 0 errors: 0, 0, 3, 0 -> sqrt(9/4) = 1.5 ; column 1 errors: 1, 2, 0, 0 -> sqrt(5/4)
    assert column_rmse(y_true, y_pred) == pytest.approx([1.5, np.sqrt(1.25)])
    assert mcrmse(y_true, y_pred) == pytest.approx((1.5 + np.sqrt(1.25)) / 2)


def test_mcrmse_is_not_plain_rmse():
    # One bad column: MCRMSE averages the per-column RMSE, so it differs from the pooled RMSE.
    y_true = np.zeros((2, 2))
    y_pred = np.array([[2.0, 0.0], [2.0, 0.0]])
    assert mcrmse(y_true, y_pred) == pytest.approx(1.0)
    assert np.sqrt(np.mean((y_true - y_pred) ** 2)) == pytest.approx(np.sqrt(2.0))


def test_score_report_names_each_target():
    report = score_report(np.array([[1.0, 1.0]]), np.array([[1.5, 3.0]]), ["a", "b"])
    assert report == {"mcrmse": pytest.approx(1.25), "per_target": {"a": pytest.approx(0.5), "b": pytest.approx(2.0)}}


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shapes differ"):
        mcrmse(np.zeros((3, 2)), np.zeros((3, 3)))
