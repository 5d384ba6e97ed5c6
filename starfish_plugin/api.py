"""The public functions that need the plugin manager: ``heal`` and ``find_masks``. They hand the
manager's hooks to the core, which never imports the plugin layer."""

from __future__ import annotations

from typing import Any

from torch import nn

from starfish_plugin.config import HealConfig, resolve_config
from starfish_plugin.core.entry import heal_with
from starfish_plugin.core.masks import read_masks
from starfish_plugin.core.plan import SparsityPlan
from starfish_plugin.plugins.manager import plugin_manager
from starfish_plugin.report import HealReport


def heal(
    pruned: nn.Module,
    dense: nn.Module,
    calibration: object,
    config: HealConfig | None = None,
    **overrides: Any,
) -> HealReport:
    """Heal ``pruned`` in place with STARFISH and return a ``HealReport``.

    With every mask held fixed, the surviving entries of the pruned tensors are trained with
    AdamW so that each block's output points the way the dense model's does (cosine similarity),
    on unlabeled calibration inputs. Everything else stays frozen; ``dense`` is never modified.

    Args:
        pruned: the pruned model, healed in place and left in its toolkit's form.
        dense: the model it was pruned from; never modified.
        calibration: a ``Dataset``, ``DataLoader``, ``Tensor`` of inputs or iterable of batches;
            labels in ``(inputs, labels)`` pairs are used only by ``loss="ce"``.
        config: a ``HealConfig``; ``overrides`` replace single fields (``epochs=5``).

    Example:
        >>> report = starfish.heal(pruned, dense, calib_images, epochs=10)
        >>> report.mask_unchanged
        True
    """
    return heal_with(plugin_manager().hook, pruned, dense, calibration, resolve_config(config, overrides))


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
    return read_masks(plugin_manager().hook, model, dense)
