"""Adapter for N:M semi-structured sparsity (2:4, 4:8) held as plain zeros, with no mask object.

This is what ``sparsifier.squash_mask()`` and torchao's ``apply_fake_sparsity`` leave behind.
A mask is inferred from the exact zeros only when that is safe:

* automatically, when every tensor that has zeros follows one N:M pattern (validated group by
  group: at most N non-zeros in every M consecutive weights of a row), or
* for any zero pattern, when the user opts in with ``infer_masks_from_zeros(model)``.

The report's notes say which applied. Masks read from parametrizations (a sparsifier still
attached) are handled by the ``torch_masks`` adapter; its masks are held fixed too, so N:M
patterns survive healing exactly either way. ``starfish_plugin.core.nm_pattern.check_nm`` validates a tensor;
``starfish_plugin.deploy.semi_structured`` packs healed 2:4 layers for the sparse kernels.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping

import torch
from torch import nn

from starfish_plugin.core.nm_pattern import nm_violation
from starfish_plugin.core.plan import MaskedTensor, SparsityPlan
from starfish_plugin.errors import NMPatternError
from starfish_plugin.plugins.hookspecs import hookimpl

NAME = "nm_layouts"
PATTERNS = ((2, 4), (4, 8))
_OPTED_IN: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def infer_masks_from_zeros(model: nn.Module) -> nn.Module:
    """Opt in: let ``heal`` treat the exact zeros of ``model``'s Linear/Conv weights as its mask."""
    _OPTED_IN.add(model)
    return model


def _zero_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            weight = getattr(module, "weight", None)  # a Parameter only when no hook/parametrization owns it
            if isinstance(weight, nn.Parameter) and type(weight.data) is torch.Tensor and bool((weight == 0).any()):
                if bool(weight.detach().any()):  # an all-zero tensor has nothing to heal
                    found[f"{name}.weight" if name else "weight"] = weight
    return found


def detect_pattern(weights: Mapping[str, torch.Tensor]) -> tuple[int, int] | None:
    """The single N:M pattern every tensor follows, or ``None``."""
    for n, m in PATTERNS:
        if weights and all(nm_violation(w, n, m) is None for w in weights.values()):
            return n, m
    return None


def _new_zeros(weights: dict[str, nn.Parameter], dense: nn.Module | None) -> dict[str, nn.Parameter]:
    """Keep the tensors whose zeros were made by pruning: some entry is zero here but not in dense.

    Without a dense model every tensor with zeros is kept. This stops a dense model that merely
    has structural zeros (identity or one-hot layers) from being taken for a pruned one.
    """
    if dense is None:
        return weights
    reference = dict(dense.named_parameters())
    kept = {}
    for name, w in weights.items():
        other = reference.get(name)
        if other is None or other.shape != w.shape or bool(((w == 0) & (other != 0)).any()):
            kept[name] = w
    return kept


@hookimpl(trylast=True)
def starfish_find_masks(model, dense):
    weights = _new_zeros(_zero_weights(model), dense)
    if not weights:
        return None
    pattern = detect_pattern(weights)
    if pattern is None and model not in _OPTED_IN:
        return None
    entries = [MaskedTensor(name, w, w.detach() != 0, "zeros", "zero") for name, w in weights.items()]
    if pattern is not None:
        note = f"mask inferred from exact zeros: {pattern[0]}:{pattern[1]} validated for all {len(entries)} tensors"
    else:
        note = f"mask inferred from exact zeros of {len(entries)} tensors (opted in with infer_masks_from_zeros)"
    return SparsityPlan(entries, NAME, notes=[note])


@hookimpl
def starfish_supported_forms() -> list[str]:
    return [
        "N:M zeros with no mask object (after squash_mask / apply_fake_sparsity): 2:4 or 4:8 validated "
        "for every tensor, or any zeros after starfish_plugin.adapters.nm_layouts.infer_masks_from_zeros(model)"
    ]


@hookimpl
def starfish_write_back(model, plan):
    if plan.adapter != NAME:
        return None
    for entry in plan:  # the zeros were re-applied after every step; check they are all there
        if bool(entry.parameter.detach()[~entry.mask].any()):
            raise NMPatternError(f"{entry.name} lost its zeros during healing")
    return True
