"""foldtune: cross-validated fine-tuning of transformer regressors, Kaggle style.

`foldtune.train` and `foldtune.predict` (foldtune/api.py) are imported on first use:
`import foldtune` loads no torch, so the command lines' --help answers at once.
"""

__version__ = "0.1.0"
__all__ = ["predict", "train"]


def __getattr__(name: str):
    if name in __all__:
        from foldtune import api

        return getattr(api, name)
    raise AttributeError(f"module 'foldtune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
