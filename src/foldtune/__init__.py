"""foldtune: cross-validated fine-tuning of transformer regressors, Kaggle style."""

__version__ = "0.1.0"
