"""One writer per run directory: an advisory `flock` on `RUN_DIR/.lock`.

Every command that writes into a run directory holds the lock (taken non-blocking) for as long as
its `RunLock` lives; a second writer is refused at once with the holder's pid and command line,
which the lock file records. The kernel drops the lock when the holder's descriptor is closed,
also when the process is killed, so a crash never leaves a stale lock behind (the recorded pid of
a dead holder is just overwritten by the next one).

Within one process the lock is shared: holding a directory again while it is held returns the
same `RunLock`. Under several processes (torchrun / accelerate) only rank 0 takes it, for its
whole launch: a `RunLock` sent to the other ranks arrives as a placeholder that holds nothing.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import sys
import time
import weakref
from pathlib import Path

from cfdpo.errors import CfdpoError

NAME = ".lock"
_held: weakref.WeakValueDictionary[str, RunLock] = weakref.WeakValueDictionary()  # by real path


class RunLock:
    """The exclusive lock on one run directory.

    Each `hold` of it is a user; `release` (or leaving a `with` block) ends one use, and the lock
    is dropped when none is left, or when the object is garbage (a `Run` keeps it while it lives).
    """

    def __init__(self, directory: Path, fd: int | None):
        self.directory = directory
        self._fd = fd  # None: a copy in another process of the same launch, which holds nothing
        self._users = 0
        self.taken = 0.0  # time.monotonic() of the last `hold`

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        self._users -= 1
        if self._users <= 0:
            self._close()

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    __del__ = _close

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __getstate__(self) -> dict:
        return {"directory": self.directory, "_fd": None, "_users": 0, "taken": 0.0}


def hold(run_dir: str | Path) -> RunLock:
    """Lock `run_dir` (an existing directory) for this process, or raise CfdpoError naming the holder."""
    directory = Path(run_dir)
    key = os.path.realpath(directory)
    lock = _held.get(key)
    if lock is None or not lock.held:
        lock = _held[key] = _acquire(directory)
    lock._users += 1
    lock.taken = time.monotonic()
    return lock


def _acquire(directory: Path) -> RunLock:
    path = directory / NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CfdpoError(f"{path}: is a link; expected the plain lock file cfdpo writes") from None
        raise CfdpoError(f"{directory}: output directory is not writable ({e.strerror}); "
                         "expected a directory you can write to") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise CfdpoError(f"{directory}: in use by {holder}; wait for it to finish or stop it") from None
    except BaseException:
        os.close(fd)
        raise
    lock = RunLock(directory, fd)
    try:
        record = json.dumps({"pid": os.getpid(), "command": command_line()}).encode() + b"\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
    except BaseException:
        lock._close()
        raise
    return lock


def held_dir(since: float = 0.0) -> Path | None:
    """The directory this process locked last (at or after `since`, a time.monotonic()) and still holds, or None."""
    held = [(lock.taken, lock.directory) for lock in list(_held.values()) if lock.held and lock.taken >= since]
    return max(held)[1] if held else None


def command_line() -> str:
    """This process's command line as the user typed it (`cfdpo evaluate runs/x`), shortened."""
    argv = list(sys.argv) or ["python"]
    first = Path(argv[0])
    argv[0] = first.parent.name if first.name == "__main__.py" else first.name  # python -m cfdpo -> cfdpo
    line = " ".join(argv)
    return line if len(line) <= 120 else line[:117] + "..."


def _read_holder(fd: int) -> str:
    try:
        record = json.loads(os.pread(fd, 4096, 0))
        return f"pid {int(record['pid'])} ({record['command']})"
    except (OSError, ValueError, TypeError, KeyError):  # the holder has not written its record yet
        return "another process"
