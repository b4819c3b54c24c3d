"""The Python API: `foldtune.train(config, **overrides)` and `foldtune.predict(run, texts)`.

Each is its command line's work called from Python: train is train.py (cli.train_run),
predict is infer.py's averaging and clipping (inference.predict_clipped), without the
files. Mistakes raise foldtune's exceptions (ConfigError, DataError, CheckpointError...)
instead of ending in one line and an exit status. The heavy libraries are imported when
a function is called: `import foldtune` stays light.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import pandas as pd

# A config key as a keyword argument: section__key for section.key (training__lr=3e-5).
KEY_SEPARATOR = "__"


def train(config: str | Path | None = None, **overrides: Any) -> Path:
    """Train every fold of a config as `python train.py --config CONFIG section.key=value ...`
    does, and return the run folder.

    config: a YAML file (default: configs/default.yaml, as train.py). overrides: config keys
    as keyword arguments, the dot written as a double underscore, with Python values:
    `foldtune.train("configs/x.yaml", training__lr=3e-5, data__target_columns=["a", "b"],
    output__name="lr3e-5")`. Raises ConfigError, DataError, RunLockError... for what
    train.py reports in one line, and TrainingInterrupted when Ctrl-C or SIGTERM stopped
    the run (its state is saved: resume with `python train.py --resume RUN`).
    """
    import signal

    from foldtune.cli import train_run
    from foldtune.training.stopping import clear_stop_request

    argv = ([] if config is None else ["--config", str(config)]) + [_override(k, v) for k, v in overrides.items()]
    # train.py turns Ctrl-C into a clean stop for the run; this process goes on afterwards
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        return train_run(argv)
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        clear_stop_request()


def _override(key: str, value: Any) -> str:
    """training__lr=3e-05 -> 'training.lr=3.0e-05': the value as YAML, which the config reads back as it was."""
    import yaml

    from foldtune.config import ConfigError

    if KEY_SEPARATOR not in key.strip("_"):
        raise ConfigError(f"foldtune.train({key}=...): a config key is written section__key, e.g. training__lr=3e-5 "
                          "for training.lr")
    if isinstance(value, Path):
        value = str(value)
    elif isinstance(value, tuple):
        value = list(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=math.inf).strip()
    return f"{key.replace(KEY_SEPARATOR, '.')}={text.removesuffix('...').strip()}"


def predict(run: str | Path | Sequence[str | Path], texts, *, batch_size: int | None = None, device: str = "auto",
            precision: str = "auto", clip: bool = True, max_len: int | None = None,
            allow_missing_folds: bool = False, weights: Sequence[float] | None = None) -> "pd.DataFrame":
    """The scores of `texts` as infer.py computes them: every fold of the run averaged, then
    clipped to the config's data.target_range, else to the training targets' range
    (clip=False: raw).

    run: a run folder (or an exported one), or a list of them averaged as `infer.py --run A
    --run B` (weights: one per run, default equal). texts: a list of str or a pandas Series
    -> a DataFrame of the target columns, a row per text (a Series keeps its index); or a
    DataFrame holding the run's text column (data.text_column) -> with its id column
    (data.id_column) the submission infer.py writes (the ids, then the targets), without
    it the targets on the frame's index. The other options are infer.py's.
    """
    import pandas as pd

    from foldtune.config import load_config
    from foldtune.data.validate import DataError, _missing_columns
    from foldtune.inference import predict_clipped, submission_frame

    run_dirs = [Path(run)] if isinstance(run, (str, Path)) else [Path(r) for r in run]
    if not run_dirs:
        raise ValueError("foldtune.predict: no run given")
    data = load_config(run_dirs[0] / "config.yaml").data
    ids = None
    if isinstance(texts, pd.DataFrame):
        missing = _missing_columns(texts, [(data.text_column, "text")])
        if missing:
            raise DataError("foldtune.predict(run, texts)", missing)
        ids = texts[data.id_column].tolist() if data.id_column in texts.columns else None
        texts = texts[data.text_column]
    if isinstance(texts, str):
        raise TypeError("foldtune.predict: texts is one str; pass a list of texts, e.g. [text]")
    index = texts.index if isinstance(texts, pd.Series) else None
    texts = list(texts)
    wrong = [i for i, text in enumerate(texts) if not isinstance(text, str)]
    if wrong:
        raise TypeError(f"foldtune.predict: texts[{wrong[0]}] is {type(texts[wrong[0]]).__name__}, expected str "
                        f"({len(wrong)} text(s) are not str)")
    if not texts:
        raise ValueError("foldtune.predict: no texts to score")
    preds, meta = predict_clipped(run_dirs, texts, clip, weights, batch_size, device, precision, allow_missing_folds,
                                  max_len)
    if ids is not None:
        return submission_frame(ids, preds, meta["target_columns"], data.id_column)
    return pd.DataFrame(preds, columns=list(meta["target_columns"]), index=index)
