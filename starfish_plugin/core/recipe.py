"""``HealConfig(recipe="auto")``: the measured best recipe for the plan at hand.

The rule is what the recovery suite supports (docs/results.md, "Beyond the paper"): on masked
pruning, unstructured at 0.5 to 0.95 and 2:4, ``warm_start="row_norm"`` with ``lr=4e-3`` was never
below the paper's recipe beyond the seed std, and far above it from 0.8 up (+2.7 at 0.9, +10.9
at 0.95 with 1,000 images; +10.9 and +49.7 with 256). Nothing was measured for structured pruning
or below 50 % sparsity, so those keep the paper's recipe.
"""

from __future__ import annotations

from starfish_plugin.config import HealConfig
from starfish_plugin.core.plan import SparsityPlan

PAPER = HealConfig(recipe="paper")
MEASURED_BEST = {"warm_start": "row_norm", "lr": 4e-3}
MIN_SPARSITY = 0.5


def resolve_recipe(config: HealConfig, plan: SparsityPlan) -> tuple[HealConfig, str]:
    """The config the heal runs with, and a note saying what ``recipe="auto"`` did (``""`` if nothing)."""
    if config.recipe != "auto":
        return config, ""
    if config.lr != PAPER.lr or config.warm_start != PAPER.warm_start:
        return config, ""  # the user chose these: respected
    if plan.structural or plan.sparsity < MIN_SPARSITY:
        return config, ""
    changes = ", ".join(f"{k}={v!r}" for k, v in MEASURED_BEST.items())
    note = (
        f"recipe='auto': {plan.sparsity:.1%} masked sparsity, so healing uses {changes} (the measured best; "
        "recipe='paper' keeps the paper's lr=6e-4 without warm start)"
    )
    return config.replace(**MEASURED_BEST), note
