"""Healing never hurts: a held-out split judges every state, the best one is returned, and when
nothing beats the pruned model its weights come back bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_state_equal, l1_prune_, state_copy

import starfish_plugin as starfish
from starfish_plugin import errors
from starfish_plugin.core.holdout import MIN_HOLDOUT, holdout_size, split_rows
from starfish_plugin.plugins.manager import plugin_manager


@pytest.mark.parametrize("n", [1, 2, 3, 10, 63, 64, 65, 100, 320, 1000, 4321])
@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.25])
def test_the_split_never_overlaps_covers_every_sample_and_is_fixed_by_seed(n, fraction):
    train, held = split_rows(n, fraction, seed=3)
    assert not set(train.tolist()) & set(held.tolist())
    assert sorted(train.tolist() + held.tolist()) == list(range(n))
    assert len(held) == holdout_size(n, fraction)
    if fraction and n >= 2 * MIN_HOLDOUT:
        assert len(held) >= MIN_HOLDOUT and len(held) >= fraction * n
    elif fraction and n >= 2:
        assert len(held) == n // 2  # a small set: half of it, never all of it
    again_train, again_held = split_rows(n, fraction, seed=3)
    assert torch.equal(held, again_held) and torch.equal(train, again_train)
    if n >= 64 and fraction:
        assert not torch.equal(held, split_rows(n, fraction, seed=4)[1])


def _training_inputs(model):
    """Record the inputs of every forward that builds a graph (training steps only)."""
    seen: list[torch.Tensor] = []
    handle = model.register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].detach().clone()) if torch.is_grad_enabled() else None
    )
    return seen, handle


def test_held_out_samples_never_train_and_judge_every_state(dense, images, fast):
    pruned = l1_prune_(copy.deepcopy(dense))
    seen, handle = _training_inputs(pruned)
    try:
        report = starfish.heal(pruned, dense, images, fast)
    finally:
        handle.remove()
    train_rows, held_rows = split_rows(len(images), 0.1, seed=0)
    trained = torch.cat(seen)
    rows_of = {tuple(images[i].flatten().tolist()): i for i in range(len(images))}
    used = {rows_of[tuple(x.flatten().tolist())] for x in trained}
    assert used == set(train_rows.tolist())  # every training sample, and no held-out one
    assert report.held_out_samples == len(held_rows) == 32 and report.judged_on == "held-out"
    assert [h["stage"] for h in report.held_out_history] == ["start", "epoch 1", "epoch 2", "epoch 3"]
    assert report.held_out_before == report.held_out_history[0]["objective"]


def _held_out_mean_cosine(model, dense, images, blocks, held_rows):
    """The mean block cosine on the held-out rows, measured here, independently of the heal."""
    from starfish_plugin.base.outputs import capture_outputs
    from starfish_plugin.core.losses import cosine_distance

    x = images[held_rows]
    with torch.no_grad(), capture_outputs(model, blocks) as out, capture_outputs(dense, blocks) as ref:
        model(x)
        dense(x)
        return sum(1 - float(cosine_distance(out[b], ref[b])) for b in blocks) / len(blocks)


class Scramble:
    """Adds large noise to every trained tensor after step ``at``: the epochs after it are bad."""

    def __init__(self, model, at: int) -> None:
        self.model, self.at = model, at

    @starfish.hookimpl
    def starfish_step_ended(self, step, total_steps, config):
        if step == self.at:
            with torch.no_grad():
                for name, p in self.model.named_parameters():
                    if name.endswith("weight_orig"):
                        p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.5)


def test_the_best_epoch_is_returned_not_the_last(dense, images, fast):
    pruned = l1_prune_(copy.deepcopy(dense))
    plugin = Scramble(pruned, at=4)  # 2 steps per epoch: epochs 3 and 4 start from scrambled weights
    plugin_manager().register(plugin)
    try:
        report = starfish.heal(pruned, dense, images, fast, epochs=4)
    finally:
        plugin_manager().unregister(plugin)
    history = {h["stage"]: h for h in report.held_out_history}
    before_scramble = min(("epoch 1", "epoch 2"), key=lambda stage: history[stage]["objective"])
    assert min(history["epoch 3"]["objective"], history["epoch 4"]["objective"]) > history[before_scramble][
        "objective"] < history["start"]["objective"]
    assert report.returned_state == before_scramble
    assert report.held_out_after == history[before_scramble]["objective"]
    assert report.mask_unchanged and report.masked_weights_zero
    # the weights in the model are that epoch's: measured here, they score what the report says
    held_rows = split_rows(len(images), 0.1, seed=0)[1]
    mean = _held_out_mean_cosine(pruned, dense, images, report.blocks, held_rows)
    assert mean == pytest.approx(report.mean_cosine_after, abs=1e-5)
    assert mean == pytest.approx(history[before_scramble]["mean_cosine"], abs=1e-5)
    assert f"kept the best state ({before_scramble})" in " ".join(report.notes)


@pytest.mark.parametrize("lr", [3.0, 1e30])  # too large: worse without NaN, and diverging to NaN
def test_restore_is_bit_identical_when_healing_cannot_help(dense, images, fast, lr):
    pruned = l1_prune_(copy.deepcopy(dense))
    saved = state_copy(pruned)
    report = starfish.heal(pruned, dense, images, fast, lr=lr)
    assert_state_equal(pruned, saved)
    assert report.worse_restored and report.returned_state == "start"
    assert report.held_out_after == report.held_out_before
    assert report.block_cosine_after == report.block_cosine_before
    assert "put back unchanged" in report.summary()
    assert report.mask_unchanged and report.masked_weights_zero


def test_warn_keeps_the_last_state_and_says_it_is_worse(dense, images, fast):
    pruned = l1_prune_(copy.deepcopy(dense))
    with pytest.warns(errors.HealingWarning, match="did not improve the held-out score"):
        report = starfish.heal(pruned, dense, images, fast, lr=3.0, if_worse="warn")
    assert report.healing_worsened and not report.worse_restored
    assert report.returned_state == "epoch 3" and report.held_out_after > report.held_out_before
    assert "WARNING: the last state is worse" in report.summary()


def test_patience_stops_a_heal_that_stops_improving(dense, images, fast):
    pruned = l1_prune_(copy.deepcopy(dense))
    saved = state_copy(pruned)
    report = starfish.heal(pruned, dense, images, fast, lr=3.0, patience=2, epochs=6)
    assert report.stopped_early_after == 2 and len(report.epoch_losses) == 2
    assert report.returned_state == "start"
    assert_state_equal(pruned, saved)
    assert "stopped early after epoch 2" in report.summary()


def test_the_best_state_goes_to_disk_beyond_the_memory_budget(dense, images, fast, tmp_path):
    reference = l1_prune_(copy.deepcopy(dense))
    plugin = Scramble(reference, at=4)
    plugin_manager().register(plugin)
    try:
        kept = starfish.heal(reference, dense, images, fast, epochs=4)
        on_disk = l1_prune_(copy.deepcopy(dense))
        plugin.model = on_disk
        starfish.heal(on_disk, dense, images, fast, epochs=4, target_memory_budget=0, targets="memory",
                      cache_dir=str(tmp_path))
    finally:
        plugin_manager().unregister(plugin)
    assert kept.returned_state in ("epoch 1", "epoch 2")  # before the scramble: kept aside, then put back
    assert_state_equal(on_disk, state_copy(reference))
    assert not list(tmp_path.iterdir()), "the best state's file outlived the heal"


def test_small_sets_and_holdout_zero_are_judged_on_training_samples(dense, images, fast):
    report = starfish.heal(l1_prune_(copy.deepcopy(dense)), dense, images, fast, holdout=0, diagnostic_samples=16)
    assert report.judged_on == "training samples" and report.held_out_samples == 16 and report.n_samples == 64
    assert any("not held out" in note for note in report.notes)
    tiny = starfish.heal(l1_prune_(copy.deepcopy(dense)), dense, images[:1], fast)  # one sample: no split
    assert tiny.judged_on == "training samples" and tiny.n_samples == 1
    off = starfish.heal(l1_prune_(copy.deepcopy(dense)), dense, images, fast, holdout=0, diagnostic_samples=0,
                        if_worse="warn")
    assert off.judged_on == "" and off.returned_state == ""


def test_kl_and_next_token_heals_are_judged_on_their_own_objective(dense, images, fast):
    report = starfish.heal(l1_prune_(copy.deepcopy(dense)), dense, images, fast, loss="kl")
    assert report.held_out_after < report.held_out_before
    assert report.output_cosine_after is not None and report.output_cosine_after >= report.output_cosine_before
