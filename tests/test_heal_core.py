"""The recovery loop: loss falls, the mask holds, the dense model is untouched, inputs of every form."""

import copy

import pytest
import torch
from helpers import assert_state_equal, l1_prune_, prunable_linears, state_copy, tiny_vit
from torch.utils.data import DataLoader, TensorDataset

import starfish_plugin as starfish


def masked_weights(model):
    return {name: (m.weight_orig * m.weight_mask, m.weight_mask.bool()) for name, m in prunable_linears(model)}


def test_heal_lowers_the_alignment_loss_and_raises_block_cosine(pruned, dense, images, fast):
    report = starfish.heal(pruned, dense, images, fast)
    assert report.epoch_losses[-1] < report.epoch_losses[0]
    assert report.mean_cosine_after > report.mean_cosine_before
    assert all(report.block_cosine_after[b] > report.block_cosine_before[b] for b in report.blocks)
    assert report.blocks == ["blocks.0", "blocks.1"]
    # 64 images: 32 held out (at least 32), 32 train at batch 16
    assert report.steps == 3 * 2 and report.n_samples == 32 and report.held_out_samples == 32
    assert report.judged_on == "held-out" and report.returned_state.startswith("epoch")
    assert report.samples_per_second > 0 and report.peak_memory_bytes > 0


def test_masked_entries_stay_exactly_zero_and_pattern_is_identical(pruned, dense, images, fast):
    masks_before = {n: m.weight_mask.clone() for n, m in prunable_linears(pruned)}
    report = starfish.heal(pruned, dense, images, fast)
    assert report.mask_unchanged and report.masked_weights_zero
    for name, module in prunable_linears(pruned):
        assert torch.equal(module.weight_mask, masks_before[name])
        effective = module.weight_orig * module.weight_mask
        assert not effective[~module.weight_mask.bool()].any()
        assert torch.equal(module.weight, effective)  # write-back refreshed the stale attribute
        assert torch.isfinite(module.weight_orig).all()
    copy.deepcopy(pruned)  # the refreshed weight is a leaf again, so the healed model can be copied


def test_only_surviving_entries_train_everything_else_frozen(pruned, dense, images, fast):
    before = state_copy(pruned)
    flags = {n: p.requires_grad for n, p in pruned.named_parameters()}
    starfish.heal(pruned, dense, images, fast)
    after = pruned.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all(k.endswith("weight_orig") for k in changed)
    for name, module in prunable_linears(pruned):
        orig_before = before[f"{name}.weight_orig"]
        masked = ~module.weight_mask.bool()
        # masked entries of *_orig keep their dense values exactly (weight_decay=0)
        assert torch.equal(module.weight_orig[masked], orig_before[masked])
        assert not torch.equal(module.weight_orig[~masked], orig_before[~masked])
    assert {n: p.requires_grad for n, p in pruned.named_parameters()} == flags


def test_weight_decay_does_not_leak_into_masked_entries(pruned, dense, images, fast):
    before = state_copy(pruned)
    report = starfish.heal(pruned, dense, images, fast, weight_decay=0.1)
    assert report.mask_unchanged
    for name, module in prunable_linears(pruned):
        masked = ~module.weight_mask.bool()
        assert torch.equal(module.weight_orig[masked], before[f"{name}.weight_orig"][masked])


def test_dense_model_is_bit_identical_afterwards(pruned, dense, images, fast):
    dense.train()  # a mode heal must restore
    saved = state_copy(dense)
    flags = {n: p.requires_grad for n, p in dense.named_parameters()}
    n_hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in dense.modules())
    starfish.heal(pruned, dense, images, fast, loss="cosine+kl")
    assert_state_equal(dense, saved)
    assert all(m.training for m in dense.modules())
    assert {n: p.requires_grad for n, p in dense.named_parameters()} == flags
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in dense.modules()) == n_hooks
    assert all(p.grad is None for p in dense.parameters())


def test_pruned_model_mode_is_restored(pruned, dense, images, fast):
    pruned.train()
    starfish.heal(pruned, dense, images, fast)
    assert all(m.training for m in pruned.modules())


@pytest.mark.parametrize("form", ["tensor", "dataset", "dataloader", "pairs", "list_of_tensors"])
def test_every_calibration_form_heals_identically(form, dense, images, labels, fast):
    if form == "tensor":
        calibration = images
    elif form == "dataset":
        calibration = TensorDataset(images, labels)
    elif form == "dataloader":
        calibration = DataLoader(TensorDataset(images, labels), batch_size=10)
    elif form == "pairs":
        calibration = list(zip(images.split(16), labels.split(16)))
    else:
        calibration = list(images.split(7))
    pruned = l1_prune_(copy.deepcopy(dense))
    report = starfish.heal(pruned, dense, calibration, fast)
    reference = l1_prune_(copy.deepcopy(dense))
    starfish.heal(reference, dense, images, fast)
    assert report.n_samples == 32 and report.held_out_samples == 32
    for (_, a), (_, b) in zip(prunable_linears(pruned), prunable_linears(reference)):
        torch.testing.assert_close(a.weight_orig, b.weight_orig)


def test_online_targets_match_cached_targets(dense, images, fast):
    cached, online = l1_prune_(copy.deepcopy(dense)), l1_prune_(copy.deepcopy(dense))
    r1 = starfish.heal(cached, dense, images, fast, targets="memory")
    r2 = starfish.heal(online, dense, images, fast, targets="online")
    assert (r1.targets_mode, r2.targets_mode) == ("memory", "online")
    assert r1.target_cache_bytes == r1.target_cache_estimate_bytes > 0 and r2.target_cache_bytes == 0
    # fp16 targets against fp32 ones: close, not identical
    torch.testing.assert_close(r1.epoch_losses[-1], r2.epoch_losses[-1], rtol=2e-2, atol=1e-3)


def test_auto_targets_choose_by_budget(pruned, dense, images, fast):
    small = starfish.heal(l1_prune_(copy.deepcopy(dense)), dense, images, fast, target_memory_budget=1)
    assert small.targets_mode == "disk" and "exceeds the memory budget" in small.targets_reason
    assert "so it goes on disk in a temporary directory" in small.targets_reason
    big = starfish.heal(pruned, dense, images, fast)
    assert big.targets_mode == "memory" and "fits the memory budget" in big.targets_reason


@pytest.mark.parametrize("loss", ["mse", "kl", "ce", "cosine+kl", {"cosine": 1.0, "mse": 0.5}])
def test_every_loss_runs_through_the_same_loop(loss, pruned, dense, images, labels, fast):
    report = starfish.heal(pruned, dense, list(zip(images.split(16), labels.split(16))), fast, loss=loss)
    assert report.epoch_losses[-1] < report.epoch_losses[0]
    assert report.mask_unchanged and report.masked_weights_zero


def test_int32_labels_work_with_ce(pruned, dense, images, labels, fast):
    report = starfish.heal(pruned, dense, list(zip(images.split(16), labels.int().split(16))), fast, loss="ce")
    assert report.epoch_losses[-1] < report.epoch_losses[0]


def test_adaptive_block_weighting_weights_blocks_by_mismatch(pruned, dense, images, fast):
    from starfish_plugin.core.losses import HealLoss

    out = {"a": torch.ones(2, 3, 4), "b": torch.ones(2, 3, 4)}
    tgt = {"a": torch.ones(2, 3, 4), "b": -torch.ones(2, 3, 4)}  # a aligned (0), b opposite (2)
    uniform = HealLoss({"cosine": 1.0}, ["a", "b"]).block_term("cosine", out, tgt)
    adaptive = HealLoss({"cosine": 1.0}, ["a", "b"], block_weighting="adaptive").block_term("cosine", out, tgt)
    torch.testing.assert_close(uniform, torch.tensor(1.0))
    torch.testing.assert_close(adaptive, torch.tensor(2.0))  # all weight on the mismatched block
    report = starfish.heal(pruned, dense, images, fast, block_weighting="adaptive")
    assert report.epoch_losses[-1] < report.epoch_losses[0] and report.mask_unchanged


def test_cosine_reduction_token_vs_example():
    from starfish_plugin.core.losses import cosine_distance

    a = torch.randn(2, 3, 4)
    b = a.clone()
    b[:, 0] *= 5.0  # scaling a token leaves every cosine at 1
    assert cosine_distance(a, b, "token").abs() < 1e-6
    assert cosine_distance(a, b, "example") > 1e-3
    assert torch.equal(cosine_distance(a, b, "auto"), cosine_distance(a, b, "token"))


def test_seed_makes_heal_deterministic(dense, images, fast):
    a, b = l1_prune_(copy.deepcopy(dense)), l1_prune_(copy.deepcopy(dense))
    starfish.heal(a, dense, images, fast, seed=3)
    starfish.heal(b, dense, images, fast, seed=3)
    for (_, x), (_, y) in zip(prunable_linears(a), prunable_linears(b)):
        assert torch.equal(x.weight_orig, y.weight_orig)


def test_report_serialises(pruned, dense, images, fast):
    import json

    report = starfish.heal(pruned, dense, images, fast)
    data = json.loads(report.to_json())
    assert data["mask_unchanged"] is True and data["config"]["epochs"] == 3
    assert "mask unchanged: True" in report.summary()


def test_deeper_model_with_explicit_blocks_and_predicate(images, fast):
    dense = tiny_vit(depth=3)
    pruned = l1_prune_(copy.deepcopy(dense))
    r = starfish.heal(pruned, dense, images, fast, blocks=["blocks.0", "blocks.2"])
    assert r.blocks == ["blocks.0", "blocks.2"]
    r = starfish.heal(pruned, dense, images, fast, blocks=lambda name, m: name.endswith(".mlp"))
    assert r.blocks == ["blocks.0.mlp", "blocks.1.mlp", "blocks.2.mlp"]


def test_kl_diagnostics_bounds_hold_and_shrink_with_healing(pruned, dense, images, fast):
    from starfish_plugin.core.evaluate import kl_diagnostics

    before = kl_diagnostics(pruned, dense, images)
    assert before["bound_holds"] == 1.0 and before["kl"] > 0
    assert before["kl"] <= before["logit_range_bound"] <= before["representation_bound"]
    starfish.heal(pruned, dense, images, fast)
    after = kl_diagnostics(pruned, dense, images)
    assert after["bound_holds"] == 1.0
    assert after["representation_distance"] < before["representation_distance"]
    same = kl_diagnostics(copy.deepcopy(dense), dense, images)
    assert same["kl"] < 1e-6 and same["representation_distance"] < 1e-9


def test_bf16_autocast_heals_and_auto_means_fp32_on_cpu(dense, images, fast):
    bf16 = starfish.heal(l1_prune_(copy.deepcopy(dense)), dense, images, fast, precision="bf16")
    assert bf16.autocast == "bf16"
    assert bf16.epoch_losses[-1] < bf16.epoch_losses[0] and bf16.mask_unchanged and bf16.masked_weights_zero
    auto = starfish.heal(l1_prune_(copy.deepcopy(dense)), dense, images, fast)
    fp32 = starfish.heal(l1_prune_(copy.deepcopy(dense)), dense, images, fast, precision="fp32")
    assert auto.autocast == "" and auto.epoch_losses == fp32.epoch_losses


def test_local_blocks_train_each_block_on_its_own_loss_only(dense, images, fast):
    """With ``local_blocks`` the second block's loss never reaches the first block's weights: they
    end exactly as in a heal that aligns the first block alone."""
    settings = dict(recipe="paper", if_worse="warn")
    both = l1_prune_(copy.deepcopy(dense))
    starfish.heal(both, dense, images, fast, blocks=["blocks.0", "blocks.1"], local_blocks=True, **settings)
    first = l1_prune_(copy.deepcopy(dense))
    report = starfish.heal(first, dense, images, fast, blocks=["blocks.0"], **settings)
    assert report.output_aligned  # blocks.1 and the head learn from the output, detached at blocks.0
    for (name, a), (_, b) in zip(prunable_linears(both), prunable_linears(first)):
        if name.startswith("blocks.0."):
            assert torch.equal(a.weight_orig, b.weight_orig), name
    joint = l1_prune_(copy.deepcopy(dense))
    starfish.heal(joint, dense, images, fast, blocks=["blocks.0", "blocks.1"], **settings)
    assert not torch.equal(joint.blocks[0].mlp.fc1.weight_orig, both.blocks[0].mlp.fc1.weight_orig)
