"""The ``recipe="auto"`` probe: choose the warm start and learning rate by measuring them.

Two stages, every score on the held-out samples:

1. Warm starts. Each of ``PROBE_WARM_STARTS`` (``row_norm``) is applied to the pruned weights and
   scored; the best one that improves on no warm start is kept (no training: this stage is cheap).
2. Learning rates. From that warm start, each rate of ``PROBE_LRS`` trains a few steps on a fixed
   subset of the training samples, with the same cosine schedule squeezed into those steps, and is
   scored; the lowest objective wins. When the budget affords fewer than two steps each, one step
   is taken and scaled to each rate instead: Adam's first step points the same way whatever the
   rate, so this is a line search along it, for the cost of one step.

The probe costs at most ``probe_budget`` of the heal, counted in sample-forwards (a training
sample costs three: forward and backward; the row-norm warm start two). The cheapest
learning-rate stage (the line search) is set aside first; the warm start measures on as many
calibration samples as the rest affords (up to ``warm_start_samples``; not tried under
``MIN_WARM_SAMPLES``); the stage-2 steps are what is left; if not even the line search fits,
stage 2 is skipped and the paper's learning rate is used. Every
candidate starts from the same weights, and afterwards the pruned weights are back exactly as
they were. The probe is deterministic: same seed, same choice.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from starfish_plugin.config import HealConfig
from starfish_plugin.core.holdout import HeldOutJudge, HeldOutScore
from starfish_plugin.core.loop import TrainLoop, TrainSetup
from starfish_plugin.core.recipe import (
    MIN_WARM_SAMPLES,
    PAPER,
    PROBE_LRS,
    PROBE_WARM_STARTS,
    WARM_UNITS_PER_SAMPLE,
    Candidate,
    lr_candidates,
)
from starfish_plugin.errors import NonFiniteError

PROBE_SEED_OFFSET = 104729  # the probe's sample subset has its own random stream
TRAIN_COST = 3  # sample-forwards per training sample (forward + backward)


class _Quiet:
    """Hook relay for the probe's short runs: the progress hooks stay silent."""

    def starfish_step_ended(self, **_kwargs: Any) -> None:
        pass

    def starfish_epoch_ended(self, **_kwargs: Any) -> None:
        pass


@dataclass
class ProbeResult:
    """What the probe tried and chose (``HealReport.recipe_probe`` holds ``to_dict()``)."""

    choice: Candidate
    warm_starts: dict[str, float]  # held-out objective after each warm start ("none": the start)
    warmed: list[torch.Tensor] | None = None  # the tensors after the chosen warm start (the heal starts there)
    warm_score: HeldOutScore | None = None  # and their score
    warm_note: str = ""  # what the chosen warm start did
    warm_changed: int = 0  # tensors it changed
    candidates: list[dict[str, Any]] = field(default_factory=list)  # warm_start, lr, objective, output_cosine
    over_budget: list[str] = field(default_factory=list)  # warm starts not tried: they cost more than the budget
    warm_start_samples: int = 0  # the samples the warm starts measured on (fewer than configured on a small budget)
    steps: int = 0  # training steps per learning-rate candidate (0: stage 2 skipped)
    line_search: bool = False  # stage 2 took one step and scaled it to each rate
    samples: int = 0  # training samples each candidate saw
    budget_units: float = 0.0
    units: float = 0.0  # what the probe cost, in sample-forwards
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "choice": {"warm_start": self.choice.warm_start, "lr": self.choice.lr},
            "warm_starts": self.warm_starts, "over_budget": self.over_budget,
            "warm_start_samples": self.warm_start_samples, "candidates": self.candidates,
            "steps": self.steps, "line_search": self.line_search,
            "samples": self.samples, "budget_sample_forwards": self.budget_units,
            "cost_sample_forwards": self.units, "seconds": self.seconds,
        }

    def note(self) -> str:
        warm = ", ".join(f"{k} {v:.5f}" for k, v in self.warm_starts.items())
        if self.over_budget:
            warm += f" ({', '.join(self.over_budget)} not tried: over the budget)"
        tried = "; ".join(f"{c['warm_start']} lr={c['lr']:g}: {c['objective']:.5f}" for c in self.candidates)
        how = ("one step scaled to each rate (a line search)" if self.line_search
               else f"{self.steps} steps each on {self.samples} samples")
        stage2 = (f"learning rates ({how}): {tried}" if self.steps
                  else "learning rates not probed (the budget affords no step), the paper's lr is used")
        return (f"recipe='auto' probe ({self.seconds:.1f} s): held-out objective after warm starts: {warm}; "
                f"{stage2}; chosen: {self.choice.name}")


@dataclass
class ProbeContext:
    """What the probe needs from the heal."""

    setup: TrainSetup  # the heal's own; the probe trains on copies of it with other settings
    judge: HeldOutJudge
    start: HeldOutScore
    tensors: list[torch.Tensor]  # what a restore puts back: the trained tensors (and train-mode buffers)
    backup: list[torch.Tensor]  # ``tensors`` as they were before healing
    warm_start: Callable[[str, int], tuple[str, int]]  # apply one in place on n samples: (note, tensors changed)
    budget: float  # fraction of the heal's cost the probe may take


def _put(tensors: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for t, v in zip(tensors, values, strict=True):
            t.copy_(v)


def _heal_units(ctx: ProbeContext) -> float:
    """The heal's cost in sample-forwards: its dense targets (a forward of every training sample),
    and every epoch, which trains on every sample and judges once."""
    s = ctx.setup
    per_eval = ctx.start.samples * (1 if ctx.judge.cache is not None else 2)
    return s.n_total + per_eval + s.config.epochs * (TRAIN_COST * s.n_total + per_eval)


def _rank(score: HeldOutScore, start: HeldOutScore) -> tuple[bool, float]:
    """Candidates that improve on the start first, then the lowest objective (NaN/Inf last)."""
    objective = score.objective if math.isfinite(score.objective) else math.inf
    return score.improves_on(start), -objective


def _train(ctx: ProbeContext, rows: torch.Tensor, steps: int, lr: float, warm_start: str) -> HeldOutScore | None:
    """Train ``steps`` steps on ``rows`` at ``lr`` (the cosine schedule squeezed into them); ``None``
    if the loss diverged."""
    s = ctx.setup
    config = s.config.replace(lr=lr, warm_start=warm_start, epochs=1, compile="none")
    setup = TrainSetup(s.model, s.plan, s.params, s.targets, s.data, s.loss_fn, config, s.device, _Quiet(), s.dist,
                       None, len(rows) * s.dist.world, steps, rows=rows)
    try:
        TrainLoop(setup, []).run()
    except NonFiniteError:  # this learning rate diverges here: never chosen
        return None
    return ctx.judge.score()


def _learning_rates(ctx: ProbeContext, result: ProbeResult, warmed: list[torch.Tensor], units: float,
                    budget: float, per_eval: float) -> float:
    """Stage 2: each learning rate trains ``steps`` steps from ``warmed`` and is scored; when the
    budget affords fewer than two steps each, one step is taken at the first rate and scaled to the
    others instead (Adam's first step points the same way at any rate: a line search along it).
    Returns the units spent."""
    s = ctx.setup
    candidates = lr_candidates(result.choice.warm_start)
    batch = s.dist.batch_size(s.config.batch_size)
    per_step = TRAIN_COST * batch * s.dist.world
    local = len(s.rows) if s.rows is not None else len(s.data)
    left = budget - units - len(candidates) * per_eval
    steps = min(int(left // (len(candidates) * per_step)), local // batch)  # a subset of one epoch at most
    line_search = steps < 2
    if line_search:
        steps = 1 if left >= per_step and local >= batch else 0
    if steps == 0:
        return 0.0
    order = torch.randperm(local, generator=torch.Generator().manual_seed(s.config.seed + PROBE_SEED_OFFSET))
    rows = order[: steps * batch]
    rows = s.rows[rows] if s.rows is not None else rows
    best: tuple[bool, float] | None = None
    step: list[torch.Tensor] = []
    if line_search:
        _put(ctx.tensors, warmed)
        base = candidates[0].lr
        if _train(ctx, rows, 1, base, result.choice.warm_start) is not None:
            step = [(t.detach() - w) / base for t, w in zip(ctx.tensors, warmed, strict=True)]
    for cand in candidates:
        if line_search:
            if step:
                with torch.no_grad():
                    for t, w, d in zip(ctx.tensors, warmed, step, strict=True):
                        t.copy_(w + cand.lr * d if t.is_floating_point() else w)
            score = ctx.judge.score() if step else None
        else:
            _put(ctx.tensors, warmed)
            score = _train(ctx, rows, steps, cand.lr, cand.warm_start)
        score = score if score is not None else HeldOutScore(math.inf, {}, None, ctx.start.samples)
        result.candidates.append({"warm_start": cand.warm_start, "lr": cand.lr, "objective": score.objective,
                                  "output_cosine": score.output_cosine})
        if best is None or _rank(score, ctx.start) > best:
            best, result.choice = _rank(score, ctx.start), cand
    result.steps, result.samples = steps, len(rows) * s.dist.world
    result.line_search = line_search
    return (1 if line_search else len(candidates)) * steps * per_step + len(candidates) * per_eval


def run_probe(ctx: ProbeContext) -> ProbeResult:
    """Choose the warm start and learning rate; leaves the trained tensors as they were."""
    began = time.perf_counter()
    tensors = ctx.tensors
    per_eval = ctx.start.samples * (1 if ctx.judge.cache is not None else 2)
    budget = ctx.budget * _heal_units(ctx)
    units = 0.0
    s = ctx.setup
    # the learning-rate stage's cheapest form (a line search) is set aside first: the rate matters most
    line_search = TRAIN_COST * s.dist.batch_size(s.config.batch_size) * s.dist.world + len(PROBE_LRS) * per_eval
    # stage 1: warm starts, scored without training, on as many samples as the rest of the budget affords
    scores = {"none": ctx.start}
    warmed: dict[str, list[torch.Tensor]] = {"none": ctx.backup}
    notes: dict[str, tuple[str, int]] = {}
    skipped: list[str] = []
    samples = 0
    for kind in PROBE_WARM_STARTS:
        affordable = (budget - line_search - units - per_eval) / WARM_UNITS_PER_SAMPLE[kind]
        samples = int(min(s.config.warm_start_samples, len(s.data), affordable))
        if samples < min(MIN_WARM_SAMPLES, len(s.data)) or samples < 1:
            skipped.append(kind)
            continue
        notes[kind] = ctx.warm_start(kind, samples)
        units += WARM_UNITS_PER_SAMPLE[kind] * samples + per_eval
        if notes[kind][1]:
            scores[kind] = ctx.judge.score()
            warmed[kind] = [t.detach().clone() for t in tensors]
        _put(tensors, ctx.backup)
    best_warm = "none"
    for kind, score in scores.items():
        if kind != "none" and score.improves_on(scores[best_warm]):
            best_warm = kind
    result = ProbeResult(Candidate(best_warm, PAPER.lr), {k: v.objective for k, v in scores.items()},
                         over_budget=skipped, warm_start_samples=samples if notes else 0)
    units += _learning_rates(ctx, result, warmed[best_warm], units, budget, per_eval)
    _put(tensors, ctx.backup)
    if result.choice.warm_start != "none":
        kind = result.choice.warm_start
        result.warmed, result.warm_score = warmed[kind], scores[kind]
        result.warm_note, result.warm_changed = notes[kind]
    result.budget_units, result.units = budget, units
    result.seconds = time.perf_counter() - began
    return result


def chosen_config(config: HealConfig, choice: Candidate) -> HealConfig:
    """``config`` with the probe's choice applied."""
    return config.replace(lr=choice.lr, warm_start=choice.warm_start)
