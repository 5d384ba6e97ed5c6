"""N:M (2:4, 4:8) sparsity: inferred from zeros when validated, preserved exactly through healing."""

import copy

import pytest
import torch
from helpers import prunable_linears
from torch.ao.pruning import WeightNormSparsifier
from torch.nn.utils import prune

import starfish_plugin as starfish
from starfish_plugin import errors
from starfish_plugin.adapters.nm_layouts import infer_masks_from_zeros
from starfish_plugin.core.nm_pattern import check_nm, nm_violation
from starfish_plugin.errors import NMPatternError


def nm_prune_(model, n=2, m=4, squash=True):
    sparsifier = WeightNormSparsifier(sparsity_level=1.0, sparse_block_shape=(1, m), zeros_per_block=m - n)
    sparsifier.prepare(model, [{"tensor_fqn": f"{name}.weight"} for name, _ in prunable_linears(model)])
    sparsifier.step()
    if squash:
        sparsifier.squash_mask()
    return sparsifier


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8)])
def test_squashed_nm_zeros_heal_and_stay_nm(n, m, dense, images, fast):
    pruned = copy.deepcopy(dense)
    nm_prune_(pruned, n, m)
    zeros = {name: lin.weight == 0 for name, lin in prunable_linears(pruned)}
    plan = starfish.find_masks(pruned)
    assert plan.adapter == "nm_layouts" and f"{n}:{m} validated for all {len(zeros)} tensors" in plan.notes[0]
    report = starfish.heal(pruned, dense, images, fast)
    assert report.mask_unchanged and report.masked_weights_zero
    assert report.epoch_losses[-1] < report.epoch_losses[0]
    for name, lin in prunable_linears(pruned):
        assert torch.equal(lin.weight == 0, zeros[name])
        check_nm(lin.weight, name, n, m)


def test_parametrized_24_survives_healing_and_squash(dense, images, fast):
    pruned = copy.deepcopy(dense)
    sparsifier = nm_prune_(pruned, squash=False)
    report = starfish.heal(pruned, dense, images, fast)
    assert report.adapter == "torch_masks" and report.mask_unchanged
    sparsifier.squash_mask()
    for name, lin in prunable_linears(pruned):
        check_nm(lin.weight, name)


def test_unstructured_zeros_need_an_opt_in(dense, images, fast):
    pruned = copy.deepcopy(dense)
    for _, lin in prunable_linears(pruned):
        prune.l1_unstructured(lin, "weight", amount=0.6)
        prune.remove(lin, "weight")
    with pytest.raises(errors.MaskNotFoundError, match="infer_masks_from_zeros"):
        starfish.find_masks(pruned)
    infer_masks_from_zeros(pruned)
    report = starfish.heal(pruned, dense, images, fast)
    assert "opted in" in report.notes[0] and report.masked_weights_zero and report.mask_unchanged


def test_check_nm_names_the_tensor_and_the_first_bad_group():
    w = torch.zeros(4, 8)
    w[0, :2] = 1.0
    w[2, 4:7] = 1.0
    assert nm_violation(w) == (2, 4, 3)
    with pytest.raises(NMPatternError, match=r"blocks.0.fc1.weight is not 2:4 sparse: row 2, columns 4..7 hold 3"):
        check_nm(w, "blocks.0.fc1.weight")
    with pytest.raises(NMPatternError, match="not a multiple of 4"):
        check_nm(torch.zeros(4, 6), "odd")
    with pytest.raises(NMPatternError, match="needs a 2-D weight"):
        check_nm(torch.zeros(4, 4, 4), "conv")
    assert issubclass(NMPatternError, ValueError)


def test_packing_checks_pattern_shape_and_cuda_and_modifies_nothing(dense):
    from starfish_plugin.deploy.semi_structured import check_packable, pack_semi_structured_
    from starfish_plugin.errors import SemiStructuredError

    model = copy.deepcopy(dense)
    nm_prune_(model)
    names = [name for name, _ in prunable_linears(model)]
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    # the tiny ViT's 32-wide layers are below the fp16 kernels' 64-column tile
    with pytest.raises(SemiStructuredError, match=r"multiple of 32 and the columns a multiple of 64"):
        check_packable(model.blocks[0].attn.qkv.weight.half(), "blocks.0.attn.qkv.weight")
    with pytest.raises(SemiStructuredError, match="take .* not torch.float64"):
        check_packable(torch.zeros(64, 64, dtype=torch.float64), "w")
    with pytest.raises(NMPatternError, match="is not 2:4 sparse"):
        check_packable(torch.ones(64, 64), "dense.weight")
    nm_24 = torch.tensor([1.0, 0.0, 2.0, 0.0]).repeat(64, 16)  # 64 x 64, 2:4
    assert check_packable(nm_24.half(), "ok") is None  # 2:4, fp16, 64 x 64 tiles the kernels: no error
    with pytest.raises(SemiStructuredError, match="not Linear layers"):
        pack_semi_structured_(model, ["blocks.0.norm1"])
    if not torch.cuda.is_available():
        big = torch.nn.Sequential(torch.nn.Linear(64, 64)).half()
        with torch.no_grad():
            big[0].weight.copy_(nm_24)
        with pytest.raises(SemiStructuredError, match="only on CUDA GPUs"):
            pack_semi_structured_(big, ["0"])
        assert torch.equal(big[0].weight, nm_24.half())
    with pytest.raises(SemiStructuredError, match=r"cusparselt 2:4 kernels take .* not torch.float32"):
        pack_semi_structured_(model, names)
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


def test_a_dense_model_with_structural_zeros_is_not_taken_for_pruned(dense, images, fast):
    model = copy.deepcopy(dense)
    with torch.no_grad():  # a one-hot-like layer: every row has a single non-zero, so it passes 2:4
        fc = model.blocks[0].mlp.fc1
        fc.weight.zero_()
        fc.weight[torch.arange(fc.out_features), torch.arange(fc.out_features) % fc.in_features] = 1.0
    reference = copy.deepcopy(model)
    pruned = copy.deepcopy(model)
    with pytest.raises(errors.MaskNotFoundError, match="no pruning mask found in VisionTransformer"):
        starfish.heal(pruned, reference, images, fast)  # no zeros are new relative to dense
    assert starfish.find_masks(pruned).adapter == "nm_layouts"  # without dense, the zeros are all it has
