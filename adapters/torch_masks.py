"""Adapter for masks that live on the module: ``torch.nn.utils.prune`` forward pre-hooks and
parametrization masks (``torch.ao.pruning`` sparsifiers, torchao's ``WandaSparsifier`` and its
own ``FakeSparsity``).

Healing trains ``<name>_orig`` / ``parametrizations.<name>.original`` in place; the hooks,
mask buffers and parametrizations stay attached, so ``prune.remove`` and ``squash_mask`` work
afterwards exactly as before.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn
from torch.nn.utils import parametrize, prune

from starfish_plugin.core.plan import MaskedTensor, SparsityPlan
from starfish_plugin.plugins.hookspecs import hookimpl

NAME = "torch_masks"
FORMS = [
    "torch.nn.utils.prune: <name>_orig + <name>_mask with a pruning forward pre-hook "
    "(l1/random unstructured, ln/random structured, global_unstructured, custom_from_mask, pruned twice)",
    "parametrization masks: module.parametrizations.<name>[i].mask "
    "(torch.ao.pruning sparsifiers, torchao WandaSparsifier / FakeSparsity)",
]


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _prune_hook_entries(module_name: str, module: nn.Module) -> list[MaskedTensor]:
    entries = []
    for hook in module._forward_pre_hooks.values():
        if not isinstance(hook, prune.BasePruningMethod):
            continue
        tensor_name = hook._tensor_name
        orig = getattr(module, tensor_name + "_orig")
        mask = getattr(module, tensor_name + "_mask")

        def effective(orig=orig, mask=mask) -> torch.Tensor:
            return orig * mask

        def refresh(hook=hook, module=module) -> None:
            setattr(module, hook._tensor_name, hook.apply_mask(module))

        entries.append(
            MaskedTensor(
                name=_join(module_name, tensor_name),
                parameter=orig,
                mask=mask,
                form="prune_hook",
                masked_entries="keep",
                effective=effective,
                refresh=refresh,
            )
        )
    return entries


def _parametrization_entries(module_name: str, module: nn.Module) -> list[MaskedTensor]:
    if not parametrize.is_parametrized(module):
        return []
    entries = []
    for tensor_name, plist in cast(nn.ModuleDict, module.parametrizations).items():
        steps = cast(parametrize.ParametrizationList, plist)
        masks = [m for p in steps if isinstance(m := getattr(p, "mask", None), torch.Tensor)]
        if not masks:
            continue
        mask = masks[0] != 0
        for extra in masks[1:]:
            mask = mask & (extra != 0)

        def effective(module=module, tensor_name=tensor_name) -> torch.Tensor:
            return getattr(module, tensor_name)

        entries.append(
            MaskedTensor(
                name=_join(module_name, tensor_name),
                parameter=cast(nn.Parameter, steps.original),
                mask=mask,
                form="parametrization",
                masked_entries="keep",
                effective=effective,
            )
        )
    return entries


@hookimpl
def starfish_find_masks(model: nn.Module) -> SparsityPlan | None:
    entries: list[MaskedTensor] = []
    for module_name, module in model.named_modules():
        entries += _prune_hook_entries(module_name, module)
        entries += _parametrization_entries(module_name, module)
    if not entries:
        return None
    forms = sorted({e.form for e in entries})
    return SparsityPlan(entries=entries, adapter=NAME, notes=[f"mask forms: {', '.join(forms)}"])


@hookimpl
def starfish_supported_forms() -> list[str]:
    return FORMS


@hookimpl
def starfish_write_back(model: nn.Module, plan: SparsityPlan) -> bool | None:
    if plan.adapter != NAME:
        return None
    # Healing trained the *_orig / original tensors in place; refresh the stale plain attribute
    # that prune hooks keep, so that `module.weight` is right even before the next forward.
    with torch.no_grad():
        for module in model.modules():
            for hook in list(module._forward_pre_hooks.values()):
                if isinstance(hook, prune.BasePruningMethod):
                    setattr(module, hook._tensor_name, hook.apply_mask(module))
    return True
