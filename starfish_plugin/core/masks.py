"""``read_masks``: ask the adapters (through the plugin hooks) which tensors of a model are pruned."""

from __future__ import annotations

from typing import Any

from torch import nn

from starfish_plugin.core.plan import MaskedTensor, SparsityPlan
from starfish_plugin.errors import MaskNotFoundError, UsageError

__all__ = ["MaskedTensor", "SparsityPlan", "read_masks"]


def read_masks(hooks: Any, model: nn.Module, dense: nn.Module | None = None) -> SparsityPlan:
    """``starfish.find_masks`` with the hooks given (``plugin_manager().hook``): the first adapter
    that recognises ``model``'s sparsity returns its plan; ``MaskNotFoundError`` lists the forms
    the adapters support when none does."""
    if not isinstance(model, nn.Module):
        raise UsageError(f"find_masks() needs an nn.Module, got {type(model).__name__}")
    plan = hooks.starfish_find_masks(model=model, dense=dense)
    if plan is None:
        forms = [form for forms in hooks.starfish_supported_forms() for form in forms]
        listed = "\n  - ".join(forms) if forms else "(no adapter is registered)"
        raise MaskNotFoundError(
            f"no pruning mask found in {type(model).__name__}. Supported forms:\n  - {listed}\n"
            "Prune the model with one of these toolkits first, or register an adapter for yours."
        )
    return plan
