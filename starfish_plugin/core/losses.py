"""Alignment and baseline losses, all served through one interface so one loop can compare them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from starfish_plugin.base.outputs import require_outputs
from starfish_plugin.errors import CalibrationError


def token_weights(tokens: torch.Tensor | None, output: torch.Tensor) -> torch.Tensor | None:
    """``tokens`` (a ``[B, T]`` attention mask: 1 for real tokens, 0 for padding) as float
    weights when ``output`` is ``[B, T, ...]`` with the same B and T, else None."""
    if tokens is None or output.dim() < 3 or tuple(output.shape[:2]) != tuple(tokens.shape):
        return None
    return tokens.to(device=output.device, dtype=torch.float32)


def _masked_mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean over the real tokens, selected (not multiplied: a NaN at a padding position stays out)."""
    if weights is None:
        return values.mean()
    real = values[weights.bool()]
    return real.mean() if real.numel() else values.sum() * 0.0


def cosine_distance(
    pred: torch.Tensor, target: torch.Tensor, reduction: str = "auto", tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean of ``1 - cos(pred, target)``.

    Args:
        reduction: ``"token"`` takes the cosine over the last dimension of ``[B, T, D]`` outputs
            (per token) and averages; ``"example"`` flattens each example (conv maps
            ``[B, C, H, W]``); ``"auto"`` is per token for 3-D outputs and per example otherwise.
            Outputs that are not 3-D are always compared per example. Computed in fp32.
        tokens: a ``[B, T]`` attention mask; per-token cosines of padding (0) are left out.
    """
    pred, target = pred.float(), target.float()
    if reduction == "auto":
        reduction = "token" if pred.dim() == 3 else "example"
    if reduction == "token" and pred.dim() == 3:
        cos = F.cosine_similarity(pred, target, dim=-1, eps=1e-8)
        return 1.0 - _masked_mean(cos, token_weights(tokens, pred))
    return 1.0 - F.cosine_similarity(pred.flatten(1), target.flatten(1), dim=1, eps=1e-8).mean()


def block_mse(pred: torch.Tensor, target: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error between a block's output and its dense target (padding tokens left out)."""
    weights = token_weights(tokens, pred)
    if weights is None:
        return F.mse_loss(pred.float(), target.float())
    per_token = (pred.float() - target.float()).pow(2).flatten(2).mean(dim=2)
    return _masked_mean(per_token, weights)


def logit_kl(
    logits: torch.Tensor, dense_logits: torch.Tensor, temperature: float = 1.0, tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(dense || pruned) over the softmax of the last dimension, scaled by ``temperature**2``:
    the batch mean for ``[B, classes]``, the mean over real tokens for ``[B, T, vocab]``."""
    t = temperature
    log_p = F.log_softmax(dense_logits.float() / t, dim=-1)
    log_q = F.log_softmax(logits.float() / t, dim=-1)
    if logits.dim() == 3:
        per_token = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
        return _masked_mean(per_token, token_weights(tokens, logits)) * (t * t)
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True) * (t * t)


def next_token_ce(logits: torch.Tensor, ids: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of each next token of the calibration text (``logits[:, t]`` predicts
    ``ids[:, t + 1]``), averaged over pairs whose two positions are both real tokens."""
    pred = logits[:, :-1].float()
    target = ids[:, 1:].to(logits.device, torch.long)  # cross_entropy takes int64 targets only
    per_token = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="none")
    per_token = per_token.view(target.shape)
    if tokens is None:
        return per_token.mean()
    real = tokens.to(logits.device).bool()
    pairs = real[:, 1:] & real[:, :-1]
    return per_token[pairs].mean() if pairs.any() else per_token.sum() * 0.0


class HealLoss:
    """A weighted sum of ``cosine``, ``mse`` (both over blocks), ``kl``, ``ce`` and ``next_token``
    (on logits)."""

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

    @property
    def needs_token_ids(self) -> bool:
        return "next_token" in self.terms

    def block_term(self, name: str, outputs, targets, tokens: torch.Tensor | None = None) -> torch.Tensor:
        try:
            if name == "cosine":
                values = torch.stack([cosine_distance(outputs[b], targets[b], self.reduction, tokens)
                                      for b in self.blocks])
            else:
                values = torch.stack([block_mse(outputs[b], targets[b], tokens) for b in self.blocks])
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
        tokens: torch.Tensor | None = None,
        ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The weighted loss; ``tokens``: the batch's ``[B, T]`` attention mask, if any (padding
        tokens then count in no term); ``ids``: its ``[B, T]`` token ids (``next_token`` only)."""
        total: torch.Tensor | float = 0.0
        for name, weight in self.terms.items():
            if name in ("cosine", "mse"):
                value = self.block_term(name, outputs, targets, tokens)
            elif name == "kl":
                value = logit_kl(logits, targets["__logits__"], self.temperature, tokens)
            elif name == "next_token":
                if ids is None:
                    raise CalibrationError("loss 'next_token' needs [B, T] integer token ids as calibration inputs")
                value = next_token_ce(logits, ids, tokens)
            else:
                if labels is None:
                    raise CalibrationError("loss 'ce' needs labels; pass (inputs, labels) calibration batches")
                value = F.cross_entropy(logits.float(), labels)
            total = total + weight * value
        assert isinstance(total, torch.Tensor)  # at least one term has weight > 0
        return total
