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

import contextlib
import hashlib
import logging
import os
import random
import shutil
import threading
from pathlib import Path
from typing import Iterator

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
    doomed = folder.with_name(f".{STATE_DIR}.tmp-{os.getpid()}")
    shutil.rmtree(doomed, ignore_errors=True)       # left by an earlier process of the same pid
    folder.rename(doomed)
    thread = threading.Thread(target=shutil.rmtree, args=(doomed,), kwargs={"ignore_errors": True},
                              name="remove-states")
    thread.start()
    _REMOVALS.append(thread)


def wait_for_removals() -> None:
    """Until the training states given to remove_states(wait=False) are deleted."""
    while _REMOVALS:
        _REMOVALS.pop().join()


class Snapshot:
    """A copy of obj's tensors as they are now (views of one tensor stay one tensor), for a
    background write to read while training goes on changing the originals.

    Tensors on a GPU are copied on the GPU when there is room for the copies (half of what
    training has not needed so far), into one buffer per dtype: one copy kernel, 3-4 ms of
    the training thread for a MiniLM state of 272 MB on an H100. value(), called by the
    writer thread, brings each buffer to the host on a stream of its own, so neither the
    training thread nor its stream waits for it; tensor by tensor, the writer took the GIL
    back after each of a few hundred copies, and the training threads of folds trained side
    by side waited for it. Without room the tensors are copied to the host at once, and the
    training thread waits for the copy.

    A buffer comes to the host through a small pinned buffer shared by the process
    (`copy_to_host`), chunk by chunk, into pageable memory. Pinning host memory is slow
    (~1.3 ms a MB on the H100 host) and holds up every thread's CUDA calls meanwhile:
    pinned copies of whole states had the five folds of a run in threads stall at their
    first evaluation and epoch end, when each fold pinned room for its checkpoint and state.

    The host tensors are views of one buffer per dtype, which torch.save writes once;
    with separate=True each has memory of its own (safetensors refuses views).
    """

    def __init__(self, obj, separate: bool = False):
        self._separate = separate
        self._event: dict[torch.device, torch.cuda.Event] = {}
        self._host = None
        on_gpu = _cuda_bytes(obj)
        clone = {device: nbytes <= _room(device) // 2 for device, nbytes in on_gpu.items()}
        members: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}

        def copy(value: torch.Tensor):
            if value.device.type == "cuda" and clone[value.device]:
                group = members.setdefault((value.device, value.dtype), [])
                group.append(value.detach())
                return _Slot((value.device, value.dtype), len(group) - 1)
            return value.detach().to("cpu", copy=True)

        self._value = _map_leaves(obj, copy)
        self._shapes = {key: [t.shape for t in group] for key, group in members.items()}
        self._buffers = {key: torch.cat([t.reshape(-1) for t in group]) for key, group in members.items()}
        for device, _ in self._buffers:
            if device not in self._event:
                event = self._event[device] = torch.cuda.Event()
                event.record(torch.cuda.current_stream(device))
        if not self._buffers:
            self._host = self._value

    def value(self):
        """The copy, every tensor on the CPU; the first call moves the GPU buffers there."""
        if self._host is None:
            pieces = {}
            for (device, dtype), buffer in self._buffers.items():
                shapes = self._shapes[(device, dtype)]
                if self._separate:
                    parts = [torch.empty(shape, dtype=dtype) for shape in shapes]
                    copy_to_host(buffer, parts, after=self._event[device])
                else:
                    whole = torch.empty(buffer.shape, dtype=dtype)
                    copy_to_host(buffer, [whole], after=self._event[device])
                    parts = [part.view(shape) for part, shape in
                             zip(whole.split([shape.numel() for shape in shapes]), shapes)]
                pieces[(device, dtype)] = parts
            self._host = _map_leaves(self._value, lambda slot: pieces[slot.key][slot.index], leaf=_Slot)
            self._value = self._buffers = None      # the GPU buffers are freed
        return self._host


STAGING_BYTES = 16 << 20     # each pinned buffer that copy_to_host passes GPU memory through


class _Staging:
    """Pinned host buffers of STAGING_BYTES, pinned when first needed (at most `most`,
    once per process) and lent to one copy at a time."""

    def __init__(self, most: int = 4):
        self._most = most
        self._made = 0
        self._free: list[torch.Tensor] = []
        self._ready = threading.Condition()

    @contextlib.contextmanager
    def buffer(self) -> Iterator[torch.Tensor]:
        with self._ready:
            while not self._free and self._made >= self._most:
                self._ready.wait()
            stage = self._free.pop() if self._free else None
            if stage is None:
                self._made += 1
        try:
            if stage is None:
                stage = torch.empty(STAGING_BYTES, dtype=torch.uint8, pin_memory=True)
            yield stage
        finally:
            with self._ready:
                if stage is None:           # pinning failed: room for another try
                    self._made -= 1
                else:
                    self._free.append(stage)
                self._ready.notify()


_STAGING = _Staging()


def copy_to_host(source: torch.Tensor, targets: list[torch.Tensor], after: torch.cuda.Event | None = None) -> None:
    """Copy the contiguous GPU tensor `source` into the contiguous CPU tensors `targets`, laid
    end to end (as many bytes in all), once the GPU has passed `after`. The calling thread
    waits, with the GIL released; the GPU copies run on a stream of their own."""
    stream = torch.cuda.Stream(source.device)
    if after is not None:
        stream.wait_event(after)
    with _STAGING.buffer() as stage:
        copy_in_chunks(source, targets, stage, stream)


def copy_in_chunks(source: torch.Tensor, targets: list[torch.Tensor], stage: torch.Tensor,
                   stream: "torch.cuda.Stream | None" = None) -> None:
    """Copy `source` into `targets` (laid end to end) through the byte buffer `stage`,
    one stage-full at a time: copied in on `stream` (when given), then out on the CPU."""
    source_bytes = source.reshape(-1).view(torch.uint8)
    outs = [t.reshape(-1).view(torch.uint8) for t in targets if t.numel()]
    total = source_bytes.numel()
    if total != sum(out.numel() for out in outs):
        raise ValueError(f"copy_in_chunks: {total} bytes into targets of {sum(out.numel() for out in outs)}")
    index, at = 0, 0            # the target being filled, and how far
    for start in range(0, total, stage.numel()):
        n = min(stage.numel(), total - start)
        if stream is None:
            stage[:n].copy_(source_bytes[start:start + n])
        else:
            with torch.cuda.stream(stream):
                stage[:n].copy_(source_bytes[start:start + n], non_blocking=True)
            stream.synchronize()
        done = 0
        while done < n:
            take = min(n - done, outs[index].numel() - at)
            outs[index][at:at + take].copy_(stage[done:done + take])
            done, at = done + take, at + take
            if at == outs[index].numel():
                index, at = index + 1, 0


class _Slot:
    """Where a tensor copied into a GPU buffer goes back: its buffer's key and its place."""

    def __init__(self, key: tuple[torch.device, torch.dtype], index: int):
        self.key, self.index = key, index


def _cuda_bytes(obj) -> dict[torch.device, int]:
    """Bytes of the distinct tensors in obj on each GPU."""
    sizes: dict[torch.device, int] = {}

    def count(value: torch.Tensor) -> torch.Tensor:
        if value.device.type == "cuda":
            sizes[value.device] = sizes.get(value.device, 0) + value.numel() * value.element_size()
        return value

    _map_leaves(obj, count)
    return sizes


def _room(device: torch.device) -> int:
    """Bytes on `device` that training has not needed so far: what this process can hold
    there (free on the device, and its own cache) less its peak allocation. Memory that
    is merely unused now, between two steps, is not room: the next step needs it again."""
    free, _ = torch.cuda.mem_get_info(device)
    return max(0, free + torch.cuda.memory_reserved(device) - torch.cuda.max_memory_allocated(device))


def _map_leaves(obj, copy, leaf: type = torch.Tensor):
    """obj with copy(x) for every leaf x (a tensor, unless `leaf` says otherwise) in its dicts,
    lists and tuples; a tensor seen twice (tied weights) is copied once."""
    memo: dict[tuple, object] = {}

    def walk(value):
        if isinstance(value, leaf):
            key = ((value.device, value.data_ptr(), value.dtype, tuple(value.shape), value.stride())
                   if isinstance(value, torch.Tensor) else (id(value),))
            if key not in memo:
                memo[key] = copy(value)
            return memo[key]
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, tuple):
            return tuple(walk(v) for v in value)
        return value

    try:
        return walk(obj)
    finally:
        memo.clear()        # walk's closure refers to itself: let the copies go with obj, not with the GC
