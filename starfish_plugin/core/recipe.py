"""Recipes: the warm starts a heal can begin with, and what ``recipe="auto"`` chooses among.

``recipe="auto"`` (the default) measures instead of assuming: when the user left ``lr`` and
``warm_start`` at the paper's values, a short probe (``core/probe.py``) scores the row-norm warm
start against none on the held-out samples, then trains each learning rate briefly from the
better one and heals with the winner. ``recipe="paper"``, or any ``lr`` / ``warm_start`` the user
sets, is used as given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from starfish_plugin.config import HealConfig
from starfish_plugin.core.lstsq import lstsq_recover_
from starfish_plugin.core.modes import eval_mode
from starfish_plugin.core.plan import SparsityPlan
from starfish_plugin.core.warm_start import row_norm_warm_start_
from starfish_plugin.data.calibration import CalibrationData

PAPER = HealConfig(recipe="paper")
# Scored against no warm start. lstsq is not among them: after training it ends below row_norm
# (vision suite, 1,000 images x 10 epochs, 3 seeds, lr 4e-3: 0.9 86.76 vs 87.32, 0.95 83.25 vs
# 85.25, 2:4 87.92 vs 88.04; python -m benchmarks.recovery warm_starts), and costs about an epoch.
PROBE_WARM_STARTS = ("row_norm",)
# What a warm start costs per calibration sample, in forward passes of the model: row_norm runs the
# dense model and one more product per pruned layer.
WARM_UNITS_PER_SAMPLE = {"row_norm": 2.0}
MIN_WARM_SAMPLES = 32  # the probe tries a warm start only when it affords at least this many samples
PROBE_LRS = (6e-4, 2e-3, 4e-3)  # trained briefly from the chosen warm start; 6e-4 is the paper's


@dataclass(frozen=True)
class Candidate:
    """One recipe the probe tries: a warm start and a peak learning rate."""

    warm_start: str
    lr: float

    @property
    def name(self) -> str:
        return f"{self.warm_start}, lr={self.lr:g}"


def auto_applies(config: HealConfig) -> bool:
    """Whether ``recipe="auto"`` may choose: the user left ``lr`` and ``warm_start`` as the paper has them."""
    return config.recipe == "auto" and config.lr == PAPER.lr and config.warm_start == PAPER.warm_start


def lr_candidates(warm_start: str) -> list[Candidate]:
    """The learning rates tried from ``warm_start`` (the paper's first). The paper's recipe itself
    (no warm start, its rate) is among them unless a warm start scored better than none."""
    return [Candidate(warm_start, lr) for lr in PROBE_LRS]


@torch.no_grad()
def apply_warm_start(
    kind: str,
    plan: SparsityPlan,
    pruned: nn.Module,
    dense: nn.Module,
    data: CalibrationData,
    config: HealConfig,
    device: torch.device,
    blocks: Sequence[str],
    samples: int | None = None,
) -> tuple[str, int]:
    """Apply warm start ``kind`` (``"row_norm"`` or ``"lstsq"``) on the first ``warm_start_samples``
    calibration samples (``samples`` if given), in place; return a report note and the number of
    tensors changed."""
    n = min(samples if samples is not None else config.warm_start_samples, len(data))
    with eval_mode(pruned), eval_mode(dense):  # never update batch-norm statistics (train_mode heals)
        return _apply(kind, plan, pruned, dense, data, config, device, blocks, n)


def _apply(
    kind: str, plan: SparsityPlan, pruned: nn.Module, dense: nn.Module, data: CalibrationData, config: HealConfig,
    device: torch.device, blocks: Sequence[str], n: int,
) -> tuple[str, int]:
    batches = [x.to(device) for x in data.head(n).split(config.batch_size)]
    if kind == "row_norm":
        result = row_norm_warm_start_(plan, dense, batches)
        note = (f"warm start row_norm on {n} samples: {len(result['rescaled'])} tensors rescaled, "
                f"median gain {result['median_gain']:.2f}")
        changed, skipped = result["rescaled"], result["skipped"]
    elif kind == "lstsq":
        solved = lstsq_recover_(plan, pruned, dense, batches, blocks)
        note = (f"warm start lstsq on {n} samples: {len(solved['solved'])} tensors solved in closed form "
                f"({solved['rows']} rows, {solved['passes']} passes)")
        changed, skipped = solved["solved"], solved["skipped"]
    else:
        raise ValueError(f"unknown warm start {kind!r}")
    if skipped:
        note += f"; left as they were (not a Linear/Conv weight this warm start can change, or tied): {skipped[:5]}"
    return note, len(changed)
