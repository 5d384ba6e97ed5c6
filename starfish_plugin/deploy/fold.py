"""A deployable copy of a pruned model: every mask folded into a plain weight."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize


def folded_copy(model: nn.Module) -> nn.Module:
    """A copy whose masks are baked into plain weights (prune hooks and parametrizations removed,
    by the adapters' ``starfish_remove_masks``), which is how a pruned model is deployed. The
    model given is not changed."""
    from starfish_plugin.plugins.manager import plugin_manager

    with torch.no_grad():  # plain tensors hold the masked weights: deepcopy accepts them
        model = copy.deepcopy(_detached(model))
    _unshare_parametrized_classes(model)
    plugin_manager().hook.starfish_remove_masks(model=model)
    return model


def _unshare_parametrized_classes(model: nn.Module) -> None:
    """Give each parametrized module of a deep copy a class of its own. ``copy.deepcopy`` keeps the
    class torch.nn.utils.parametrize made for the original (``ParametrizedLinear``), and removing
    the copy's last parametrization deletes the tensor's property from that shared class, which
    would leave the original without its ``weight``."""
    for module in model.modules():
        if parametrize.is_parametrized(module):
            cls = type(module)
            namespace = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
            module.__class__ = type(cls.__name__, cls.__bases__, namespace)


def _detached(model: nn.Module) -> nn.Module:
    """``model`` with every tensor attribute that is not a parameter or buffer (the masked weight a
    prune hook leaves as a non-leaf tensor, which deepcopy refuses) detached, in place."""
    for module in model.modules():
        for name, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) and value.grad_fn is not None:
                setattr(module, name, value.detach())
    return model
