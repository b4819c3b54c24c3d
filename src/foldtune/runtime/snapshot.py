"""Copies of tensors on the host for background writes (checkpoints, training states).

Training goes on changing its tensors while a writer thread saves them: a `Snapshot` holds
a copy as they were, made quickly on the GPU and brought to the host through a few
pinned buffers that the whole process shares.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch


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


# One pool for the process: pinned host memory is slow to pin and stalls every thread's CUDA calls meanwhile.
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
