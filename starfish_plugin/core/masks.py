"""``find_masks``: ask the registered adapters which tensors of a model are pruned."""

from __future__ import annotations

from torch import nn

from starfish_plugin.core.plan import MaskedTensor, SparsityPlan
from starfish_plugin.errors import MaskNotFoundError

__all__ = ["MaskedTensor", "SparsityPlan", "find_masks"]


def find_masks(model: nn.Module, dense: nn.Module | None = None) -> SparsityPlan:
    """Ask the registered adapters to read ``model``'s sparsity; the first that recognises it wins.

    Args:
        model: the pruned model.
        dense: the model it was pruned from, if at hand; adapters of structural pruning compare
            shapes against it.

    Raises:
        MaskNotFoundError: no adapter found a mask; the message lists the supported forms.

    Example:
        >>> plan = starfish.find_masks(pruned)
        >>> plan.sparsity
        0.8
    """
    from starfish_plugin.plugins.manager import plugin_manager

    if not isinstance(model, nn.Module):
        raise TypeError(f"find_masks() needs an nn.Module, got {type(model).__name__}")
    pm = plugin_manager()
    plan = pm.hook.starfish_find_masks(model=model, dense=dense)
    if plan is None:
        forms = [form for forms in pm.hook.starfish_supported_forms() for form in forms]
        listed = "\n  - ".join(forms) if forms else "(no adapter is registered)"
        raise MaskNotFoundError(
            f"no pruning mask found in {type(model).__name__}. Supported forms:\n  - {listed}\n"
            "Prune the model with one of these toolkits first, or register an adapter for yours."
        )
    return plan
