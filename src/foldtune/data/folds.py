"""Fold assignment: multilabel stratification over every target at once.

Each target is turned into categories (its own values when the scores are discrete,
quantile bins when they are continuous) and the one-hot union of all targets is
stratified with iterative stratification, so every fold sees each score level of each
target in about the same proportion as the whole set.
"""

from __future__ import annotations

import numpy as np
from iterstrat.ml_stratifiers import MultilabelStratifiedKFold


def target_categories(column: np.ndarray, n_bins: int) -> np.ndarray:
    """Integer category per row: the value itself if few distinct ones, else a quantile bin."""
    values, codes = np.unique(column, return_inverse=True)
    if len(values) <= n_bins:
        return codes
    edges = np.unique(np.quantile(column, np.linspace(0, 1, n_bins + 1)[1:-1]))
    return np.searchsorted(edges, column, side="right")


def stratification_matrix(targets: np.ndarray, n_bins: int) -> np.ndarray:
    """One-hot indicator matrix of every target's categories, side by side."""
    targets = np.asarray(targets, dtype=np.float64)
    if targets.ndim == 1:
        targets = targets[:, None]
    blocks = []
    for j in range(targets.shape[1]):
        codes = target_categories(targets[:, j], n_bins)
        blocks.append(np.eye(codes.max() + 1, dtype=np.int8)[codes])
    return np.concatenate(blocks, axis=1)


def assign_folds(targets: np.ndarray, n_splits: int, seed: int, n_bins: int = 10) -> np.ndarray:
    """Fold number (0 .. n_splits-1) of each row; the same for the same inputs and seed."""
    indicators = stratification_matrix(targets, n_bins)
    if len(indicators) < n_splits:
        raise ValueError(f"{len(indicators)} rows cannot be split into {n_splits} folds")
    folds = np.full(len(indicators), -1, dtype=np.int64)
    splitter = MultilabelStratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    for fold, (_, valid_idx) in enumerate(splitter.split(np.zeros(len(indicators)), indicators)):
        folds[valid_idx] = fold
    return folds
