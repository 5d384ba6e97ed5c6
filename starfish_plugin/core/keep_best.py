"""Keep the best: every state of a heal is scored on the held-out samples, the best one is kept,
and the heal stops early after ``patience`` epochs without a better one."""

from __future__ import annotations

from typing import Any

import torch

from starfish_plugin.core.best_state import BestState
from starfish_plugin.core.holdout import HeldOutJudge, HeldOutScore, Judgement


class KeepBest:
    """The loop's epoch hook: judges each state and copies the best one aside; with ``keep``
    (``if_worse="restore"``) ``settle`` puts it back at the end (or the start's weights, if none beat
    them). The copy is made either way, so a resumed heal may change ``if_worse``."""

    def __init__(self, judge: HeldOutJudge, best: BestState, patience: int | None, keep: bool) -> None:
        self.judge, self.best, self.patience, self.keep = judge, best, patience, keep
        self.judgement = Judgement()

    def record(self, stage: str, score: HeldOutScore | None = None) -> HeldOutScore:
        """Score the current state (unless ``score`` is given) as ``stage``; keep it if it is the best."""
        score = score if score is not None else self.judge.score()
        if self.judgement.record(stage, score):
            self.best.keep(stage)
        return score

    # -- the loop's EpochHook ------------------------------------------------------------------
    def after_epoch(self, epoch: int) -> bool:
        self.record(f"epoch {epoch}")
        return self.patience is not None and self.judgement.since_best >= self.patience

    @property
    def keeps_best(self) -> bool:
        return self.keep

    @property
    def last_score(self) -> float | None:
        return self.judgement.history[-1][1].objective if self.judgement.history else None

    def state_dict(self) -> dict[str, Any]:
        return {
            "judgement": self.judgement.state_dict(),
            "best_stage": self.best.stage,
            "best_params": self.best.tensors() if self.best.held else None,
            "stopped": self.patience is not None and self.judgement.since_best >= self.patience,
        }

    def load_state_dict(self, state: dict[str, Any]) -> bool:
        if "judgement" not in state:
            return False
        self.judgement = Judgement.from_state(state["judgement"])
        if state["best_params"] is not None:
            self.best.load(state["best_stage"], state["best_params"])
        return bool(state["stopped"])

    # -- the end of the heal ---------------------------------------------------------------------
    @property
    def last_stage(self) -> str:
        return self.judgement.history[-1][0]

    @torch.no_grad()
    def settle(self, backup: list[torch.Tensor], current_is_last: bool = True) -> tuple[str, bool]:
        """Leave the best state in the model (``keep``) or the last one; return the stage returned
        and whether weights were copied back. When nothing beat the start, the start's weights
        (``backup``) are copied back bit for bit. ``current_is_last=False``: the weights in the
        model were never judged (training diverged after the last judged state), so the best
        state is always copied back."""
        if not self.keep:
            return self.last_stage, False
        best = self.judgement.best
        if best == self.last_stage and current_is_last:
            return best, False
        if best == "start":
            for p, saved in zip(self.best.params, backup, strict=True):
                p.copy_(saved)
        else:
            self.best.put_back()
        return best, True
