"""Fold checkpoints: a `save_pretrained`-style folder that loads back without the hub.

    fold_0/best/
      model.safetensors   backbone, pooling and head weights (fp32)
      config.json         the backbone's config (architecture, no download needed)
      tokenizer files     as the tokenizer's save_pretrained writes them
      foldtune.yaml       the run's resolved config
      foldtune.json       fold, targets, scores, step: what inference needs to know;
                          for a compressed model, its factorised modules ("low_rank");
                          for a model trained with pruning.heads, the removed heads
                          of each layer ("pruned_heads") and what the gates did ("head_gates");
                          the SHA-256 and size of model.safetensors as written ("files"),
                          checked by every load
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import tempfile
import threading
import weakref
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from foldtune.config import Config, dump_config, load_config
from foldtune.files import atomic_directory, file_sha256
from foldtune.models.compress import low_rank_structure, restore_low_rank_structure
from foldtune.models.head_gates import pruned_heads_structure, restore_pruned_heads
from foldtune.models.regressor import TextRegressor, load_backbone_config
from foldtune.runtime.snapshot import Snapshot

log = logging.getLogger("foldtune")

WEIGHTS_FILE = "model.safetensors"
META_FILE = "foldtune.json"
CONFIG_FILE = "foldtune.yaml"
FILES_KEY = "files"     # in foldtune.json: file name -> {"sha256", "bytes"} as the file was written


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
    meta = copy.deepcopy({**meta, "low_rank": structure} if structure else meta)
    # Attention heads removed by pruning.heads, as the model has them now (a copied meta's
    # record may name layers that compress dropped): the same removal before loading.
    meta.pop("pruned_heads", None)
    pruned = pruned_heads_structure(model.backbone)
    if pruned:
        meta["pruned_heads"] = pruned

    def write() -> Path:
        with atomic_directory(folder) as tmp:
            save_model(weights, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
            backbone_config.save_pretrained(tmp)
            for name, data in tokenizer_files(tokenizer).items():
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                (tmp / name).write_bytes(data)
            (tmp / CONFIG_FILE).write_text(config_text, encoding="utf-8")
            write_meta(tmp, meta, [WEIGHTS_FILE])
        return folder

    return write


def write_meta(folder: Path, meta: dict, recorded: Sequence[str]) -> None:
    """Write `folder`'s foldtune.json: `meta`, and the SHA-256 and size of each of the files
    `recorded`, read back from `folder` where they have just been written. Every load
    compares them (verify_files): a file changed in place, even to one that still parses,
    is then refused instead of predicting something else."""
    records = {name: {"sha256": file_sha256(folder / name), "bytes": (folder / name).stat().st_size}
               for name in recorded}
    (folder / META_FILE).write_text(json.dumps({**meta, FILES_KEY: records}, indent=2) + "\n", encoding="utf-8")


# Per tokenizer object, for the process: every fold trained in it shares the one tokenizer.
_TOKENIZER_FILES: "weakref.WeakKeyDictionary[object, dict[str, bytes]]" = weakref.WeakKeyDictionary()
_TOKENIZER_FILES_LOCK = threading.Lock()


def tokenizer_files(tokenizer) -> dict[str, bytes]:
    """The files that the tokenizer's save_pretrained writes, by relative path; saved once per tokenizer.

    A fold writes its best checkpoint a dozen times, and the tokenizer never changes. Its
    save_pretrained holds the GIL for its whole serialisation, while folds trained side by
    side in threads wait for it to launch their steps; the bytes kept here are written
    with the GIL released.

    tokenizer.json is written without the truncation and padding of the tokenizer's last
    call, which transformers sets again at every call: a process that has tokenized the
    essays and one that has not (fold-parallel launches) write the same bytes.
    """
    with _TOKENIZER_FILES_LOCK:
        files = _TOKENIZER_FILES.get(tokenizer)
        if files is None:
            with tempfile.TemporaryDirectory(prefix="foldtune-tokenizer-") as folder:
                tokenizer.save_pretrained(folder)
                _drop_call_state(Path(folder) / "tokenizer.json")
                files = {path.relative_to(folder).as_posix(): path.read_bytes()
                         for path in sorted(Path(folder).rglob("*")) if path.is_file()}
            _TOKENIZER_FILES[tokenizer] = files
        return files


def _drop_call_state(path: Path) -> None:
    if not path.is_file():
        return
    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(str(path))
    if backend.truncation is None and backend.padding is None:
        return
    backend.no_truncation()
    backend.no_padding()
    backend.save(str(path))


# A text whose encoding shows what a tokenizer does: case, accents, digits, punctuation,
# a contraction, tabs, a line break, markup, a no-break space and a long rare word.
TOKENIZER_PROBE = ("Ça va? The naïve CAFÉ-owner's 2,056 essays... don't\tstop\n<br>\u00a0"
                   "Unbelievably-antidisestablishment")


def _tokenizer_file_digest(folder: Path) -> str:
    """SHA-256 of the tokenizer files a checkpoint folder holds (equal bytes: the same tokenizer)."""
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.name.startswith(("tokenizer", "special_tokens", "vocab", "spm")) or path.suffix == ".model":
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def tokenizer_behaviour(folder: str | Path) -> dict[str, str]:
    """What the tokenizer saved in a checkpoint folder does, aspect by aspect, each as a digest.

    The aspects: its class, vocabulary, special and added tokens, the normaliser,
    pre-tokeniser, model, post-processor and decoder of its pipeline, its settings
    (truncation and padding sides, length limit, lower case), and the ids it gives the
    probe text with and without special tokens. Not compared: the truncation and padding
    of the last call, which tokenizer.json records and every call sets again.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    aspects: dict[str, object] = {"class": type(tokenizer).__name__,
                                  "vocabulary": sorted(tokenizer.get_vocab().items())}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        pipeline = json.loads(backend.to_str())
        for part in ("normalizer", "pre_tokenizer", "model", "post_processor", "decoder", "added_tokens"):
            aspects[part] = pipeline.get(part)
    aspects["special tokens"] = [sorted(tokenizer.special_tokens_map.items(), key=str),
                                 sorted(tokenizer.all_special_ids)]
    aspects["settings"] = [getattr(tokenizer, name, None) for name in (
        "truncation_side", "padding_side", "model_max_length", "do_lower_case")]
    aspects["probe encoding"] = [tokenizer(TOKENIZER_PROBE, add_special_tokens=special)["input_ids"]
                                 for special in (False, True)]
    return {name: hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
            for name, value in aspects.items()}


def check_same_tokenizer(folders: Sequence[Path]) -> None:
    """Every checkpoint folder's tokenizer does what the first one's does, or a
    CheckpointError names the folder and how its tokenizer differs.

    Folds are compared by what their tokenizers do, not by file bytes: checkpoints written
    by different processes of one run (or by another version of a library) may serialise
    the same tokenizer differently. Folders whose files are equal byte for byte are
    loaded once.
    """
    if len(folders) < 2:
        return
    by_files = {folder: _tokenizer_file_digest(folder) for folder in folders}
    if len(set(by_files.values())) == 1:
        return
    behaviours: dict[str, dict[str, str]] = {}
    for folder, files in by_files.items():
        if files not in behaviours:
            behaviours[files] = tokenizer_behaviour(folder)
    first = behaviours[by_files[folders[0]]]
    for folder in folders[1:]:
        theirs = behaviours[by_files[folder]]
        differ = [aspect for aspect in first if theirs.get(aspect) != first[aspect]]
        if differ:
            raise CheckpointError(f"{folder} was trained with another tokenizer than {folders[0]} (their "
                                  f"{', '.join(differ)} differ): folds of different runs cannot be averaged")


def read_meta(folder: str | Path) -> dict:
    path = Path(folder) / META_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: {folder} is not a finished foldtune checkpoint")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is unreadable ({err}); retrain this fold") from None


def changed_files(folder: str | Path, meta: dict) -> list[Path]:
    """The files that `meta` (the folder's foldtune.json) records whose size or SHA-256 is no
    longer the recorded one, a missing file among them.

    A checkpoint written before foldtune recorded its files has nothing to compare: it
    is taken as it is, with one warning per run folder.
    """
    folder = Path(folder)
    records = meta.get(FILES_KEY)
    if records is None:
        _warn_unrecorded(folder)
        return []
    try:
        return [folder / name for name, record in records.items()
                if not (folder / name).is_file() or (folder / name).stat().st_size != record["bytes"]
                or file_sha256(folder / name) != record["sha256"]]
    except (AttributeError, KeyError, TypeError):
        raise CheckpointError(f"{folder / META_FILE}: '{FILES_KEY}' should map each file name to its \"sha256\" "
                              f"and \"bytes\"; retrain this fold") from None


def verify_files(folder: str | Path, meta: dict) -> None:
    """Every file that foldtune.json records is as it was written, or a CheckpointError names
    the first that is not, its fold and what writes it again."""
    changed = changed_files(folder, meta)
    if changed:
        raise CheckpointError(f"fold {meta.get('fold', '?')}: {changed[0]} does not match the SHA-256 recorded "
                              f"when it was written (the file changed after it was saved): {_remedy(Path(folder))}")


def _remedy(folder: Path) -> str:
    """How a fold checkpoint (RUN/fold_k/best) is written again: its run folder says whether
    it was trained, or exported (export.json) or compressed (compress.json) from a run."""
    run_dir = folder.parent.parent
    if (run_dir / "export.json").is_file():
        return f"export its run again: foldtune export --run RUN --out {run_dir}"
    if (run_dir / "compress.json").is_file():
        return f"compress its run again (the source named in {run_dir / 'compress.json'}) into {run_dir}"
    return f"retrain the fold with python train.py --resume {run_dir}"


# Runs warned about once per process: inference loads each fold, and one warning a run says it all.
_WARNED_UNRECORDED: set[Path] = set()


def _warn_unrecorded(folder: Path) -> None:
    run_dir = folder.parent.parent
    if run_dir not in _WARNED_UNRECORDED:
        _WARNED_UNRECORDED.add(run_dir)
        log.warning("%s: its checkpoints record no SHA-256 of their weights (written by an older foldtune): they "
                    "are loaded unchecked; a change to them would go unnoticed", run_dir)


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
    model = TextRegressor.from_backbone_config(load_backbone_config(folder), cfg.model, len(meta["target_columns"]),
                                               torch.device(device))
    try:
        restore_pruned_heads(model.backbone, meta.get("pruned_heads"))      # before the factorisation of
        restore_low_rank_structure(model.backbone, meta.get("low_rank"))    # the pruned projections
    except (ValueError, TypeError, IndexError) as err:
        raise CheckpointError(f"{folder / META_FILE}: {err}") from None
    try:
        missing, unexpected = load_model(model, str(weights), strict=False, device=str(device))
    except (SafetensorError, OSError, RuntimeError) as err:
        raise CheckpointError(f"{weights} cannot be read ({err}); the file is damaged: retrain this fold") from None
    if missing or unexpected:
        raise CheckpointError(f"{weights} does not match its config.json: missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]}")
    verify_files(folder, meta)       # after the parse: a file that does not parse is named as damaged above
    return model.to(device).eval(), meta
