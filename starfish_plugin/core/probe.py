"""The ``recipe="auto"`` probe: choose the warm start and learning rate by measuring them.

Two stages, every score on the held-out samples:

1. Warm starts. Each of ``row_norm`` and ``lstsq`` is applied to the pruned weights and scored; the
   best one that improves on no warm start is kept (no training, so this stage is cheap).
2. Learning rates. From that warm start, each rate of ``PROBE_LRS`` (and the paper's recipe, when
   a warm start won) trains a few steps on a fixed subset of the training samples, with the same
   cosine schedule squeezed into those steps, and is scored; the lowest objective wins.

The probe costs at most ``probe_budget`` of the heal, counted in sample-forwards (a training
sample costs three: forward and backward; a warm start its passes and, for ``lstsq``, its sums
and solves in the same units): a warm start that does not fit is not tried, and the stage-2
steps are what is left; if not even one step per candidate fits, stage 2 is skipped and the
paper's learning rate is used. Every
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
from starfish_plugin.core.recipe import PAPER, PROBE_WARM_STARTS, Candidate, lr_candidates
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
    steps: int = 0  # training steps per learning-rate candidate (0: stage 2 skipped)
    samples: int = 0  # training samples each candidate saw
    budget_units: float = 0.0
    units: float = 0.0  # what the probe cost, in sample-forwards
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "choice": {"warm_start": self.choice.warm_start, "lr": self.choice.lr},
            "warm_starts": self.warm_starts, "over_budget": self.over_budget, "candidates": self.candidates,
            "steps": self.steps,
            "samples": self.samples, "budget_sample_forwards": self.budget_units,
            "cost_sample_forwards": self.units, "seconds": self.seconds,
        }

    def note(self) -> str:
        warm = ", ".join(f"{k} {v:.5f}" for k, v in self.warm_starts.items())
        if self.over_budget:
            warm += f" ({', '.join(self.over_budget)} not tried: over the budget)"
        tried = "; ".join(f"{c['warm_start']} lr={c['lr']:g}: {c['objective']:.5f}" for c in self.candidates)
        stage2 = (f"learning rates ({self.steps} steps each on {self.samples} samples): {tried}" if self.steps
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
    warm_start: Callable[[str], tuple[str, int]]  # apply a warm start in place: (report note, tensors changed)
    warm_cost: Callable[[str], float]  # what a warm start costs, in sample-forwards
    budget: float  # fraction of the heal's cost the probe may take


def _put(tensors: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for t, v in zip(tensors, values, strict=True):
            t.copy_(v)


def _heal_units(ctx: ProbeContext) -> float:
    """The heal's cost in sample-forwards: every epoch trains on every sample and judges once."""
    s = ctx.setup
    per_eval = ctx.start.samples * (1 if ctx.judge.cache is not None else 2)
    return s.config.epochs * (TRAIN_COST * s.n_total + per_eval)


def run_probe(ctx: ProbeContext) -> ProbeResult:
    """Choose the warm start and learning rate; leaves the trained tensors as they were."""
    began = time.perf_counter()
    s = ctx.setup
    tensors = ctx.tensors
    per_eval = ctx.start.samples * (1 if ctx.judge.cache is not None else 2)
    budget = ctx.budget * _heal_units(ctx)
    units = 0.0
    # stage 1: warm starts, scored without training
    scores = {"none": ctx.start}
    warmed: dict[str, list[torch.Tensor]] = {"none": ctx.backup}
    notes: dict[str, tuple[str, int]] = {}
    skipped: list[str] = []
    for kind in PROBE_WARM_STARTS:
        cost = ctx.warm_cost(kind) + per_eval
        if units + cost > budget:
            skipped.append(kind)
            continue
        notes[kind] = ctx.warm_start(kind)
        changed = notes[kind][1]
        units += cost
        if changed:
            scores[kind] = ctx.judge.score()
            warmed[kind] = [t.detach().clone() for t in tensors]
        _put(tensors, ctx.backup)
    best_warm = "none"
    for kind, score in scores.items():
        if kind != "none" and score.improves_on(scores[best_warm]):
            best_warm = kind
    result = ProbeResult(Candidate(best_warm, PAPER.lr), {k: v.objective for k, v in scores.items()},
                         over_budget=skipped)
    # stage 2: learning rates, a few steps each
    candidates = lr_candidates(best_warm)
    batch = s.dist.batch_size(s.config.batch_size)
    per_step = TRAIN_COST * batch * s.dist.world
    steps = int((budget - units - len(candidates) * per_eval) // (len(candidates) * per_step))
    local = len(s.rows) if s.rows is not None else len(s.data)
    steps = min(steps, local // batch)  # a subset of one epoch at most
    if steps >= 1:
        order = torch.randperm(local, generator=torch.Generator().manual_seed(s.config.seed + PROBE_SEED_OFFSET))
        rows = order[: steps * batch]
        if s.rows is not None:
            rows = s.rows[rows]
        best_rank: tuple[bool, float] | None = None
        for cand in candidates:
            _put(tensors, warmed[cand.warm_start])
            config = s.config.replace(lr=cand.lr, warm_start=cand.warm_start, epochs=1, compile="none")
            probe_setup = TrainSetup(
                s.model, s.plan, s.params, s.targets, s.data, s.loss_fn, config, s.device, _Quiet(), s.dist,
                None, len(rows) * s.dist.world, steps, rows=rows,
            )
            try:
                TrainLoop(probe_setup, []).run()
                score = ctx.judge.score()
            except NonFiniteError:  # this learning rate diverges here: never chosen
                score = HeldOutScore(math.inf, {}, None, ctx.start.samples)
            units += steps * per_step + per_eval
            result.candidates.append({"warm_start": cand.warm_start, "lr": cand.lr, "objective": score.objective,
                                      "output_cosine": score.output_cosine})
            objective = score.objective if math.isfinite(score.objective) else math.inf
            rank = (score.improves_on(ctx.start), -objective)  # an improvement first, then the lowest
            if best_rank is None or rank > best_rank:
                best_rank, result.choice = rank, cand
        result.steps, result.samples = steps, len(rows) * s.dist.world
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
