"""Held-out judgement: a part of the calibration set that healing never trains on, and the score
that decides whether a healed state is better than the pruned model it started from.

The score has two parts, both measured against the dense model on the held-out samples: the
healing objective itself (the loss, every block weighted equally) and the cosine of the model's
final output. A state *improves* on another only if its objective is lower and its final output
is no further from the dense one: healing may never buy block alignment with a worse output.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from starfish_plugin.base.model_io import attention_mask, call_model, main_output, token_ids
from starfish_plugin.base.outputs import ChannelIndex, capture_outputs
from starfish_plugin.core.losses import HealLoss, cosine_distance
from starfish_plugin.core.modes import eval_mode
from starfish_plugin.core.plan import SparsityPlan
from starfish_plugin.data.calibration import CalibrationData
from starfish_plugin.data.targets import LOGITS, dense_outputs
from starfish_plugin.runtime.distributed import DistContext

MIN_HOLDOUT = 32  # samples held out at least (half the set when it has fewer than twice as many)
SPLIT_SEED_OFFSET = 7919  # the split's random stream differs from the training shuffle's
DENSE_CACHE_BYTES = 512 * 1024**2  # held-out dense outputs are kept in memory up to this size


def holdout_size(n: int, fraction: float) -> int:
    """Samples held out of ``n``: ``ceil(fraction * n)``, at least ``MIN_HOLDOUT`` (or half of a
    set smaller than ``2 * MIN_HOLDOUT``); 0 when ``fraction`` is 0 or ``n < 2``."""
    if fraction <= 0 or n < 2:
        return 0
    return min(max(math.ceil(fraction * n), min(MIN_HOLDOUT, n // 2)), n - 1)


def split_rows(n: int, fraction: float, seed: int, held: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train_rows, held_rows)``: a random split of ``range(n)`` fixed by ``seed``, both sorted,
    with ``holdout_size(n, fraction)`` rows held out (or ``held``, at most ``n - 1``). They never
    overlap and together cover every row."""
    held = holdout_size(n, fraction) if held is None else min(held, max(n - 1, 0)) if fraction > 0 else 0
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + SPLIT_SEED_OFFSET))
    return order[held:].sort().values, order[:held].sort().values


@dataclass(frozen=True)
class HeldOutScore:
    """One state's score on the held-out samples.

    Attributes:
        objective: the healing loss (every block weighted equally): lower is better.
        block_cosine: per block, the mean cosine of its output to the dense block's.
        output_cosine: cosine of the model's final output to the dense model's (``None`` where
            structural pruning narrowed the output, so the two cannot be compared).
        samples: held-out samples it was measured on (over every rank).
    """

    objective: float
    block_cosine: dict[str, float]
    output_cosine: float | None
    samples: int

    @property
    def mean_cosine(self) -> float:
        values = list(self.block_cosine.values())
        return sum(values) / len(values) if values else float("nan")

    def improves_on(self, other: HeldOutScore) -> bool:
        """A lower objective and a final output no further from the dense model's."""
        if not self.objective < other.objective:  # NaN never improves
            return False
        if self.output_cosine is not None and other.output_cosine is not None:
            return self.output_cosine >= other.output_cosine
        return True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Judgement:
    """Scores of a heal's states in order (``"start"``, ``"warm start"``, ``"epoch 1"``, ...), the best
    so far, and the early-stopping count; saved in checkpoints so a resumed heal judges alike."""

    history: list[tuple[str, HeldOutScore]] = field(default_factory=list)
    best: str = "start"
    since_best: int = 0

    @property
    def start(self) -> HeldOutScore:
        return self.history[0][1]

    def score_of(self, stage: str) -> HeldOutScore:
        return dict(self.history)[stage]

    def record(self, stage: str, score: HeldOutScore) -> bool:
        """Add ``score``; returns whether it is the new best (it improves on the best so far)."""
        self.history.append((stage, score))
        if len(self.history) == 1:
            return False
        if score.improves_on(self.score_of(self.best)):
            self.best, self.since_best = stage, 0
            return True
        self.since_best += 1
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"history": [(s, sc.to_dict()) for s, sc in self.history], "best": self.best,
                "since_best": self.since_best}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Judgement:
        history = [(s, HeldOutScore(**sc)) for s, sc in state["history"]]
        return cls(history, state["best"], state["since_best"])


def judged_facts(start: HeldOutScore, final: HeldOutScore, returned: str,
                 history: list[tuple[str, HeldOutScore]]) -> dict[str, Any]:
    """The report's judgement fields: the start's and the returned state's scores, and every state judged."""
    return {
        "held_out_samples": start.samples, "held_out_before": start.objective, "held_out_after": final.objective,
        "output_cosine_before": start.output_cosine, "output_cosine_after": final.output_cosine,
        "returned_state": returned, "held_out_history": [
            {"stage": stage, "objective": sc.objective, "mean_cosine": sc.mean_cosine,
             "output_cosine": sc.output_cosine} for stage, sc in history],
    }


class HeldOutJudge:
    """Scores the pruned model's current state on the held-out samples (eval mode, no gradients)."""

    def __init__(
        self,
        model: nn.Module,
        plan: SparsityPlan,
        dense: nn.Module,
        data: CalibrationData,
        loss_fn: HealLoss,
        device: torch.device,
        batch_size: int,
        dist: DistContext,
        index: ChannelIndex | None = None,
        output_comparable: bool = True,
    ) -> None:
        self.model, self.plan, self.dense, self.data = model, plan, dense, data
        self.device, self.batch_size, self.dist, self.index = device, batch_size, dist, index or {}
        self.output_comparable = output_comparable
        # the objective weighs every block alike, whatever weighting the training uses
        self.loss = HealLoss(loss_fn.terms, loss_fn.blocks, loss_fn.reduction, loss_fn.temperature, "uniform")
        self.cache: list[dict[str, torch.Tensor]] | None = None

    @property
    def blocks(self) -> list[str]:
        return self.loss.blocks

    def _dense(self, batch: int, x: Any) -> dict[str, torch.Tensor]:
        if self.cache is not None and batch < len(self.cache):
            return {k: v.to(self.device) for k, v in self.cache[batch].items()}
        out = dense_outputs(self.dense, self.blocks, x, True, self.index)
        if self.cache is not None:
            self.cache.append({k: v.cpu() for k, v in out.items()})
        return out

    @torch.no_grad()
    def score(self) -> HeldOutScore:
        """The current state's ``HeldOutScore`` (summed over ranks under torch.distributed)."""
        blocks = self.blocks
        if self.cache is None and self._cache_fits():
            self.cache = []
        sums = torch.zeros(len(blocks) + 3, dtype=torch.float64)  # blocks, objective, output, samples
        with eval_mode(self.dense), eval_mode(self.model), capture_outputs(self.model, blocks) as outputs:
            for batch, (_, x, y) in enumerate(self.data.batches(self.batch_size)):
                x = x.to(self.device)
                y = None if y is None else y.to(self.device)
                dense = self._dense(batch, x)
                self.plan.refresh()
                logits = main_output(call_model(self.model, x))
                tokens, n = attention_mask(x), len(x)
                ids = token_ids(x) if self.loss.needs_token_ids else None
                for i, b in enumerate(blocks):
                    sums[i] += (1.0 - float(cosine_distance(outputs[b], dense[b], self.loss.reduction, tokens))) * n
                sums[-3] += float(self.loss(outputs, logits, dense, y, tokens, ids)) * n
                if self.output_comparable:
                    out_cos = 1.0 - float(cosine_distance(logits, dense[LOGITS], self.loss.reduction, tokens))
                    sums[-2] += out_cos * n
                sums[-1] += n
        sums = self.dist.sum(sums)
        n_all = float(sums[-1])
        return HeldOutScore(
            objective=float(sums[-3]) / n_all,
            block_cosine={b: float(sums[i]) / n_all for i, b in enumerate(blocks)},
            output_cosine=float(sums[-2]) / n_all if self.output_comparable else None,
            samples=int(n_all),
        )

    def _cache_fits(self) -> bool:
        """Whether the dense outputs of every held-out sample fit ``DENSE_CACHE_BYTES`` (fp32)."""
        if len(self.data) == 0:  # a rank with no held-out share
            return False
        x = self.data.head(1).to(self.device)
        one = dense_outputs(self.dense, self.blocks, x, True, self.index)
        return sum(t.numel() * 4 for t in one.values()) * len(self.data) <= DENSE_CACHE_BYTES
