"""Weak classes of misuse: config values, non-finite numbers and their causes, frozen tensors,
an unrelated dense model, healing that makes things worse. Each ends in a clear error before
anything changes, a warning, or the right behaviour."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import assert_state_equal, l1_prune_, state_copy, tiny_vit

import starfish_plugin as starfish
from starfish_plugin import errors


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("weight_decay", math.nan, "weight_decay must be a finite number >= 0"),
        ("weight_decay", math.inf, "weight_decay must be a finite number >= 0"),
        ("loss", {"cosine": "1"}, "loss weight of 'cosine' must be a number"),
        ("loss", {"cosine": math.inf}, "must be finite"),
        ("device", "foo", "device 'foo' is not a device torch knows"),
        ("seed", 1.5, "seed must be an integer"),
        ("seed", True, "seed must be an integer"),
        ("target_memory_budget", math.nan, "target_memory_budget must be a finite number >= 0"),
        ("diagnostic_samples", 2.5, "diagnostic_samples must be an integer >= 0"),
        ("quiet", "no", "quiet must be True or False"),
        ("cache_dir", 3, "cache_dir must be a directory path"),
        ("kl_temperature", math.inf, "kl_temperature must be a finite number > 0"),
        ("if_worse", "ignore", "if_worse must be one of"),
    ],
)
def test_every_config_value_is_validated(pruned, dense, images, field, value, message):
    saved = state_copy(pruned)
    with pytest.raises(errors.ConfigError, match=message):
        starfish.HealConfig(**{field: value})
    with pytest.raises(errors.ConfigError, match=message):
        starfish.heal(pruned, dense, images, **{field: value})
    assert_state_equal(pruned, saved)


def test_if_worse_restore_needs_a_judgement():
    with pytest.raises(errors.ConfigError, match="holdout=0 with diagnostic_samples=0 switches off"):
        starfish.HealConfig(holdout=0, diagnostic_samples=0)
    starfish.HealConfig(holdout=0, diagnostic_samples=0, if_worse="warn")  # no judgement asked for: fine


@pytest.mark.parametrize(
    "setting, message",
    [
        ("fp16", "trained weights are torch.float16.*Heal in fp32"),
        ("weight_decay", r"weight_decay \* lr = 30 >= 1.*Lower HealConfig.weight_decay"),
        ("lr", r"8 of 8 trained tensors diverged to NaN/Inf.*Lower HealConfig.lr \(now 1e\+08"),
    ],
)
@pytest.mark.parametrize("if_worse", ["warn", "restore"])
def test_a_non_finite_loss_names_its_real_cause(images, fast, setting, message, if_worse):
    """``if_worse="warn"``: a ``NonFiniteError``; ``"restore"`` (the default): the heal stops and
    returns the pruned weights bit for bit, with a ``HealingWarning`` naming the same cause."""
    dense, x, overrides = tiny_vit(), images, {}
    if setting == "fp16":
        dense, x = dense.half(), images.half()
    elif setting == "weight_decay":
        overrides = {"weight_decay": 1e4, "epochs": 6}
    else:
        overrides = {"lr": 1e8, "loss": "mse"}
    pruned = l1_prune_(copy.deepcopy(dense))
    pruned.head.bias.requires_grad_(False)
    flags = [p.requires_grad for p in pruned.parameters()]
    saved = state_copy(pruned)
    if if_worse == "warn":
        with pytest.raises(errors.NonFiniteError, match=message):
            starfish.heal(pruned, dense, x, fast, if_worse="warn", **overrides)
    else:
        with pytest.warns(errors.HealingWarning, match="healing diverged.*" + message):
            report = starfish.heal(pruned, dense, x, fast, **overrides)
        assert report.diverged_in_epoch >= 1 and report.worse_restored and report.returned_state == "start"
    assert_state_equal(pruned, saved)  # restored
    assert [p.requires_grad for p in pruned.parameters()] == flags  # and the requires_grad flags too


def test_non_finite_pruned_weights_are_refused_before_healing(pruned, dense, images, fast):
    with torch.no_grad():
        pruned.blocks[1].mlp.fc2.weight_orig[0, 0] = math.inf  # (NaN too; Inf compares equal below)
    saved = state_copy(pruned)
    with pytest.raises(errors.NonFiniteError, match=r"blocks.1.mlp.fc2.weight_orig holds 1 NaN/Inf value"):
        starfish.heal(pruned, dense, images, fast)
    assert_state_equal(pruned, saved)


def test_an_unrelated_dense_model_is_warned_about(images, fast):
    dense, stranger = tiny_vit(seed=0), tiny_vit(seed=5)
    pruned = l1_prune_(copy.deepcopy(dense))
    with pytest.warns(errors.HealingWarning, match="barely resemble the dense model's"):
        report = starfish.heal(pruned, stranger, images, fast)
    assert any("barely resemble" in note for note in report.notes)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", errors.HealingWarning)  # the right dense model: no warning
        starfish.heal(l1_prune_(copy.deepcopy(dense)), dense, images, fast)


def test_user_frozen_tensors_stay_frozen_and_unchanged(pruned, dense, images, fast):
    frozen = pruned.blocks[0].mlp.fc1.weight_orig
    frozen.requires_grad_(False)
    before = frozen.detach().clone()
    trained_before = pruned.blocks[1].mlp.fc1.weight_orig.detach().clone()
    report = starfish.heal(pruned, dense, images, fast)
    assert torch.equal(frozen, before) and not frozen.requires_grad
    assert not torch.equal(pruned.blocks[1].mlp.fc1.weight_orig, trained_before)
    assert pruned.blocks[1].mlp.fc1.weight_orig.requires_grad  # the flags are as they were
    assert any("frozen by requires_grad=False" in note and "blocks.0.mlp.fc1.weight_orig" in note
               for note in report.notes)


def test_nothing_to_train_is_refused(dense, images, fast):
    frozen = l1_prune_(copy.deepcopy(dense))
    frozen.requires_grad_(False)  # e.g. a copy of a dense model frozen as a teacher
    saved = state_copy(frozen)
    with pytest.raises(errors.NothingToTrainError, match=r"pruned.requires_grad_\(True\)"):
        starfish.heal(frozen, dense, images, fast)
    assert_state_equal(frozen, saved)
    assert not any(p.requires_grad for p in frozen.parameters())
    empty = l1_prune_(copy.deepcopy(dense), amount=1.0)
    with pytest.raises(errors.NothingToTrainError, match="pruned to nothing"):
        starfish.heal(empty, dense, images, fast)


def test_layer_macs_count_linear_and_conv_products():
    from starfish_plugin.core.costs import layer_macs

    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(100, 3))
    # conv: 4 x 5 x 5 outputs, each 2 x 3 x 3 products; linear: 3 outputs x 100 inputs
    assert layer_macs(model, torch.zeros(1, 2, 5, 5)) == 4 * 25 * 18 + 3 * 100
    grouped = torch.nn.Conv2d(4, 4, 3, padding=1, groups=4)
    assert layer_macs(grouped, torch.zeros(1, 4, 5, 5)) == 4 * 25 * 9


def test_summary_of_an_unstructured_heal(pruned, dense, images, fast):
    report = starfish.heal(pruned, dense, images, fast, epochs=1)
    text = report.summary()
    assert "70.0% sparsity" in text and "(1 epoch)" in text and "->" not in text.splitlines()[1]
    assert "mean block cosine to the dense model" in text
    assert report.macs_dense == 0 and report.parameters_dense == report.parameters_pruned
