"""One writer per output: an advisory `fcntl.flock` on a lock file beside a checkpoint, in a run directory or
beside a sweep store.

The kernel drops the lock when its holder dies, however it dies (SIGKILL included), so a lock file left by a dead
process is stale by construction: the next writer takes it over. The file records the holder's pid and host,
which a refused writer names. Re-entrant within one process (a stage inside `compress` locks its checkpoint
while `compress` holds the run directory).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from .errors import KdexportError

DIR_LOCK = ".kdexport.lock"
_held: dict[str, int] = {}  # lock file -> depth, for this process


class OutputBusy(KdexportError):
    """Another live process is writing this output."""


def lock_file(path: str | Path, directory: bool = False) -> Path:
    """The lock file of an output: DIR/.kdexport.lock for a directory, .NAME.lock beside a file."""
    path = Path(path)
    return path / DIR_LOCK if directory else path.with_name(f".{path.name}.lock")


@contextlib.contextmanager
def output_lock(path: str | Path, *, directory: bool = False) -> Iterator[None]:
    """Hold the write lock of `path` for the block; OutputBusy (one line: holder pid and host) if it is taken."""
    lock = lock_file(path, directory)
    created = [d for d in (lock.parent, *lock.parent.parents) if not d.exists()]  # deepest first
    lock.parent.mkdir(parents=True, exist_ok=True)
    key = str(lock.resolve())
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    try:
        fd = _acquire(lock, path)
    except BaseException:
        _remove_empty(created)
        raise
    _held[key] = 1
    try:
        yield
    finally:
        del _held[key]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)  # still ours: whoever opens it next sees a new inode and retries (see _acquire)
        os.close(fd)
        _remove_empty(created)  # a run that failed before writing anything leaves no empty directory behind


def _remove_empty(dirs: list[Path]) -> None:
    for d in dirs:
        try:
            d.rmdir()
        except OSError:  # not empty (something was written), or not ours to remove
            return


def _acquire(lock: Path, path: str | Path) -> int:
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise OutputBusy(f"{path} is being written by {holder}; wait for it to finish, or choose another "
                             "output") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:  # else: the holder released and unlinked it between our open and flock; open the new one
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
            return fd
        os.close(fd)


@contextlib.contextmanager
def waiting_lock(directory: str | Path) -> Iterator[None]:
    """Hold an exclusive flock on `directory` itself for a short critical section, waiting while another process
    holds it (unlike output_lock, which refuses). It leaves no file behind."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock
