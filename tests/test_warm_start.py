"""Row-norm warm start: output norms restored per row, masks untouched, skipped tensors named."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_state_equal, l1_prune_, prunable_linears, state_copy
from torch import nn
from torch.nn.utils import prune

import starfish_plugin as starfish
from starfish_plugin import errors
from starfish_plugin.core.warm_start import row_norm_warm_start_


def _row_norms(model: nn.Module, x: torch.Tensor, name: str) -> torch.Tensor:
    """Per-output-row norm of layer ``name``'s bias-free output on its inputs in ``model``."""
    module = dict(model.named_modules())[name]
    seen = []
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        model(x)
    handle.remove()
    inp = seen[0]
    if isinstance(module, nn.Linear):
        y = F.linear(inp, module.weight).reshape(-1, module.weight.shape[0])
        return y.pow(2).sum(0).sqrt()
    y = F.conv2d(inp, module.weight, None, module.stride, module.padding, module.dilation, module.groups)
    return y.transpose(0, 1).reshape(module.weight.shape[0], -1).pow(2).sum(1).sqrt()


@pytest.mark.slow
def test_row_norms_match_the_dense_model_and_the_mask_holds(dense, images):
    pruned = l1_prune_(copy.deepcopy(dense), 0.9)
    plan = starfish.find_masks(pruned, dense)
    masks = plan.snapshot()
    result = row_norm_warm_start_(plan, dense, images.split(16), max_gain=1e6)  # no clipping here
    assert sorted(result["rescaled"]) == sorted(f"{n}.weight" for n, _ in prunable_linears(dense))
    assert result["median_gain"] > 1.5  # at 0.9 the outputs had collapsed
    pruned(images[:1])  # refresh the prune hooks' effective weights
    # the dense model's inputs to each layer, pruned weights: norms now equal the dense ones
    for name, _ in prunable_linears(dense):
        swapped = copy.deepcopy(dense)
        dict(swapped.named_modules())[name].weight.data = dict(pruned.named_modules())[name].weight.detach().clone()
        expected = _row_norms(dense, images, name)
        got = _row_norms(swapped, images, name)
        alive = got > 0
        torch.testing.assert_close(got[alive], expected[alive], rtol=1e-4, atol=1e-6)
    reread = starfish.find_masks(pruned, dense)
    assert reread.same_pattern(masks) and reread.masked_weights_are_zero()


def test_conv_rows_are_rescaled_per_output_channel():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.Flatten(),
                          nn.LazyLinear(4)).eval()
    x = torch.randn(16, 3, 8, 8)
    dense(x)
    pruned = copy.deepcopy(dense)
    for i in (0, 2):
        prune.l1_unstructured(pruned[i], "weight", amount=0.8)
    plan = starfish.find_masks(pruned, dense)
    result = row_norm_warm_start_(plan, dense, [x])
    assert sorted(result["rescaled"]) == ["0.weight", "2.weight"]
    pruned(x[:1])
    for i in ("0", "2"):
        swapped = copy.deepcopy(dense)
        dict(swapped.named_modules())[i].weight.data = dict(pruned.named_modules())[i].weight.detach().clone()
        torch.testing.assert_close(_row_norms(swapped, x, i), _row_norms(dense, x, i), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_heal_with_warm_start_reports_it_and_keeps_the_mask(dense, images, fast):
    pruned = l1_prune_(copy.deepcopy(dense), 0.9)
    dense_state = state_copy(dense)
    report = starfish.heal(pruned, dense, images, fast, warm_start="row_norm", warm_start_samples=32)
    assert report.warm_start_changed == 8
    assert report.mask_unchanged and report.masked_weights_zero
    assert report.config["warm_start"] == "row_norm"
    assert_state_equal(dense, dense_state)


def test_warm_start_skips_structurally_pruned_tensors(dense, images):
    import torch_pruning as tp

    pruned = copy.deepcopy(dense)
    example = images[:2]
    pruner = tp.pruner.MetaPruner(
        pruned, example, importance=tp.importance.GroupMagnitudeImportance(), pruning_ratio=0.5,
        root_module_types=[nn.Linear], ignored_layers=[pruned.head] + [b.attn for b in pruned.blocks]
        + [b.mlp.fc2 for b in pruned.blocks],
    )
    from starfish_plugin.adapters import tp_graph

    tp_graph.track(pruner)
    pruner.step()
    plan = starfish.find_masks(pruned, dense)
    result = row_norm_warm_start_(plan, dense, [images])
    changed = [e.name for e in plan if e.name in result["rescaled"]]
    assert all(dict(dense.named_parameters())[n].shape == dict(pruned.named_parameters())[n].shape for n in changed)
    assert result["skipped"], "the fc1/fc2 tensors whose shapes changed must be reported as skipped"


def test_bad_warm_start_is_refused_before_anything_changes(pruned, dense, images):
    saved = state_copy(pruned)
    with pytest.raises(errors.ConfigError, match="warm_start must be one of"):
        starfish.heal(pruned, dense, images, warm_start="rows")
    assert_state_equal(pruned, saved)


@pytest.mark.parametrize("warm_start", ["row_norm", "lstsq"])
def test_divergence_after_warm_start_restores_the_original_weights(pruned, dense, images, warm_start):
    saved = state_copy(pruned)
    with pytest.raises(errors.NonFiniteError, match="the healing loss became|held-out objective became"):
        starfish.heal(pruned, dense, images, lr=1e30, min_lr=1e29, epochs=2, quiet=True, warm_start=warm_start,
                      batch_size=16, if_worse="warn")
    assert_state_equal(pruned, saved)
