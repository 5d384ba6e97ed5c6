"""Files written whole or not at all: a temporary file beside the target, then a rename."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: Path, write: Callable[[Path], object], fail: Callable[[str], Exception]) -> None:
    """Call ``write(tmp)`` for a temporary file beside ``path``, then rename it to ``path``. A failed
    or interrupted write leaves ``path`` as it was and no temporary file; a failed write (disk full,
    file-size limit, no permission) raises ``fail(reason)``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch's file writer reports a failed write as RuntimeError
        tmp.unlink(missing_ok=True)
        raise fail(getattr(exc, "strerror", None) or str(exc).splitlines()[0]) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def directory_problem(path: str | os.PathLike) -> str | None:
    """Why files cannot be created in directory ``path`` (made if missing), or ``None``: it, or
    its nearest existing parent, must be a writable directory."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable"
    return None
