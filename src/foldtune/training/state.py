"""Training states: everything a fold needs to continue exactly where it stopped.

A state is one `torch.save` file of tensors and plain Python values, loaded back with
`weights_only=True` (no code runs on load): model, optimizer, schedule, grad scaler,
weight average, random generators, data order and position, step and best score, and
the SHA-256 of all of these, checked on load (torch.load reads bytes changed in place
without a word). They are written atomically to `fold_k/state/state-<step>.pt` every `save_state_steps` steps,
at each epoch end and on a stop signal; the newest `keep_states` are kept, and all of
them are removed once the fold has finished (its best checkpoint stays).
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import shutil
import threading
from pathlib import Path

import numpy as np
import torch

from foldtune.files import atomic_path

log = logging.getLogger("foldtune")

STATE_DIR = "state"
FORMAT = 1


class StateError(RuntimeError):
    """A training state that cannot be read; the message names the file and what to do."""


def capture_rng() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    rng = {"python": random.getstate(), "torch": torch.get_rng_state(),
           "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                     "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng(rng: dict) -> None:
    random.setstate(_as_tuples(rng["python"]))
    n = rng["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def _as_tuples(value):
    # random.setstate wants tuples where a round trip may give lists
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def state_files(fold_dir: str | Path) -> list[Path]:
    """The fold's saved states, oldest first."""
    folder = Path(fold_dir) / STATE_DIR
    return sorted(folder.glob("state-*.pt")) if folder.is_dir() else []


def content_sha256(state: dict) -> str:
    """SHA-256 of a state's contents: the dtype, shape and bytes of every tensor and the
    repr of every other value, in order. Equal before torch.save and after torch.load."""
    digest = hashlib.sha256()

    def feed(value) -> None:
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            digest.update(f"tensor {tensor.dtype} {tuple(tensor.shape)};".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(value, dict):
            digest.update(f"dict {len(value)};".encode())
            for key, item in value.items():
                feed(key)
                feed(item)
        elif isinstance(value, (list, tuple)):         # a round trip may turn one into the other
            digest.update(f"sequence {len(value)};".encode())
            for item in value:
                feed(item)
        else:
            digest.update(f"{type(value).__name__} {value!r};".encode())

    feed(state)
    return digest.hexdigest()


def save_state(fold_dir: str | Path, state: dict, keep: int) -> Path:
    path = Path(fold_dir) / STATE_DIR / f"state-{state['step']:07d}.pt"
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, **state, "sha256": content_sha256(state)}, tmp)
    for old in state_files(fold_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_state(path: str | Path, device: torch.device | str = "cpu") -> dict:
    path = Path(path)
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # a truncated zip, a pickle weights_only refuses, a disk error
        raise StateError(f"training state {path} cannot be read ({type(err).__name__}: {err}); "
                         f"{_what_to_do(path)}") from None
    if state.get("format") != FORMAT:
        raise StateError(f"training state {path} has format {state.get('format')!r}, this foldtune reads {FORMAT}")
    recorded = state.pop("sha256", None)        # None: saved before states recorded it
    if recorded is not None and content_sha256({k: v for k, v in state.items() if k != "format"}) != recorded:
        raise StateError(f"training state {path} does not match the SHA-256 recorded when it was written (the "
                         f"file changed after it was saved); {_what_to_do(path)}")
    return state


def _what_to_do(path: Path) -> str:
    older = [p.name for p in state_files(path.parent.parent) if p != path]
    return (f"delete it to resume from the previous state ({older[-1]})" if older
            else "delete it to train this fold again from the start")


# The process's background deletions: whoever started them, the process joins them all
# before it ends (wait_for_removals), or the files outlive a finished run.
_REMOVALS: list[threading.Thread] = []


def remove_states(fold_dir: str | Path, wait: bool = True) -> None:
    """Delete the fold's training states. wait=False: the folder is renamed at once (no
    state is found there any more) and deleted by a thread; wait_for_removals() waits for
    it. Unlinking a fold's states (two MiniLM states of 176 MB) took 0.2-0.5 s on the
    lent H100 machine, while folds trained beside it in threads waited for the GIL."""
    folder = Path(fold_dir) / STATE_DIR
    if wait or not folder.is_dir():
        shutil.rmtree(folder, ignore_errors=True)
        return
    # a temporary's name: if this process ends before deleting it, the next start or resume
    # removes it (files.remove_orphans)
    renamed = folder.with_name(f".{STATE_DIR}.tmp-{os.getpid()}")
    shutil.rmtree(renamed, ignore_errors=True)       # left by an earlier process of the same pid
    folder.rename(renamed)
    thread = threading.Thread(target=shutil.rmtree, args=(renamed,), kwargs={"ignore_errors": True},
                              name="remove-states")
    thread.start()
    _REMOVALS.append(thread)


def wait_for_removals() -> None:
    """Until the training states given to remove_states(wait=False) are deleted."""
    while _REMOVALS:
        _REMOVALS.pop().join()
