"""One process at a time in a run folder: the lock file `RUN_DIR/.foldtune.lock`.

A new run, a resume and an export hold their run folder's lock while they work, so a
second train.py started on the same folder (the same --name, a --resume of a run still
training) stops at once with an error naming the holder, instead of writing its folds
beside the first one's. The lock is a file created with O_EXCL (only one process can
create it) holding the holder's pid and host. A lock whose process has ended on this
host (killed, crashed) is taken over with a warning; one from another host is not, as
this host cannot tell whether that process still runs.

Only the process that starts the work locks: the other processes of an accelerate
launch and the fold processes of training.parallel_folds work under their main
process's lock and never take it.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from foldtune.files import process_alive

log = logging.getLogger("foldtune")

LOCK_FILE = ".foldtune.lock"
# The holder writes its lock right after creating it: a reader that finds it empty waits this long.
_WRITE_WAIT_S = 1.0
# The lock files this process holds: its own pid in one of them is not a process before it.
_HELD: set[Path] = set()


class RunLockError(RuntimeError):
    """The folder is locked by another process; the message names it and what to do."""


class RunLock:
    """The lock of one run folder for one purpose ('training', 'resume', 'export').

    acquire() and release() act in the process that acquired it only: a copy handed to
    the other processes of a launch (run_on_main) releases nothing.
    """

    def __init__(self, folder: str | Path, purpose: str):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.purpose = purpose
        self._owner: dict | None = None       # what this process wrote into the lock, while it holds it

    def acquire(self) -> "RunLock":
        if not os.access(self.folder, os.W_OK):
            return self             # a read-only folder (a Kaggle input): nothing there can be overwritten
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "purpose": self.purpose,
                 "started": dt.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv),
                 "token": os.urandom(8).hex()}
        for _ in range(3):          # again only when the lock changed hands meanwhile
            if self._create(owner):
                self._owner = owner
                _HELD.add(self.path.resolve())
                return self
            holder = self._read_holder()
            if holder is None:      # released meanwhile
                continue
            if not self._ended(holder):
                raise RunLockError(_busy_message(self, holder))
            if self._remove_stale(holder):
                log.warning("run folder %s: took over the lock of %s, which has ended", self.folder,
                            _describe(holder))
        raise RunLockError(f"run folder {self.folder}: its lock {self.path} changed hands while this process "
                           "tried to take it; another process works there: wait for it to end")

    def release(self) -> None:
        """Remove the lock if this process holds it (and the file is still this process's lock)."""
        if self._owner is None or (self._owner["pid"], self._owner["host"]) != (os.getpid(), socket.gethostname()):
            return
        try:
            holder = self._read_holder()
            if holder is not None and holder.get("token") == self._owner["token"]:
                self.path.unlink(missing_ok=True)
        except RunLockError:
            pass            # not a lock this process wrote: not its to remove
        except OSError:
            pass            # a folder turned read-only: the lock stays, stale once this process ends
        finally:
            _HELD.discard(self.path.resolve())
            self._owner = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _create(self, owner: dict) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, (json.dumps(owner) + "\n").encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def _read_holder(self) -> dict | None:
        """The lock's content (None: there is no lock); an error if it stays unreadable."""
        deadline = time.monotonic() + _WRITE_WAIT_S
        while True:
            try:
                holder = json.loads(self.path.read_text(encoding="utf-8"))
                if isinstance(holder, dict) and isinstance(holder.get("pid"), int) and "host" in holder:
                    return holder
            except FileNotFoundError:
                return None
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise RunLockError(f"run folder {self.folder} is locked, but its lock file {self.path} cannot be "
                                   f"read: if no foldtune process works in {self.folder}, remove {self.path}")
            time.sleep(0.05)

    def _ended(self, holder: dict) -> bool:
        """Whether the holder's process is known to have ended: it ran on this host and runs no more.

        This process's own pid in a lock it does not hold was a process before it (a
        restarted container hands out the same pids again)."""
        if holder["host"] != socket.gethostname():
            return False
        if holder["pid"] == os.getpid():
            return self.path.resolve() not in _HELD
        return not process_alive(holder["pid"])

    def _remove_stale(self, holder: dict) -> bool:
        """Remove the stale lock `holder`, unless another process took it over meanwhile (then
        False): a second lock file (O_EXCL) lets one process at a time check and remove it."""
        guard = self.path.with_name(LOCK_FILE + ".takeover")
        try:
            os.close(os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            raise RunLockError(f"run folder {self.folder}: another process is taking over the lock of "
                               f"{_describe(holder)}, which has ended; if none is, remove {guard}") from None
        try:
            now = self._read_holder()
            if now is None or now.get("token") != holder.get("token"):
                return False
            self.path.unlink()
            return True
        finally:
            guard.unlink(missing_ok=True)


def live_holder(folder: str | Path) -> dict | None:
    """What the lock of `folder` says of its holder (pid, host, purpose, started), while
    that process may still run: None when there is no lock, when its process has ended on
    this host (a stale lock), or when it stays unreadable. A holder on another host counts
    as running: this host cannot tell."""
    lock = RunLock(folder, "read")
    try:
        holder = lock._read_holder()
    except RunLockError:
        return None
    return None if holder is None or lock._ended(holder) else holder


class NoLock:
    """No lock held (yet, or by this process: it works under its main process's lock)."""

    def release(self) -> None:
        pass


NO_LOCK = NoLock()


def _describe(holder: dict) -> str:
    what, since = holder.get("purpose", "?"), holder.get("started", "?")
    return f"pid {holder['pid']} on host {holder['host']} ({what} since {since})"


def _busy_message(lock: RunLock, holder: dict) -> str:
    if holder["host"] != socket.gethostname():
        return (f"run folder {lock.folder} is locked by {_describe(holder)}; this host cannot tell whether that "
                f"process still runs: wait for it, or if it has ended, remove {lock.path}")
    return (f"run folder {lock.folder} is in use by {_describe(holder)}: wait for it to end, or use another folder "
            f"(if pid {holder['pid']} is not foldtune, remove {lock.path})")
