"""SIGTERM and SIGHUP during a heal end it the way Ctrl-C does: as an exception, so that weights
are restored and temporary files and directories are removed on the way out."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None)


class Terminated(SystemExit):
    """Raised in the healing thread when the process receives SIGTERM or SIGHUP; exits with
    ``128 + signal number`` if nothing catches it, like the default action."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


def _raise(signum: int, _frame: Any) -> None:
    raise Terminated(signum)


@contextmanager
def signals_as_exceptions() -> Iterator[None]:
    """While the block runs (main thread only), SIGTERM and SIGHUP left at their default action
    raise ``Terminated`` instead of killing the process; handlers the program set stay untouched."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for sig in SIGNALS:
        if signal.getsignal(sig) is signal.SIG_DFL:
            previous[sig] = signal.signal(sig, _raise)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
