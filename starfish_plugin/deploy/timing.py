"""Interleaved timing: every candidate runs once per round, so drift on a shared machine hits all
of them alike; medians over rounds; clearly slower candidates stop being timed early."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def synchronizer(device: torch.device) -> Callable[[], None]:
    """A function that waits for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def interleaved_times(
    candidates: dict[str, Callable[[], object]],
    repeats: int,
    device: torch.device,
    baseline: str = "dense",
    warmup: int = 2,
    abandon_after: int = 3,
    abandon_ratio: float = 2.0,
) -> dict[str, list[float]]:
    """Seconds per call of each candidate over ``repeats`` interleaved rounds.

    After ``abandon_after`` rounds, a candidate whose median is over ``abandon_ratio`` times the
    baseline's is not timed further (it cannot win); its list is shorter.
    """
    sync = synchronizer(device)
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    active = list(candidates)
    for round_ in range(repeats):
        for name in active:
            start = time.perf_counter()
            candidates[name]()
            sync()
            times[name].append(time.perf_counter() - start)
        if round_ + 1 == abandon_after and baseline in candidates:
            limit = abandon_ratio * statistics.median(times[baseline])
            active = [n for n in active if n == baseline or statistics.median(times[n]) <= limit]
    return times


def faster_beyond_noise(candidate: list[float], baseline: list[float], margin: float) -> bool:
    """Whether ``candidate`` beats ``baseline`` in the same interleaved rounds: the median of the
    per-round ratios is below ``1 - margin`` and the candidate won at least two rounds in three
    (a sign test that drift on a shared machine cannot fake, since both ran in every round)."""
    ratios = [c / b for c, b in zip(candidate, baseline)]
    if len(ratios) < 3:
        return False
    wins = sum(r < 1 for r in ratios)
    return statistics.median(ratios) < 1 - margin and 3 * wins >= 2 * len(ratios)
