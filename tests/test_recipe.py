"""``HealConfig(recipe="auto")``: the measured best recipe where the recovery suite supports it,
the paper's everywhere else, and never over a choice the user made."""

from __future__ import annotations

import copy

import pytest
import torch
import torch_pruning as tp
from helpers import l1_prune_, tiny_vit

import starfish_plugin as starfish
from starfish_plugin.adapters import tp_graph
from starfish_plugin.core.recipe import resolve_recipe


def _plan(model):
    return starfish.find_masks(model)


@pytest.mark.parametrize("amount, applies", [(0.7, True), (0.5, True), (0.3, False)])
def test_auto_applies_to_masked_pruning_from_half_sparsity(amount, applies):
    plan = _plan(l1_prune_(tiny_vit(), amount))
    config, note = resolve_recipe(starfish.HealConfig(), plan)
    assert (config.lr, config.warm_start) == ((4e-3, "row_norm") if applies else (6e-4, "none"))
    assert bool(note) == applies


def test_auto_never_overrides_the_user_or_the_paper_recipe():
    plan = _plan(l1_prune_(tiny_vit(), 0.9))
    for config in (starfish.HealConfig(lr=1e-3), starfish.HealConfig(warm_start="row_norm"),
                   starfish.HealConfig(recipe="paper")):
        assert resolve_recipe(config, plan) == (config, "")
    assert starfish.HealConfig().lr == 6e-4  # the dataclass keeps the paper's values


def test_auto_keeps_the_paper_recipe_for_structured_pruning():
    dense = tiny_vit()
    model = copy.deepcopy(dense)
    pruner = tp.pruner.MetaPruner(model, torch.randn(1, 1, 8, 8), importance=tp.importance.MagnitudeImportance(),
                                  pruning_ratio=0.5, ignored_layers=[model.head],
                                  num_heads={m.qkv: m.num_heads for m in model.modules() if hasattr(m, "qkv")})
    tp_graph.track(pruner, torch.randn(1, 1, 8, 8))
    pruner.step()
    plan = starfish.find_masks(model)
    assert plan.structural
    assert resolve_recipe(starfish.HealConfig(), plan)[1] == ""


def test_a_heal_says_what_auto_did(dense, images):
    report = starfish.heal(l1_prune_(copy.deepcopy(dense), 0.8), dense, images, epochs=1, quiet=True,
                           diagnostic_samples=16)
    assert report.config["lr"] == 4e-3 and report.config["warm_start"] == "row_norm"
    assert report.recipe_applied.startswith("recipe='auto': 80.0% masked sparsity")
    assert any(n.startswith("warm start row_norm") for n in report.notes)
    paper = starfish.heal(l1_prune_(copy.deepcopy(dense), 0.8), dense, images, epochs=1, quiet=True,
                          diagnostic_samples=16, recipe="paper")
    assert paper.config["lr"] == 6e-4 and paper.recipe_applied == ""
