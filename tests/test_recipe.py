"""``recipe="auto"``: the warm start and learning rate chosen by a budgeted probe on the held-out
samples, reported, deterministic by seed, and never over a choice the user made."""

from __future__ import annotations

import copy

import pytest
import torch
import torch_pruning as tp
from helpers import l1_prune_, state_copy

import starfish_plugin as starfish
from starfish_plugin.adapters import tp_graph
from starfish_plugin.core.recipe import PROBE_LRS, PROBE_WARM_STARTS


@pytest.fixture
def many_images() -> torch.Tensor:
    return torch.randn(256, 1, 8, 8, generator=torch.Generator().manual_seed(4))


def _auto(dense, images, **overrides):
    """A heal with the default recipe; a larger probe budget than the default so that this small heal
    affords learning-rate steps too."""
    pruned = l1_prune_(copy.deepcopy(dense), 0.8)
    settings = dict(epochs=6, batch_size=16, quiet=True, probe_budget=0.9) | overrides
    return pruned, starfish.heal(pruned, dense, images, **settings)


def test_auto_probes_warm_starts_then_learning_rates_and_reports_it(dense, many_images):
    _, report = _auto(dense, many_images)
    probe = report.recipe_probe
    assert set(probe["warm_starts"]) == {"none", *PROBE_WARM_STARTS}
    assert probe["steps"] >= 1 and probe["samples"] == probe["steps"] * 16
    tried = [(c["warm_start"], c["lr"]) for c in probe["candidates"]]
    chosen_warm = probe["choice"]["warm_start"]
    assert tried == [(chosen_warm, lr) for lr in PROBE_LRS] and not probe["line_search"]
    # the paper's recipe (no warm start, 6e-4) was tried, or a warm start measured better than none
    assert chosen_warm == "none" or probe["warm_starts"][chosen_warm] < probe["warm_starts"]["none"]
    best = min(probe["candidates"], key=lambda c: c["objective"])
    assert (report.config["warm_start"], report.config["lr"]) == (chosen_warm, probe["choice"]["lr"])
    assert probe["choice"]["lr"] == best["lr"] or best["output_cosine"] < report.output_cosine_before
    assert probe["cost_sample_forwards"] <= probe["budget_sample_forwards"]
    assert report.recipe_applied.startswith("recipe='auto' chose") and "probe" in report.summary()
    assert any(n.startswith("recipe='auto' probe") for n in report.notes)


@pytest.mark.parametrize("budget", [0.9, 0.12])  # several steps per rate; a line search (one step, scaled)
def test_the_probe_is_deterministic_by_seed(dense, many_images, budget):
    first_model, first = _auto(dense, many_images, seed=1, probe_budget=budget)
    second_model, second = _auto(dense, many_images, seed=1, probe_budget=budget)
    assert first.recipe_probe["line_search"] == (budget == 0.12) and first.recipe_probe["steps"] >= 1
    strip = {k: v for k, v in first.recipe_probe.items() if k != "seconds"}
    assert strip == {k: v for k, v in second.recipe_probe.items() if k != "seconds"}
    assert first.held_out_history == second.held_out_history
    a, b = state_copy(first_model), state_copy(second_model)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_probe_leaves_no_trace_when_it_chooses_no_warm_start(dense, many_images):
    """Whatever it tried, the heal starts from the pruned weights (or the chosen warm start): a
    heal given the probe's choice as a fixed recipe reaches the same weights."""
    model, report = _auto(dense, many_images)
    choice = report.recipe_probe["choice"]
    fixed = l1_prune_(copy.deepcopy(dense), 0.8)
    again = starfish.heal(fixed, dense, many_images, epochs=6, batch_size=16, quiet=True, recipe="paper",
                          lr=choice["lr"], warm_start=choice["warm_start"],
                          warm_start_samples=report.recipe_probe["warm_start_samples"] or 256)
    assert again.held_out_history[-1] == report.held_out_history[-1]
    a, b = state_copy(model), state_copy(fixed)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("overrides", [{"lr": 1e-3}, {"warm_start": "row_norm"}, {"recipe": "paper"},
                                       {"probe_budget": 0}])
def test_auto_never_overrides_the_user_or_the_paper_recipe(dense, images, overrides):
    report = starfish.heal(l1_prune_(copy.deepcopy(dense), 0.8), dense, images, epochs=1, quiet=True, **overrides)
    assert report.recipe_probe == {} and report.recipe_applied == ""
    expected = starfish.HealConfig(**overrides)
    assert (report.config["lr"], report.config["warm_start"]) == (expected.lr, expected.warm_start)


def test_a_small_heal_probes_only_what_its_budget_affords(dense, images, many_images):
    report = starfish.heal(l1_prune_(copy.deepcopy(dense), 0.8), dense, images, epochs=1, quiet=True)
    probe = report.recipe_probe
    assert probe["steps"] == 0 and probe["candidates"] == [] and probe["over_budget"] == list(PROBE_WARM_STARTS)
    assert (report.config["lr"], report.config["warm_start"]) == (6e-4, "none")
    assert "learning rates not probed" in " ".join(report.notes) and "not tried: over the budget" in " ".join(
        report.notes)
    # a larger heal affords the warm starts: scored, but no learning-rate steps yet
    larger = starfish.heal(l1_prune_(copy.deepcopy(dense), 0.8), dense, many_images, epochs=4, batch_size=16,
                           quiet=True, probe_budget=0.5)
    assert set(larger.recipe_probe["warm_starts"]) == {"none", *PROBE_WARM_STARTS}
    assert larger.recipe_probe["cost_sample_forwards"] <= larger.recipe_probe["budget_sample_forwards"]


def test_structured_pruning_probes_learning_rates(dense, many_images):
    model = copy.deepcopy(dense)
    pruner = tp.pruner.MetaPruner(model, torch.randn(1, 1, 8, 8), importance=tp.importance.MagnitudeImportance(),
                                  pruning_ratio=0.5, ignored_layers=[model.head],
                                  num_heads={m.qkv: m.num_heads for m in model.modules() if hasattr(m, "qkv")})
    tp_graph.track(pruner, torch.randn(1, 1, 8, 8))
    pruner.step()
    report = starfish.heal(model, dense, many_images, epochs=6, batch_size=16, quiet=True, probe_budget=0.9)
    probe = report.recipe_probe
    assert probe["warm_starts"] == {"none": report.held_out_before}  # no same-shape layer to warm-start
    assert [c["lr"] for c in probe["candidates"]] == list(PROBE_LRS)
    assert report.held_out_after <= report.held_out_before
