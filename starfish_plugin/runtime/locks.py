"""Advisory file locks (``flock``) that keep concurrent heals apart: one heal per checkpoint file,
and no dense-target cache removed while another heal reads it.

Locks are tied to the open file, so a heal that dies for any reason (even SIGKILL) releases them.
On a system without ``fcntl`` (Windows) they are no-ops, and concurrent heals there must use
separate directories.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (a holder may have removed it)."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def try_exclusive(path: Path, create: bool = True) -> int | None:
    """An open descriptor of ``path`` holding an exclusive lock, or ``None`` if another process
    holds a lock on it (or, with ``create=False``, it does not exist)."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
        except FileNotFoundError:
            return None
        if fcntl is None:
            return fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        if _same_file(fd, path):
            return fd
        os.close(fd)  # the file was removed (and maybe re-created) between open and lock: retry
        if not create:
            return None


def shared(path: Path) -> int | None:
    """An open descriptor of the existing ``path`` holding a shared lock (waiting for an exclusive
    holder), or ``None`` if ``path`` is gone or was replaced meanwhile."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_SH)
    if _same_file(fd, path):
        return fd
    os.close(fd)
    return None


def holder_of(path: Path) -> str:
    """What the lock file says about its holder (``"pid 1234"``), for messages."""
    try:
        text = path.read_text().strip()
    except OSError:
        return "another process"
    return f"pid {text}" if text.isdigit() else "another process"


@contextmanager
def exclusive_lock(path: Path, busy: Callable[[str], Exception]) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created, holding our pid, and removed on release);
    raise ``busy(holder)`` at once if another process holds it."""
    fd = try_exclusive(path)
    if fd is None:
        raise busy(holder_of(path))
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        path.unlink(missing_ok=True)  # while still locked: a waiter then sees a replaced file and retries
        os.close(fd)
