"""One lock on the CUDA API for folds trained side by side in threads of one process.

A CUDA graph capture must not see another thread's launches, copies or allocations, so
the threads hold `CUDA_LAUNCH_LOCK` for everything that launches work. Its holder only
launches: the GPU runs the folds' kernels side by side meanwhile. What a thread must not
do while it holds the lock is wait, for the GPU or for a file: the other folds could not
launch their next steps, their queues would run dry and the GPU would idle. So a thread
steps out of the lock (`CUDA_LAUNCH_LOCK.released()`) to wait for a result from the GPU
(`to_host`) or to write its metrics and logs, and takes it back afterwards.

Held by one thread alone (folds one after another, inference), the lock costs nothing.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch


class LeavableLock:
    """A re-entrant lock that its holder can leave for a while, at any depth, and take back."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._depth = 0

    def __enter__(self) -> "LeavableLock":
        me = threading.get_ident()
        if self._owner != me:
            self._lock.acquire()
            self._owner = me
        self._depth += 1
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._owner = None
            self._lock.release()

    def held(self) -> bool:
        """Whether the calling thread has the launch lock."""
        return self._owner == threading.get_ident()

    @contextlib.contextmanager
    def released(self) -> Iterator[None]:
        """Let the other threads have the launch lock meanwhile, if this one has it; then take it back."""
        if not self.held():
            yield
            return
        depth, self._depth, self._owner = self._depth, 0, None
        self._lock.release()
        try:
            yield
        finally:
            self._lock.acquire()
            self._owner, self._depth = threading.get_ident(), depth


# One for the process: a capture must not see the launches of any other thread of it.
CUDA_LAUNCH_LOCK = LeavableLock()


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` on the CPU. From a GPU, the copy is queued on the current stream and
    waited for outside the caller's launch lock, so the other folds go on launching meanwhile."""
    if tensor.device.type != "cuda":
        return tensor.detach().cpu()
    # A non-blocking copy to the host lands in pinned memory (reused by torch's cache)
    host = tensor.detach().to("cpu", non_blocking=True)
    wait_for_stream(tensor.device)
    return host


def wait_for_stream(device: torch.device) -> None:
    """Wait, outside the caller's launch lock, until the current stream has run all it was given.

    Before a step that will itself wait for the GPU under the launch lock (an eager step:
    transformers reads the attention mask on the host), so that its wait is short.
    """
    if device.type != "cuda":
        return
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(device))
    with CUDA_LAUNCH_LOCK.released():
        done.synchronize()
