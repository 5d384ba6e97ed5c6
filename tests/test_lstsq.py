"""Closed-form recovery (``warm_start="lstsq"``): masked ridge regression per output row."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_state_equal, l1_prune_, state_copy
from torch import nn
from torch.nn.utils import prune

import starfish_plugin as starfish
from starfish_plugin.core.lstsq import lstsq_recover_


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 8)).eval()


def test_each_row_is_the_masked_ridge_solution():
    dense = _mlp()
    pruned = copy.deepcopy(dense)
    prune.random_unstructured(pruned[0], "weight", amount=0.6)
    x = torch.randn(200, 12, generator=torch.Generator().manual_seed(1))
    plan = starfish.find_masks(pruned, dense)
    ridge = 1e-3
    lstsq_recover_(plan, pruned, dense, [x[:100], x[100:]], ridge=ridge)
    # the first layer sees the same inputs in both models: w_S = (X_S'X_S + lam I)^-1 X_S' X w_dense
    gram = x.double().T @ x.double()
    lam = ridge * gram.diagonal().mean()
    mask = pruned[0].weight_mask.bool()
    for r in range(16):
        s = mask[r]
        a = gram[s][:, s] + lam * torch.eye(int(s.sum()), dtype=torch.float64)
        b = (gram @ dense[0].weight[r].double())[s]
        expected = torch.linalg.solve(a, b)
        torch.testing.assert_close(pruned[0].weight_orig[r][s].double(), expected, rtol=1e-4, atol=1e-5)


def test_a_full_mask_gives_back_the_dense_weights_and_masked_entries_are_kept():
    dense = _mlp()
    pruned = copy.deepcopy(dense)
    prune.identity(pruned[0], "weight")  # a mask of ones
    prune.l1_unstructured(pruned[2], "weight", amount=0.5)
    kept_orig = pruned[2].weight_orig.detach().clone()
    with torch.no_grad():
        pruned[0].weight_orig.mul_(0.3)  # move it away from the dense weights
    x = torch.randn(300, 12, generator=torch.Generator().manual_seed(2))
    plan = starfish.find_masks(pruned, dense)
    result = lstsq_recover_(plan, pruned, dense, [x], ridge=1e-9)
    assert sorted(result["solved"]) == ["0.weight", "2.weight"]
    torch.testing.assert_close(pruned[0].weight_orig, dense[0].weight, rtol=1e-3, atol=1e-4)
    mask = pruned[2].weight_mask.bool()
    assert torch.equal(pruned[2].weight_orig[~mask], kept_orig[~mask])  # the toolkit's masked values stay
    assert not pruned[2].weight[~mask].any()


@pytest.mark.parametrize("groups", [1, 2, 8])
def test_convolutions_grouped_and_depthwise_come_closer_to_the_dense_output(groups):
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=groups), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    pruned = copy.deepcopy(dense)
    prune.l1_unstructured(pruned[0], "weight", amount=0.5)
    prune.l1_unstructured(pruned[2], "weight", amount=0.5)
    masks = [pruned[i].weight_mask.clone() for i in (0, 2)]
    # correlated channels and smooth maps (as real features are): what is pruned can be made up for
    g = torch.Generator().manual_seed(3)
    smooth = nn.functional.interpolate(torch.randn(64, 3, 3, 3, generator=g), size=(6, 6), mode="bilinear")
    x = torch.einsum("nchw,dc->ndhw", smooth, torch.randn(8, 3, generator=g))
    x = x + 0.05 * torch.randn(x.shape, generator=g)
    with torch.no_grad():
        first_before = (pruned[0](x) - dense[0](x)).pow(2).mean()
        before = (pruned(x) - dense(x)).pow(2).mean()
        result = lstsq_recover_(starfish.find_masks(pruned, dense), pruned, dense, [x[:32], x[32:]])
        first_after = (pruned[0](x) - dense[0](x)).pow(2).mean()
        after = (pruned(x) - dense(x)).pow(2).mean()
    assert result["solved"] == ["0.weight", "2.weight"] and result["passes"] == 1
    assert first_after < 0.9 * first_before  # the first layer gets the dense inputs: its own error falls
    assert after < 0.9 * before  # and the second makes up for the first's remaining error
    for i, mask in zip((0, 2), masks):
        assert torch.equal(pruned[i].weight_mask, mask) and not pruned[i].weight[mask == 0].any()


def test_wide_rows_solved_by_conjugate_gradients_match_the_exact_solution(monkeypatch):
    import starfish_plugin.core.lstsq as lstsq

    dense = _mlp()
    x = torch.randn(400, 12, generator=torch.Generator().manual_seed(5)) @ torch.randn(12, 12)  # correlated
    solutions = []
    for width in (512, 0):  # exact, then conjugate gradients for every row
        monkeypatch.setattr(lstsq, "DIRECT_MAX_WIDTH", width)
        pruned = copy.deepcopy(dense)
        prune.l1_unstructured(pruned[0], "weight", amount=0.6)
        lstsq_recover_(starfish.find_masks(pruned, dense), pruned, dense, [x])
        solutions.append(pruned[0].weight.detach().clone())
    torch.testing.assert_close(solutions[1], solutions[0], rtol=1e-3, atol=1e-4)


def test_blocks_are_solved_in_order_each_on_the_already_solved_ones(dense, images):
    pruned = l1_prune_(copy.deepcopy(dense), 0.8)
    plan = starfish.find_masks(pruned, dense)
    result = lstsq_recover_(plan, pruned, dense, [images], blocks=["blocks.0", "blocks.1"])
    assert result["passes"] == 2 and len(result["solved"]) == 8 and not result["skipped"]


def test_heal_with_lstsq_warm_start_improves_and_keeps_every_mask(dense, images, fast):
    pruned = l1_prune_(copy.deepcopy(dense), 0.8)
    dense_state = state_copy(dense)
    masks = {n: b.clone() for n, b in pruned.named_buffers() if n.endswith("weight_mask")}
    report = starfish.heal(pruned, dense, images, fast, warm_start="lstsq", epochs=1)
    history = {h["stage"]: h["objective"] for h in report.held_out_history}
    assert history["warm start"] < history["start"]
    assert report.warm_start_changed == 8 and report.mask_unchanged and report.masked_weights_zero
    assert all(torch.equal(b, masks[n]) for n, b in pruned.named_buffers() if n.endswith("weight_mask"))
    assert_state_equal(dense, dense_state)


def test_lstsq_keeps_2_4_under_torch_ao_parametrizations(dense, images, fast):
    from torch.ao.pruning import WeightNormSparsifier

    from starfish_plugin.core.nm_pattern import nm_violation

    pruned = copy.deepcopy(dense)
    sparsifier = WeightNormSparsifier(sparsity_level=1.0, sparse_block_shape=(1, 4), zeros_per_block=2)
    sparsifier.prepare(pruned, [{"tensor_fqn": f"blocks.{i}.mlp.fc1.weight"} for i in range(2)])
    sparsifier.step()
    report = starfish.heal(pruned, dense, images, fast, warm_start="lstsq", epochs=1)
    assert report.warm_start_changed == 2 and report.mask_unchanged
    for i in range(2):
        assert nm_violation(pruned.blocks[i].mlp.fc1.weight.detach(), 2, 4) is None


def test_hugging_face_conv1d_weights_are_solved_in_their_own_layout():
    """GPT-2 keeps its linear layers as ``Conv1D`` with the weight as ``[in, out]``."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    dense = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4,
                                                                 n_positions=16)).eval()
    pruned = copy.deepcopy(dense)
    prune.identity(pruned.transformer.h[0].mlp.c_fc, "weight")  # a mask of ones, weights moved away
    with torch.no_grad():
        pruned.transformer.h[0].mlp.c_fc.weight_orig.mul_(0.3)
    ids = torch.randint(0, 64, (64, 16), generator=torch.Generator().manual_seed(1))
    result = lstsq_recover_(starfish.find_masks(pruned, dense), pruned, dense, [ids], ridge=1e-9)
    assert result["solved"] == ["transformer.h.0.mlp.c_fc.weight"]
    # its inputs come out of a layer norm (each row sums to zero): the weights are unique only up to
    # that direction, so compare what the layer computes
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-4)


def test_closed_form_recovery_on_its_own_is_a_heal_with_no_epochs(dense, images):
    pruned = l1_prune_(copy.deepcopy(dense), 0.8)
    report = starfish.heal(pruned, dense, images, warm_start="lstsq", epochs=0, quiet=True)
    assert report.steps == 0 and report.epoch_losses == [] and "no epochs" in report.summary()
    assert [h["stage"] for h in report.held_out_history] == ["start", "warm start"]
    assert report.returned_state == "warm start" and report.held_out_after < report.held_out_before
    assert report.mask_unchanged and report.masked_weights_zero
    saved = state_copy(pruned)
    with pytest.raises(starfish.errors.ConfigError, match="epochs=0 heals with the warm start alone"):
        starfish.heal(pruned, dense, images, epochs=0)
    assert_state_equal(pruned, saved)


class _ResidualMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.up, self.act, self.down = nn.Linear(12, 24), nn.Linear(24, 48), nn.GELU(), nn.Linear(48, 24)
        self.out = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return self.out(h + self.down(self.act(self.up(h))))


def test_a_layer_whose_inputs_torch_pruning_removed_is_solved_onto_the_dense_outputs():
    tp = pytest.importorskip("torch_pruning")
    torch.manual_seed(0)
    dense = _ResidualMLP().eval()
    pruned = copy.deepcopy(dense)
    x = torch.randn(512, 12, generator=torch.Generator().manual_seed(3))
    tp.pruner.MetaPruner(pruned, x[:2], importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=0.5,
                         ignored_layers=[pruned.inp, pruned.down, pruned.out]).step()
    assert pruned.down.in_features == 24 < dense.down.in_features  # the hidden units went
    plan = starfish.find_masks(pruned, dense)
    unseen = x[256:]

    def error() -> float:
        with torch.no_grad():
            return float((pruned(unseen) - dense(unseen)).pow(2).mean())

    before = error()
    result = lstsq_recover_(plan, pruned, dense, [x[:128], x[128:256]])
    # the output projection keeps its outputs: solved; the up projection lost outputs: left as it was
    assert result["solved"] == ["down.weight"] and "up.weight" in result["skipped"]
    assert error() < 0.5 * before


def test_a_closed_form_that_finds_no_layer_to_solve_says_so():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 16), nn.Linear(16, 4)).eval()
    pruned = copy.deepcopy(dense)
    prune.l1_unstructured(pruned[0], "weight", amount=0.5)  # an embedding: no closed form for it
    ids = torch.randint(0, 50, (64, 6), generator=torch.Generator().manual_seed(4))
    with pytest.warns(starfish.errors.HealingWarning, match="lstsq warm start changed no weight"):
        report = starfish.heal(pruned, dense, ids, blocks=["1", "2"], warm_start="lstsq", epochs=0, if_worse="warn",
                              quiet=True)
    assert report.warm_start_changed == 0 and any("0.weight" in note for note in report.notes)
