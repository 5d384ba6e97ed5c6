"""Alignment and baseline losses, all served through one interface so one loop can compare them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from starfish_plugin.core.blocks import require_outputs
from starfish_plugin.errors import CalibrationError


def cosine_distance(pred: torch.Tensor, target: torch.Tensor, reduction: str = "auto") -> torch.Tensor:
    """Mean of ``1 - cos(pred, target)``.

    Args:
        reduction: ``"token"`` takes the cosine over the last dimension of ``[B, T, D]`` outputs
            (per token) and averages; ``"example"`` flattens each example (conv maps
            ``[B, C, H, W]``); ``"auto"`` is per token for 3-D outputs and per example otherwise.
            Outputs that are not 3-D are always compared per example. Computed in fp32.
    """
    pred, target = pred.float(), target.float()
    if reduction == "auto":
        reduction = "token" if pred.dim() == 3 else "example"
    if reduction == "token" and pred.dim() == 3:
        cos = F.cosine_similarity(pred, target, dim=-1, eps=1e-8)
    else:
        cos = F.cosine_similarity(pred.flatten(1), target.flatten(1), dim=1, eps=1e-8)
    return 1.0 - cos.mean()


def block_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error between a block's output and its dense target."""
    return F.mse_loss(pred.float(), target.float())


def logit_kl(logits: torch.Tensor, dense_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(dense || pruned) over the class softmax, batch mean, scaled by ``temperature**2``."""
    t = temperature
    log_p = F.log_softmax(dense_logits.float() / t, dim=-1)
    log_q = F.log_softmax(logits.float() / t, dim=-1)
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True) * (t * t)


class HealLoss:
    """A weighted sum of ``cosine``, ``mse`` (both over blocks), ``kl`` and ``ce`` (on logits)."""

    def __init__(
        self,
        terms: Mapping[str, float],
        blocks: Sequence[str],
        reduction: str = "auto",
        temperature: float = 1.0,
        block_weighting: str = "uniform",
    ) -> None:
        self.terms = {k: float(v) for k, v in terms.items() if v > 0}
        self.blocks = list(blocks)
        self.reduction, self.temperature, self.block_weighting = reduction, temperature, block_weighting
        self.detach_at: str | None = None  # block whose output reaches the final output detached

    @property
    def needs_blocks(self) -> bool:
        return "cosine" in self.terms or "mse" in self.terms

    @property
    def needs_logits(self) -> bool:
        return "kl" in self.terms

    @property
    def needs_labels(self) -> bool:
        return "ce" in self.terms

    def block_term(self, name: str, outputs, targets) -> torch.Tensor:
        fn = cosine_distance if name == "cosine" else block_mse
        kwargs = {"reduction": self.reduction} if name == "cosine" else {}
        try:
            values = torch.stack([fn(outputs[b], targets[b], **kwargs) for b in self.blocks])
        except KeyError:  # checked only on failure: nothing extra in the step loop
            require_outputs(outputs, self.blocks, "pruned")
            raise
        if self.block_weighting == "adaptive":
            # weight each block by its current mismatch (no gradient through the weights);
            # weights average to 1, so the loss scale matches the uniform mean
            weights = values.detach() / values.detach().sum().clamp_min(1e-12) * len(values)
            return (weights * values).mean()
        return values.mean()

    def __call__(
        self,
        outputs: Mapping[str, torch.Tensor],
        logits: torch.Tensor,
        targets: Mapping[str, torch.Tensor],
        labels: torch.Tensor | None,
    ) -> torch.Tensor:
        total: torch.Tensor | float = 0.0
        for name, weight in self.terms.items():
            if name in ("cosine", "mse"):
                value = self.block_term(name, outputs, targets)
            elif name == "kl":
                value = logit_kl(logits, targets["__logits__"], self.temperature)
            else:
                if labels is None:
                    raise CalibrationError("loss 'ce' needs labels; pass (inputs, labels) calibration batches")
                value = F.cross_entropy(logits.float(), labels)
            total = total + weight * value
        assert isinstance(total, torch.Tensor)  # at least one term has weight > 0
        return total
