"""Shared helpers for the benchmarks: hardware description, medians, JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from starfish_plugin.plugins.hookspecs import hookimpl

RESULTS = Path(__file__).parent / "results"


def hardware() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cuda_driver": _nvidia_driver() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
    }


def _nvidia_driver() -> str | None:
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def save_record(path: Path, meta: dict) -> None:
    """Write a checkpoint's JSON record beside it and print it."""
    path.write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta, indent=2))


def guarded_case(run: Callable[..., dict], *args: Any, identity: dict) -> dict:
    """``run(*args)`` with the toolkits' warnings silenced; a failure of the benchmark itself becomes
    an ``"error"`` row (``identity`` plus the reason and traceback) instead of ending the run."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return run(*args)
        except Exception as exc:  # noqa: BLE001 - the benchmark's own failure: recorded, not fatal
            return identity | {"status": "error", "reason": f"benchmark: {type(exc).__name__}: {exc}"[:300],
                               "traceback": traceback.format_exc(limit=-3)}


def median(values: list[float]) -> float:
    return statistics.median(values)


def save(name: str, payload: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def rss_bytes(field: str = "VmRSS") -> int:
    """Current (VmRSS) or peak (VmHWM) resident memory of this process, from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux); returns False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def trim_heap() -> None:
    """Return freed heap memory to the OS (glibc ``malloc_trim``); a no-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class EpochTimes:
    """A starfish plugin that records each epoch's seconds (the ``starfish_epoch_ended`` hook)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    @hookimpl
    def starfish_epoch_ended(self, epoch, epochs, loss, lr, seconds, config):
        self.seconds.append(seconds)


def heal_with_epoch_times(model, dense, images, config, **overrides):
    """``starfish.heal`` with an ``EpochTimes`` plugin registered; returns (report, epoch seconds)."""
    import starfish_plugin as starfish

    times = EpochTimes()
    pm = starfish.plugin_manager()
    pm.register(times)
    try:
        return starfish.heal(model, dense, images, config, **overrides), times.seconds
    finally:
        pm.unregister(times)
