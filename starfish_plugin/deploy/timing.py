"""Interleaved timing: every candidate runs once per round, in a rotating order, so drift on a
shared machine hits all of them alike; medians over rounds; clearly slower candidates stop being
timed early."""

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
    abandon: bool = True,
    abandon_after: int = 3,
    abandon_ratio: float = 2.0,
) -> dict[str, list[float]]:
    """Seconds per call of each candidate over ``repeats`` interleaved rounds.

    The first warm-up call of each candidate is timed: one slower than ``2 * abandon_ratio`` times
    the baseline's is not timed further (its list holds that one time). After ``abandon_after``
    rounds, a candidate whose median is over ``abandon_ratio`` times the baseline's stops too (it
    cannot win); its list is shorter. So a kernel 20x slower than dense costs a call, not a run.
    """
    sync = synchronizer(device)
    first: dict[str, float] = {}
    for name, fn in candidates.items():
        sync()
        start = time.perf_counter()
        fn()
        sync()
        first[name] = time.perf_counter() - start
    times: dict[str, list[float]] = {name: [] for name in candidates}
    active = list(candidates)
    if abandon and baseline in candidates:
        for name in [n for n in active if n != baseline and first[n] > 2 * abandon_ratio * first[baseline]]:
            times[name].append(first[name])
            active.remove(name)
    for fn in (candidates[n] for n in active):
        for _ in range(warmup - 1):
            fn()
    sync()
    for round_ in range(repeats):
        shift = round_ % len(active)  # rotate the order: no candidate always runs first (or after the same one)
        for name in active[shift:] + active[:shift]:
            start = time.perf_counter()
            candidates[name]()
            sync()
            times[name].append(time.perf_counter() - start)
        if abandon and round_ + 1 == abandon_after and baseline in candidates:
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
