"""Row-norm warm start: undo the output-magnitude collapse of heavy pruning before training.

At high sparsity a pruned layer's outputs shrink (at 0.95 most of each row's mass is gone), and
AdamW, whose steps have a fixed absolute size, needs many steps to grow the surviving weights
back. The warm start measures, on a few calibration inputs, the output norm of every output row
(channel) of each pruned ``Linear``/``Conv`` weight, with the dense and with the pruned weight, on
the dense model's inputs to that layer, and scales the surviving entries of the row by the ratio.
The mask is untouched (zeros stay zero) and the cost is one dense forward plus one product per
pruned layer per batch (the dense layer's own output gives its norms).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypedDict

import torch
import torch.nn.functional as F
from torch import nn

from starfish_plugin.base.model_io import attention_mask, call_model
from starfish_plugin.core.plan import MaskedTensor, SparsityPlan

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_Layer = nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d


class WarmStartResult(TypedDict):
    """What ``row_norm_warm_start_`` returns (a plain dict)."""

    rescaled: list[str]
    skipped: list[str]
    median_gain: float


def _channels_first(module: _Layer, y: torch.Tensor) -> torch.Tensor:
    """A layer's output ``y`` as ``[C, ...]``: one row per output channel."""
    channels = module.weight.shape[0]
    if isinstance(module, nn.Linear):
        return y.reshape(-1, channels).T
    return y.transpose(0, 1).reshape(channels, -1)


def _layer_output(module: _Layer, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``module``'s output on ``x`` with ``weight`` and no bias, channels first: ``[C, ...]``."""
    if isinstance(module, nn.Linear):
        return _channels_first(module, F.linear(x, weight))
    if isinstance(module, nn.Conv1d):
        fn = F.conv1d
    elif isinstance(module, nn.Conv2d):
        fn = F.conv2d
    else:
        fn = F.conv3d
    return _channels_first(module, fn(x, weight, None, module.stride, module.padding, module.dilation, module.groups))


def _without_bias(module: _Layer, y: torch.Tensor) -> torch.Tensor:
    """A layer's output ``y`` less its bias, channels first: ``[C, ...]`` (what ``_layer_output`` gives)."""
    rows = _channels_first(module, y)
    return rows - module.bias.unsqueeze(1) if module.bias is not None else rows


def tied_weights(model: nn.Module) -> set[int]:
    """Ids of parameters the model holds under more than one name (a tied embedding and LM head)."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {key for key, count in seen.items() if count > 1}


def eligible_layer(entry: MaskedTensor, dense_modules: dict[str, nn.Module], tied: set[int]) -> _Layer | None:
    """The dense layer of a pruned ``weight`` of the same shape, or ``None`` if it cannot be rescaled
    (also for a tied weight: scaling the LM head's rows would scale the embedding too)."""
    if not entry.name.endswith(".weight"):
        return None
    module = dense_modules.get(entry.name[: -len(".weight")])
    if not isinstance(module, _LAYERS) or tuple(module.weight.shape) != tuple(entry.parameter.shape):
        return None
    if id(module.weight) in tied:
        return None
    if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d) and module.padding_mode != "zeros":
        return None
    return module


@torch.no_grad()
def row_norm_warm_start_(
    plan: SparsityPlan, dense: nn.Module, inputs: Iterable, max_gain: float = 10.0
) -> WarmStartResult:
    """Scale each output row of every eligible pruned weight so its output norm matches the dense row's.

    Args:
        plan: the pruned model's plan; its ``parameter`` tensors are scaled in place, surviving
            entries only (masked entries are left exactly as they were).
        dense: the dense model; run (in eval mode, by the caller) to get each layer's inputs.
        inputs: batches of calibration inputs already on the models' device (padding tokens of
            batches with an ``attention_mask`` are left out).
        max_gain: gains are clipped to ``[1 / max_gain, max_gain]``; rows whose pruned output is
            zero keep gain 1. Tied weights (an LM head sharing the embedding) are skipped.

    Returns:
        ``{"rescaled": [names], "skipped": [names], "median_gain": float}``.
    """
    modules = dict(dense.named_modules())
    tied = tied_weights(dense)
    eligible = {e.name: (e, m) for e in plan if (m := eligible_layer(e, modules, tied)) is not None}
    skipped = [e.name for e in plan if e.name not in eligible]
    sums: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    pruned_weights = {name: e.effective_weight().detach() for name, (e, _) in eligible.items()}

    tokens: list[torch.Tensor | None] = [None]  # the current batch's attention mask

    def accumulate(name: str, module: _Layer, x: torch.Tensor, y: torch.Tensor) -> None:
        mask = tokens[0]
        if isinstance(module, nn.Linear) and mask is not None and x.dim() == 3 and x.shape[:2] == mask.shape:
            x, y = x[mask.bool()], y[mask.bool()]  # real tokens only: padding says nothing about a row's norm
        dense_y = _without_bias(module, y).float()  # the dense layer's own output: no second product
        pruned_y = _layer_output(module, x, pruned_weights[name].to(x.dtype)).float()
        dense_sq, pruned_sq = dense_y.pow(2).sum(1), pruned_y.pow(2).sum(1)
        if name in sums:
            dense_sq, pruned_sq = dense_sq + sums[name][0], pruned_sq + sums[name][1]
        sums[name] = (dense_sq, pruned_sq)

    handles = [
        module.register_forward_hook(lambda m, args, out, name=name: accumulate(name, m, args[0], out))
        for name, (_, module) in eligible.items()
    ]
    try:
        for x in inputs:
            tokens[0] = attention_mask(x)
            call_model(dense, x)
    finally:
        for handle in handles:
            handle.remove()
    gains = []
    for name, (dense_sq, pruned_sq) in sums.items():
        entry = eligible[name][0]
        gain = (dense_sq / pruned_sq.clamp_min(1e-30)).sqrt().clamp(1 / max_gain, max_gain)
        gain = torch.where(pruned_sq > 0, gain, torch.ones_like(gain))
        shape = (-1,) + (1,) * (entry.parameter.dim() - 1)
        p = entry.parameter
        p.copy_(torch.where(entry.mask, p * gain.reshape(shape).to(p.dtype), p))
        gains.append(gain)
    median = float(torch.cat(gains).median()) if gains else 1.0
    skipped += [name for name in eligible if name not in sums]  # layers the inputs never reached
    return {"rescaled": list(sums), "skipped": skipped, "median_gain": median}
