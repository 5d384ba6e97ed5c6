"""Adapter for masks that live on the module: ``torch.nn.utils.prune`` forward pre-hooks and
parametrization masks (``torch.ao.pruning`` sparsifiers, torchao's ``WandaSparsifier`` and its
own ``FakeSparsity``).

Healing trains ``<name>_orig`` / ``parametrizations.<name>.original`` in place; the hooks,
mask buffers and parametrizations stay attached, so ``prune.remove`` and ``squash_mask`` work
afterwards exactly as before.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from torch.nn.utils import parametrize, prune

from starfish_plugin.core.plan import MaskedTensor, SparsityPlan
from starfish_plugin.errors import CheckpointFileError
from starfish_plugin.io.state_dicts import load_weights_, state_dict_of
from starfish_plugin.plugins.hookspecs import hookimpl

NAME = "torch_masks"
FORMS = [
    "torch.nn.utils.prune: <name>_orig + <name>_mask with a pruning forward pre-hook "
    "(l1/random unstructured, ln/random structured, global_unstructured, custom_from_mask, pruned twice)",
    "parametrization masks: module.parametrizations.<name>[i].mask "
    "(torch.ao.pruning sparsifiers, torchao WandaSparsifier / FakeSparsity)",
]


# file formats: "prune" (a pruned model's state dict: <name>_orig + <name>_mask), "masks" (a
# dictionary of boolean masks only, applied to the dense weights)
FILE_FORMATS = ["prune", "masks"]


def prune_hooks(module: nn.Module) -> list[prune.BasePruningMethod]:
    """The ``torch.nn.utils.prune`` methods attached to ``module`` (one per pruned tensor)."""
    return [h for h in module._forward_pre_hooks.values() if isinstance(h, prune.BasePruningMethod)]


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _prune_hook_entries(module_name: str, module: nn.Module) -> list[MaskedTensor]:
    entries = []
    for hook in prune_hooks(module):
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
                owner=module,
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
            for hook in prune_hooks(module):
                setattr(module, hook._tensor_name, hook.apply_mask(module))
    return True


@hookimpl
def starfish_fold_masks(model: nn.Module, state: dict[str, Any]) -> None:
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        for hook in prune_hooks(module):
            tensor = hook._tensor_name
            state[prefix + tensor] = state.pop(prefix + tensor + "_orig") * state.pop(prefix + tensor + "_mask")
        if parametrize.is_parametrized(module):
            for tensor in list(cast(nn.ModuleDict, module.parametrizations)):
                with torch.no_grad():
                    state[prefix + tensor] = getattr(module, tensor).detach().cpu()
                for key in [k for k in state if k.startswith(f"{prefix}parametrizations.{tensor}.")]:
                    del state[key]


@hookimpl
def starfish_remove_masks(model: nn.Module) -> None:
    for module in model.modules():
        for hook in prune_hooks(module):
            prune.remove(module, hook._tensor_name)
        if parametrize.is_parametrized(module):
            for name in list(cast(nn.ModuleDict, module.parametrizations)):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)


def detach_pruned_weights(model: nn.Module) -> None:
    """Replace the non-leaf tensors prune hooks leave in ``module.weight`` by detached ones, which
    ``copy.deepcopy`` accepts (the hook recomputes them at the next forward anyway)."""
    for module in model.modules():
        for hook in prune_hooks(module):
            setattr(module, hook._tensor_name, getattr(module, hook._tensor_name).detach())


@hookimpl
def starfish_file_formats() -> list[str]:
    return FILE_FORMATS


@hookimpl
def starfish_detect_format(obj: Any) -> str | None:
    state = obj if isinstance(obj, dict) else {}
    if any(isinstance(k, str) and k.endswith("_orig") for k in state) and any(
        isinstance(k, str) and k.endswith("_mask") for k in state
    ):
        return "prune"
    tensors = [v for v in state.values() if isinstance(v, torch.Tensor)]
    if tensors and all(t.dtype == torch.bool for t in tensors):
        return "masks"
    return None


@hookimpl
def starfish_load_pruned(model: nn.Module, obj: Any, fmt: str, source: str) -> nn.Module | None:
    if fmt not in FILE_FORMATS:
        return None
    state = state_dict_of(obj, source)
    modules = dict(model.named_modules())
    if fmt == "prune":
        for key in [k for k in state if k.endswith("_mask")]:
            owner, _, tensor_name = key[: -len("_mask")].rpartition(".")
            if owner not in modules or not hasattr(modules[owner], tensor_name):
                raise CheckpointFileError(
                    f"{source} masks {key[:-5]}, which {type(model).__name__} does not have; check --model"
                )
            target = getattr(modules[owner], tensor_name)
            if not isinstance(state[key], torch.Tensor) or tuple(state[key].shape) != tuple(target.shape):
                shape = tuple(getattr(state[key], "shape", ()))
                raise CheckpointFileError(
                    f"{source}: the mask {key} has shape {shape} but {key[:-5]} has {tuple(target.shape)}; "
                    "the file is for another architecture (check --model and --num-classes) or damaged"
                )
            prune.custom_from_mask(modules[owner], tensor_name, state[key])
        load_weights_(model, state, source, "pruned")
        return model
    params = dict(model.named_parameters())
    not_masks = [k for k, v in state.items() if not isinstance(v, torch.Tensor) or v.dtype != torch.bool]
    if not_masks:
        kind = getattr(state[not_masks[0]], "dtype", type(state[not_masks[0]]).__name__)
        raise CheckpointFileError(
            f"{source} is read as a mask dictionary but {not_masks[0]!r} holds {kind}, not a boolean mask "
            f"({len(not_masks)} such entries); for a file of weights pass --pruned-format weights (or auto)"
        )
    for name, mask in state.items():
        if name not in params or tuple(params[name].shape) != tuple(mask.shape):
            raise CheckpointFileError(f"mask {name!r} in {source} matches no parameter of that shape in the model")
        owner, _, tensor_name = name.rpartition(".")
        prune.custom_from_mask(modules[owner], tensor_name, mask)
    return model


@hookimpl
def starfish_save_pruned(model: nn.Module, fmt: str, path: Path) -> bool | None:
    if fmt != "prune":
        return None
    torch.save(model.state_dict(), path)  # <name>_orig + <name>_mask: the prune hooks come back on load
    return True

