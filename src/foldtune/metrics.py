"""MCRMSE, the competition metric: the mean over targets of each target's RMSE."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _as_2d(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    return values[:, None] if values.ndim == 1 else values


def column_rmse(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """RMSE of each target column."""
    y_true, y_pred = _as_2d(y_true), _as_2d(y_pred)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"shapes differ: true {y_true.shape}, predicted {y_pred.shape}")
    if len(y_true) == 0:
        raise ValueError("no rows to score")
    return np.sqrt(np.mean((y_true - y_pred) ** 2, axis=0))


def mcrmse(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean columnwise root mean squared error."""
    return float(np.mean(column_rmse(y_true, y_pred)))


def score_report(y_true: np.ndarray, y_pred: np.ndarray, names: Sequence[str]) -> dict:
    """{'mcrmse': float, 'per_target': {name: rmse}} for a JSON file or a table row."""
    rmse = column_rmse(y_true, y_pred)
    if len(names) != len(rmse):
        raise ValueError(f"{len(names)} names for {len(rmse)} target columns")
    return {"mcrmse": float(rmse.mean()), "per_target": {n: float(r) for n, r in zip(names, rmse)}}
