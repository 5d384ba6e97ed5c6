"""Every form torch.nn.utils.prune produces, and parametrization masks from torch.ao and torchao."""

import copy

import pytest
import torch
from helpers import prunable_linears
from torch import nn
from torch.nn.utils import parametrize, prune

import starfish_plugin as starfish


def _unstructured(model):
    for _, m in prunable_linears(model):
        prune.l1_unstructured(m, "weight", amount=0.6)


def _random_unstructured(model):
    torch.manual_seed(0)
    for _, m in prunable_linears(model):
        prune.random_unstructured(m, "weight", amount=0.6)


def _ln_structured(model):
    for _, m in prunable_linears(model):
        prune.ln_structured(m, "weight", amount=0.4, n=2, dim=0)


def _random_structured(model):
    torch.manual_seed(0)
    for _, m in prunable_linears(model):
        prune.random_structured(m, "weight", amount=0.4, dim=1)


def _global(model):
    params = [(m, "weight") for _, m in prunable_linears(model)]
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=0.7)


def _custom(model):
    for _, m in prunable_linears(model):
        prune.custom_from_mask(m, "weight", mask=(torch.rand_like(m.weight) > 0.5).float())


def _twice(model):
    for _, m in prunable_linears(model):
        prune.l1_unstructured(m, "weight", amount=0.4)
        prune.ln_structured(m, "weight", amount=0.3, n=1, dim=0)
    assert isinstance(next(iter(prunable_linears(model)[0][1]._forward_pre_hooks.values())), prune.PruningContainer)


def _bias_too(model):
    for _, m in prunable_linears(model):
        prune.l1_unstructured(m, "weight", amount=0.5)
        prune.l1_unstructured(m, "bias", amount=0.5)


PRUNE_FORMS = {
    "l1_unstructured": _unstructured,
    "random_unstructured": _random_unstructured,
    "ln_structured": _ln_structured,
    "random_structured": _random_structured,
    "global_unstructured": _global,
    "custom_from_mask": _custom,
    "pruned_twice": _twice,
    "weight_and_bias": _bias_too,
}


@pytest.mark.parametrize("form", PRUNE_FORMS)
def test_prune_forms_heal_and_stay_in_form(form, dense, images, fast):
    pruned = copy.deepcopy(dense)
    PRUNE_FORMS[form](pruned)
    plan = starfish.find_masks(pruned)
    assert plan.adapter == "torch_masks" and {e.form for e in plan} == {"prune_hook"}
    masks = {e.name: e.mask.clone() for e in plan}
    report = starfish.heal(pruned, dense, images, fast)
    assert report.mask_unchanged and report.masked_weights_zero
    assert report.epoch_losses[-1] < report.epoch_losses[0]
    # still in torch.nn.utils.prune's form: hooks, *_orig and *_mask all there
    for _, m in prunable_linears(pruned):
        assert any(isinstance(h, prune.BasePruningMethod) for h in m._forward_pre_hooks.values())
        assert hasattr(m, "weight_orig") and hasattr(m, "weight_mask")
    # prune.remove makes it permanent with the same zeros
    for name, m in prunable_linears(pruned):
        for tensor_name in ("weight", "bias"):
            if prune.is_pruned(m) and hasattr(m, tensor_name + "_mask"):
                prune.remove(m, tensor_name)
                assert not getattr(m, tensor_name)[~masks[f"{name}.{tensor_name}"]].any()
    assert not prune.is_pruned(pruned)


def test_structured_mask_keeps_whole_rows_zero(dense, images, fast):
    pruned = copy.deepcopy(dense)
    _ln_structured(pruned)
    starfish.heal(pruned, dense, images, fast)
    for _, m in prunable_linears(pruned):
        dead_rows = m.weight_mask.sum(dim=1) == 0
        assert dead_rows.any() and not m.weight[dead_rows].any()


def _ao_config(model):
    return [{"tensor_fqn": f"{name}.weight"} for name, _ in prunable_linears(model)]


def test_torch_ao_weight_norm_sparsifier_then_squash_mask(dense, images, fast):
    from torch.ao.pruning import WeightNormSparsifier

    pruned = copy.deepcopy(dense)
    sparsifier = WeightNormSparsifier(sparsity_level=1.0, sparse_block_shape=(1, 4), zeros_per_block=2)
    sparsifier.prepare(pruned, _ao_config(pruned))
    sparsifier.step()
    plan = starfish.find_masks(pruned)
    assert {e.form for e in plan} == {"parametrization"}
    masks = {e.name: e.mask.clone() for e in plan}
    report = starfish.heal(pruned, dense, images, fast)
    assert report.mask_unchanged and report.masked_weights_zero
    assert report.epoch_losses[-1] < report.epoch_losses[0]
    for _, m in prunable_linears(pruned):
        assert parametrize.is_parametrized(m, "weight")
    sparsifier.squash_mask()
    for name, m in prunable_linears(pruned):
        assert not parametrize.is_parametrized(m)
        assert not m.weight[~masks[f"{name}.weight"]].any()
        # 2:4 along rows survives healing exactly
        assert ((m.weight.reshape(-1, 4) != 0).sum(dim=1) <= 2).all()


def test_torchao_wanda_sparsifier(dense, images, fast):
    from torchao.sparsity import WandaSparsifier

    pruned = copy.deepcopy(dense)
    sparsifier = WandaSparsifier(sparsity_level=0.5)
    sparsifier.prepare(pruned, _ao_config(pruned))
    with torch.no_grad():
        pruned(images)  # Wanda's activation observers need data
    sparsifier.step()
    plan = starfish.find_masks(pruned)
    assert len(plan) == len(prunable_linears(pruned)) and abs(plan.sparsity - 0.5) < 0.01
    report = starfish.heal(pruned, dense, images, fast)
    assert report.mask_unchanged and report.masked_weights_zero
    assert report.epoch_losses[-1] < report.epoch_losses[0]
    sparsifier.squash_mask()
    assert all(not parametrize.is_parametrized(m) for _, m in prunable_linears(pruned))
    assert abs(sum(float((m.weight == 0).float().mean()) for _, m in prunable_linears(pruned)) / len(plan) - 0.5) < 0.01


def test_torchao_own_fake_sparsity_class(dense, images, fast):
    from torchao.prototype.sparsity.sparsifier.utils import FakeSparsity

    pruned = copy.deepcopy(dense)
    for _, m in prunable_linears(pruned):
        mask = m.weight.abs() > m.weight.abs().flatten().kthvalue(m.weight.numel() // 2).values
        parametrize.register_parametrization(m, "weight", FakeSparsity(mask))
    assert not isinstance(
        prunable_linears(pruned)[0][1].parametrizations.weight[0], torch.ao.pruning.FakeSparsity
    )
    report = starfish.heal(pruned, dense, images, fast)
    assert report.mask_unchanged and report.masked_weights_zero
    assert report.epoch_losses[-1] < report.epoch_losses[0]
    for _, m in prunable_linears(pruned):
        parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
        assert isinstance(m.weight, nn.Parameter)


def test_mixed_hook_and_parametrization_forms(dense, images, fast):
    from torch.ao.pruning import FakeSparsity

    pruned = copy.deepcopy(dense)
    linears = prunable_linears(pruned)
    for i, (_, m) in enumerate(linears):
        if i % 2:
            prune.l1_unstructured(m, "weight", amount=0.5)
        else:
            parametrize.register_parametrization(m, "weight", FakeSparsity(torch.rand_like(m.weight) > 0.5))
    plan = starfish.find_masks(pruned)
    assert {e.form for e in plan} == {"prune_hook", "parametrization"} and len(plan) == len(linears)
    report = starfish.heal(pruned, dense, images, fast)
    assert report.mask_unchanged and report.masked_weights_zero


def test_plan_reports_sparsity_and_names(pruned):
    plan = starfish.find_masks(pruned)
    assert isinstance(plan, starfish.SparsityPlan)
    assert abs(plan.sparsity - 0.7) < 0.01
    assert "blocks.0.attn.qkv.weight" in plan.names
    assert "read by 'torch_masks'" in plan.describe()


def test_the_mask_snapshot_notices_a_single_flipped_entry(dense):
    pruned = copy.deepcopy(dense)
    _unstructured(pruned)
    plan = starfish.find_masks(pruned, dense)
    snapshot = plan.snapshot()
    assert all(isinstance(digest, str) for digest in snapshot.values())  # digests, not copies of the masks
    assert starfish.find_masks(pruned, dense).same_pattern(snapshot)
    _, module = prunable_linears(pruned)[-1]
    with torch.no_grad():
        module.weight_mask.view(-1)[0] = 1 - module.weight_mask.view(-1)[0]
    assert not starfish.find_masks(pruned, dense).same_pattern(snapshot)
