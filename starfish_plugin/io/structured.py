"""A weights-only file for structurally pruned models (Torch-Pruning and the like).

``tp.state_dict`` pickles every module's ``__dict__``, so reading it needs full unpickling, which
can run arbitrary code. This format holds only what ``torch.load(..., weights_only=True)``
accepts: the state dict, each module's plain attributes (``out_features``, ``num_heads``, ...)
and the entries adapters export (Torch-Pruning's kept-channel record) through hooks. It is
read onto a freshly built dense architecture: attributes that differ are set, tensors resized.

Example:
    >>> torch.save(structured_state(pruned), "pruned.pt")
    >>> model = load_structured_(build_dense(), torch.load("pruned.pt", weights_only=True))
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from starfish_plugin.errors import StructuredCheckpointError

FORMAT = "starfish-structured/1"
_PLAIN = (bool, int, float, str, type(None))


def _plain(value: Any) -> bool:
    if type(value) in (tuple, list, torch.Size):
        return all(_plain(v) for v in value)
    return type(value) in _PLAIN  # exact types: str enums and other subclasses need unpickling


def _to_plain(value: Any) -> Any:
    return tuple(_to_plain(v) for v in value) if isinstance(value, tuple) else value  # torch.Size -> tuple


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict with mask reparametrizations folded in: ``weight`` holding zeros
    instead of ``weight_orig`` + ``weight_mask`` (torch.nn.utils.prune) or parametrizations
    (torch.ao.pruning). The model itself is not changed."""
    from starfish_plugin.plugins.manager import plugin_manager

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    plugin_manager().hook.starfish_fold_masks(model=model, state=state)
    return state


def is_structured(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def structured_state(model: nn.Module) -> dict[str, Any]:
    """``model`` as a weights-only dictionary: tensors (masks folded in as zeros), plain module
    attributes, kept-channel record."""
    from starfish_plugin.plugins.manager import plugin_manager

    attributes = {
        name: {k: _to_plain(v) for k, v in vars(module).items() if not k.startswith("_") and _plain(v)}
        for name, module in model.named_modules()
        if "parametrizations" not in name.split(".")  # folded into plain weights above
    }
    state: dict[str, Any] = {
        "format": FORMAT,
        "architecture": type(model).__name__,
        "state_dict": plain_state_dict(model),
        "attributes": attributes,
    }
    for entries in plugin_manager().hook.starfish_export_state(model=model):  # e.g. kept_channels
        state.update(entries or {})
    return state


def load_structured_(model: nn.Module, obj: dict[str, Any], source: str = "the checkpoint") -> nn.Module:
    """Reshape ``model`` (the dense architecture) to the pruned one in ``obj`` and load its weights."""
    from starfish_plugin.plugins.manager import plugin_manager

    if (not is_structured(obj) or not isinstance(obj.get("state_dict"), dict)
            or not isinstance(obj.get("attributes"), dict)
            or not all(isinstance(a, dict) for a in obj["attributes"].values())):
        raise StructuredCheckpointError(f"{source} is not a complete {FORMAT} file (state_dict, attributes); "
                                        "write it again with structured_state(model)")
    if obj.get("architecture") != type(model).__name__:
        raise StructuredCheckpointError(
            f"{source} holds a pruned {obj.get('architecture')}, not a {type(model).__name__}; check --model"
        )
    modules = dict(model.named_modules())
    missing = sorted(set(obj["attributes"]) - set(modules))
    if missing:
        raise StructuredCheckpointError(
            f"{source} has modules the {type(model).__name__} lacks ({missing[:3]}); check --model"
        )
    state = obj["state_dict"]
    current = model.state_dict()
    unknown = sorted(set(state) - set(current))
    if unknown or set(current) - set(state):
        raise StructuredCheckpointError(
            f"{source} and the {type(model).__name__} have different tensors (unexpected {unknown[:3]}, missing "
            f"{sorted(set(current) - set(state))[:3]}); check --model and --num-classes"
        )
    # adapters' bookkeeping (Torch-Pruning's kept channels) is read before anything changes: a
    # malformed entry leaves the model as it was
    plugin_manager().hook.starfish_import_state(model=model, state=obj, source=source)
    for name, attrs in obj["attributes"].items():
        module = modules[name]
        for key, value in attrs.items():
            if getattr(module, key, None) != value:
                setattr(module, key, list(value) if isinstance(getattr(module, key, None), list) else value)
    for key, value in state.items():
        if current[key].shape == value.shape:
            continue
        owner_name, _, tensor_name = key.rpartition(".")
        owner = model.get_submodule(owner_name)
        old = getattr(owner, tensor_name)
        fresh = torch.empty(value.shape, dtype=value.dtype, device=old.device)
        if isinstance(old, nn.Parameter):
            setattr(owner, tensor_name, nn.Parameter(fresh, requires_grad=old.requires_grad))
        else:
            owner.register_buffer(tensor_name, fresh, persistent=True)
    model.load_state_dict(state)
    return model
