"""Atomic writes: every file a run produces appears whole or not at all.

Each writer fills a temporary name beside the target, flushes it to disk and renames
it into place, so a crash, a kill or a full disk in the middle of a save leaves the
previous file (or folder) as it was. A process killed mid-write leaves its temporary
behind: remove_orphans tidies those of processes that have ended. A write that fails
raises WriteError, which names the file and the cause in words.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger("foldtune")

# The temporaries of atomic_path and atomic_directory: `.NAME.tmp-PID` (being written)
# and `.NAME.old-PID` (the folder NAME replaces, until the new one is in place).
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>[0-9]+)")


class WriteError(OSError):
    """A file or folder that could not be written: its path and the cause, in words."""

    def __init__(self, path: str | Path, cause: str, code: int | None = None):
        super().__init__(code, cause, str(path))

    def __str__(self) -> str:
        return f"could not write {self.filename}: {self.strerror}"


_CAUSES = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
           errno.EROFS: "read-only file system", errno.EACCES: "permission denied", errno.EPERM: "permission denied"}
_BY_TEXT = {os.strerror(code): code for code in _CAUSES}
# Below this many bytes free, a write that failed without saying why failed for want of space.
FULL_BYTES = 1 << 20


def write_failure(err: BaseException, path: str | Path) -> WriteError | None:
    """The WriteError for `err`, raised while writing `path`; None if err is not a failed write.

    Writers say it differently: an OSError has its errno; safetensors writes "(os error
    28)"; torch.save writes "strerror: Read-only file system" when it cannot open the file
    and, when the disk fills up under it, "unexpected pos 576 vs 534" or "file write
    failed", which this reads as no space when the device has (next to) none left.
    """
    if isinstance(err, WriteError):
        return err
    text = str(err)
    if isinstance(err, OSError) and err.errno is not None:
        code = err.errno
    elif match := re.search(r"\(os error (\d+)\)", text):
        code = int(match.group(1))
    elif match := re.search(r"strerror: (.+)$", text, re.MULTILINE):
        code = _BY_TEXT.get(match.group(1).strip())
    elif re.search(r"unexpected pos \d+|file write failed", text):
        code = errno.ENOSPC if _free_bytes(Path(path).parent) < FULL_BYTES else None
    else:
        return None
    if code is None:
        return WriteError(path, text.strip().splitlines()[-1])
    return WriteError(path, _CAUSES.get(code, os.strerror(code)), code)


def as_write_error(err: OSError) -> WriteError | None:
    """err as a WriteError: when it is one, or when its cause (no space, read-only,
    permission) and file show a write that failed outside these writers (a log file, a
    folder); else None."""
    if isinstance(err, WriteError):
        return err
    if err.errno in _CAUSES and err.filename is not None:
        return WriteError(err.filename, _CAUSES[err.errno], err.errno)
    return None


def _free_bytes(folder: Path) -> int:
    """Bytes free for this user on the device of `folder` (or the nearest folder above that exists)."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        stats = os.statvfs(folder)
    except OSError:
        return FULL_BYTES
    return stats.f_bavail * stats.f_frsize


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _settle_folder(folder: Path) -> None:
    """Give `folder` and every folder and file below it the mode a new one gets (0755 and
    0644 under umask 022), and flush each file to disk. Some writers (safetensors) create
    owner-only files, wherever they sit in the folder; and the folder is whole once the
    files of its subfolders are on disk too."""
    mask = _umask()
    for parent, _, files in os.walk(folder):
        os.chmod(parent, 0o777 & ~mask)
        for name in files:
            path = os.path.join(parent, name)
            if os.path.islink(path):        # its target is not ours to change
                continue
            os.chmod(path, 0o666 & ~mask)
            with open(path, "rb+") as fh:
                os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except Exception as err:
        raise write_failure(err, path) or err
    finally:
        if tmp.exists():
            tmp.unlink()


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_write_csv(path: str | Path, frame: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it takes the place of `path`.

    The old folder is moved aside before the new one is renamed in and deleted only
    after, so at every moment one complete folder exists under `path` or its
    `.old` name.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        yield tmp
        _settle_folder(tmp)
        if path.exists():
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except OSError:
            if old.exists():            # the previous folder goes back
                os.replace(old, path)
            raise
        _fsync_dir(path.parent)
    except Exception as err:
        raise write_failure(err, path) or err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def process_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)                 # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:             # another user's process
        return True
    except OverflowError:               # no pid is that large
        return False
    return True


def remove_orphans(folder: str | Path, name: str | None = None) -> list[Path]:
    """Tidy the temporaries that ended processes (killed mid-write) left in `folder` and
    the folders below it, or (name given) those of `folder / name` only; return them.

    A temporary of a process that still runs is its write in progress and stays. A
    `.NAME.old-PID` folder whose NAME is missing is the only complete copy (its process
    ended between moving it aside and renaming the new one in): it is renamed back.
    """
    tidied = []
    for parent, dirs, files in os.walk(folder):
        parent = Path(parent)
        found = [parent / entry for entry in dirs + files if _orphan_of(entry, name)]
        # an orphan folder goes whole; with a name, this folder only
        dirs[:] = [d for d in dirs if parent / d not in found and name is None]
        # the newest `.old` first: where NAME is missing, the copy put back is the latest
        for orphan in sorted(found, key=lambda p: (p.name.rsplit("-", 1)[0], -p.lstat().st_mtime)):
            match = _TEMPORARY.fullmatch(orphan.name)
            target = parent / match["name"]
            if match["kind"] == "old" and not os.path.lexists(target):
                os.replace(orphan, target)
                log.warning("%s was missing: put back its previous copy %s, left by a process that ended",
                            target, orphan.name)
            elif orphan.is_dir() and not orphan.is_symlink():
                shutil.rmtree(orphan, ignore_errors=True)
                log.info("removed %s, left by a process that ended", orphan)
            else:
                orphan.unlink(missing_ok=True)
                log.info("removed %s, left by a process that ended", orphan)
            tidied.append(orphan)
    return tidied


def _orphan_of(entry: str, name: str | None) -> bool:
    """Whether `entry` is a temporary (of `name`, given one) whose process has ended."""
    match = _TEMPORARY.fullmatch(entry)
    return (match is not None and (name is None or match["name"] == name)
            and not process_alive(int(match["pid"])))


class BackgroundWriter:
    """Runs write jobs in threads, one after another, so that training does not wait for the disk.

    A job gets copies of what it writes (runtime/snapshot.py: Snapshot), so training may go
    on changing the originals. Jobs run in the order they were given, each once the one
    before it has ended; submit() returns at once unless `max_pending` jobs are still
    unfinished (each holds its copies in memory), and wait() returns when all have ended:
    call it before anything reads what they write. An error raised by a job is raised
    again in the caller, by wait() or by a submit() once the jobs before have ended, and
    the jobs after it do not run.
    """

    SUFFIX = "-writer"      # its threads' name: the submitting thread's name and this

    def __init__(self, max_pending: int = 2) -> None:
        self.max_pending = max_pending
        self._threads: list[threading.Thread] = []
        self._error: BaseException | None = None

    def submit(self, job: Callable[[], object]) -> None:
        self._raise_error()
        while len(self._threads) >= self.max_pending:
            self._threads.pop(0).join()
            self._raise_error()
        before = self._threads[-1] if self._threads else None
        thread = threading.Thread(target=self._run, args=(job, before),
                                  name=threading.current_thread().name + self.SUFFIX)
        thread.start()
        self._threads.append(thread)

    def _run(self, job: Callable[[], object], before: threading.Thread | None) -> None:
        if before is not None:
            before.join()
        if self._error is not None:         # a job before this one failed: its successors do not run
            return
        try:
            job()
        except BaseException as err:  # raised again in the training thread
            self._error = err

    def wait(self) -> None:
        while self._threads:
            self._threads.pop(0).join()
        self._raise_error()

    def _raise_error(self) -> None:
        self._threads = [t for t in self._threads if t.is_alive()]
        if self._error is not None and not self._threads:
            err, self._error = self._error, None
            raise err
