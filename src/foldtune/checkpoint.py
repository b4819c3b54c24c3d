"""Fold checkpoints: a `save_pretrained`-style folder that loads back without the hub.

    fold_0/best/
      model.safetensors   backbone, pooling and head weights (fp32)
      config.json         the backbone's config (architecture, no download needed)
      tokenizer files     as the tokenizer's save_pretrained writes them
      foldtune.yaml       the run's resolved config
      foldtune.json       fold, targets, scores, step: what inference needs to know;
                          for a compressed model, its factorised modules ("low_rank")
"""

from __future__ import annotations

import copy
import json
import tempfile
import threading
import weakref
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from foldtune.config import Config, dump_config, load_config
from foldtune.files import atomic_directory
from foldtune.models.compress import low_rank_structure, restore_low_rank_structure
from foldtune.models.regressor import TextRegressor, load_backbone_config
from foldtune.training.state import Snapshot

WEIGHTS_FILE = "model.safetensors"
META_FILE = "foldtune.json"
CONFIG_FILE = "foldtune.yaml"


class CheckpointError(RuntimeError):
    """A checkpoint folder that is missing a file or cannot be read."""


def save_checkpoint(folder: str | Path, model: TextRegressor, tokenizer, cfg: Config, meta: dict) -> Path:
    """Write the folder whole: a crash mid-save leaves the previous checkpoint in place."""
    return checkpoint_job(folder, model, tokenizer, cfg, meta)()


class _CopiedWeights:
    """A model's weights as they are now, copied to host memory; save_model only calls
    state_dict(), which waits for a copy from a GPU to be done."""

    def __init__(self, model: torch.nn.Module):
        self._snapshot = Snapshot(model.state_dict(), separate=True)    # safetensors refuses views

    def state_dict(self) -> dict:
        return self._snapshot.value()


def checkpoint_job(folder: str | Path, model: TextRegressor, tokenizer, cfg: Config,
                   meta: dict) -> Callable[[], Path]:
    """Copy the weights now; return the function that writes the checkpoint folder.

    The writing may then run in another thread while the model goes on training.
    """
    folder = Path(folder)
    weights = _CopiedWeights(model)
    backbone_config = copy.deepcopy(model.backbone.config)
    config_text = dump_config(cfg)
    # A factorised backbone (models/compress.py) is not what config.json builds: record
    # its factorised modules so that loading builds them again.
    structure = low_rank_structure(model.backbone)
    meta_text = json.dumps({**meta, "low_rank": structure} if structure else meta, indent=2) + "\n"

    def write() -> Path:
        with atomic_directory(folder) as tmp:
            save_model(weights, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
            backbone_config.save_pretrained(tmp)
            for name, data in tokenizer_files(tokenizer).items():
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                (tmp / name).write_bytes(data)
            (tmp / CONFIG_FILE).write_text(config_text, encoding="utf-8")
            (tmp / META_FILE).write_text(meta_text, encoding="utf-8")
        return folder

    return write


_TOKENIZER_FILES: "weakref.WeakKeyDictionary[object, dict[str, bytes]]" = weakref.WeakKeyDictionary()
_TOKENIZER_FILES_LOCK = threading.Lock()


def tokenizer_files(tokenizer) -> dict[str, bytes]:
    """The files that the tokenizer's save_pretrained writes, by relative path; saved once per tokenizer.

    A fold writes its best checkpoint a dozen times, and the tokenizer never changes. Its
    save_pretrained holds the GIL for its whole serialisation, while folds trained side by
    side in threads wait for it to launch their steps; the bytes kept here are written
    with the GIL released.
    """
    with _TOKENIZER_FILES_LOCK:
        files = _TOKENIZER_FILES.get(tokenizer)
        if files is None:
            with tempfile.TemporaryDirectory(prefix="foldtune-tokenizer-") as folder:
                tokenizer.save_pretrained(folder)
                files = {path.relative_to(folder).as_posix(): path.read_bytes()
                         for path in sorted(Path(folder).rglob("*")) if path.is_file()}
            _TOKENIZER_FILES[tokenizer] = files
        return files


def read_meta(folder: str | Path) -> dict:
    path = Path(folder) / META_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: {folder} is not a finished foldtune checkpoint")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is unreadable ({err}); retrain this fold") from None


def load_checkpoint(folder: str | Path, device: str | torch.device = "cpu") -> tuple[TextRegressor, dict]:
    """The fold's model (eval mode, on `device`) and its metadata."""
    folder = Path(folder)
    meta = read_meta(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{weights} is missing; retrain this fold")
    config_file = folder / CONFIG_FILE
    if not config_file.is_file():
        raise CheckpointError(f"{config_file} is missing; retrain this fold")
    cfg = load_config(config_file)
    model = TextRegressor.from_backbone_config(load_backbone_config(folder), cfg.model, len(meta["target_columns"]))
    try:
        restore_low_rank_structure(model.backbone, meta.get("low_rank"))
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{folder / META_FILE}: {err}") from None
    try:
        missing, unexpected = load_model(model, str(weights), strict=False, device=str(device))
    except (SafetensorError, OSError, RuntimeError) as err:
        raise CheckpointError(f"{weights} cannot be read ({err}); the file is damaged: retrain this fold") from None
    if missing or unexpected:
        raise CheckpointError(f"{weights} does not match its config.json: missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]}")
    return model.to(device).eval(), meta
