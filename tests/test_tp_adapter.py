"""Torch-Pruning: attach, kept-channel tracking, heads, save/load, bad input; real pruners throughout."""

import copy
import warnings

import pytest
import timm
import torch
import torch_pruning as tp
from helpers import assert_state_equal, improved_or_restored, state_copy, tiny_vit
from torch import nn
from tp_cases import CASES

import starfish_plugin as starfish
import starfish_plugin.errors as starfish_errors
from starfish_plugin import errors
from starfish_plugin.adapters import tp_graph

warnings.filterwarnings("ignore", message="Unwrapped parameters detected")


SLOW_CASES = {"tv_vit_b_16", "tv_convnext_tiny", "tv_efficientnet_b0"}  # full-size models: seconds each


def _heads(model):
    return {m.qkv: m.num_heads for m in model.modules() if isinstance(m, timm.layers.Attention)}


def vit_pruner(model, example, ratio=0.25, importance=None, pruner_cls=tp.pruner.MetaPruner, **kwargs):
    importance = importance or tp.importance.GroupMagnitudeImportance(p=2)
    return pruner_cls(model, example, importance=importance, pruning_ratio=ratio,
                      ignored_layers=[model.head], num_heads=_heads(model), **kwargs)


@pytest.fixture
def dense4():
    """A two-block ViT with four heads (room for head pruning)."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=8, patch_size=4, in_chans=1, num_classes=5, embed_dim=32, depth=2,
                             num_heads=4, mlp_ratio=2.0).eval()


@pytest.fixture
def cfg():
    return starfish.HealConfig(epochs=3, lr=3e-3, batch_size=16, quiet=True, diagnostic_samples=64)


def test_attach_iterative_embedding_heads_and_mlp(dense4, images, cfg):
    model = copy.deepcopy(dense4)
    pruner = vit_pruner(model, images[:1], iterative_steps=2, prune_num_heads=True, head_pruning_ratio=0.5)
    handle = starfish.attach(pruner, dense4, images, cfg)
    for step in (1, 2):
        pruner.step()
        report = handle.reports[-1]
        assert handle.steps == step and report.adapter == "torch_pruning"
        assert report.epoch_losses[-1] < report.epoch_losses[0]
        assert improved_or_restored(report)
        assert all(v.startswith("kept channels of blocks.") for b, v in report.target_alignment.items()
                   if b != "(output)")  # the logits keep their width: compared directly
        assert report.mask_unchanged  # shapes untouched by healing
    # the report says what the structures saved, not a zeros-based 0 % sparsity
    assert report.parameters_pruned == sum(p.numel() for p in model.parameters()) < report.parameters_dense
    assert 0 < report.macs_pruned < report.macs_dense
    assert "structured: parameters" in report.summary() and "sparsity" not in report.summary()
    attn = model.blocks[0].attn
    assert attn.num_heads < 4 and attn.qkv.out_features == 3 * attn.num_heads * attn.head_dim
    assert attn.attn_dim == attn.num_heads * attn.head_dim
    model(images[:2]).sum().backward()  # forward and backward after head pruning
    handle.detach()


def test_pruned_residual_stream_heals_with_targets_on_disk(dense4, images, cfg, tmp_path):
    """Dense targets indexed by kept channels, cached on disk: the cache's fingerprint hashes the
    kept-channel index (it used to crash on the index's (dim, channels) pairs)."""
    model = copy.deepcopy(dense4)
    pruner = vit_pruner(model, images[:1])
    handle = starfish.attach(pruner, dense4, images, cfg, targets="disk", cache_dir=str(tmp_path))
    pruner.step()
    report = handle.reports[-1]
    assert report.targets_mode == "disk"
    assert report.target_alignment["blocks.0"].startswith("kept channels of blocks.0")
    assert report.mean_cosine_after > report.mean_cosine_before


def test_attach_takes_overrides_like_heal(dense4, images):
    model = copy.deepcopy(dense4)
    pruner = vit_pruner(model, images[:1])
    with pytest.raises(starfish_errors.ConfigError, match="epoch"):
        starfish.attach(pruner, dense4, images, epoch=1)
    handle = starfish.attach(pruner, dense4, images, epochs=1, batch_size=32, quiet=True)
    pruner.step()
    assert len(handle.reports[-1].epoch_losses) == 1


def test_kept_channels_are_the_original_indices(dense4, images):
    model = copy.deepcopy(dense4)
    pruner = vit_pruner(model, images[:1], ratio=0.25)
    record = tp_graph.track(pruner)
    pruner.step()
    kept = record.kept_out()["patch_embed.proj"]
    assert len(kept) == 24 and kept.unique().numel() == 24
    # pruning only slices: the surviving rows are the dense rows at the recorded indices
    torch.testing.assert_close(model.patch_embed.proj.weight, dense4.patch_embed.proj.weight[kept], rtol=0, atol=0)
    fc2 = record.kept_out()["blocks.1.mlp.fc2"]
    assert torch.equal(fc2, kept)  # one residual stream, one set of kept channels
    hidden = record.kept_out()["blocks.0.mlp.fc1"]
    torch.testing.assert_close(model.blocks[0].mlp.fc1.bias, dense4.blocks[0].mlp.fc1.bias[hidden], rtol=0, atol=0)
    # and healing later with a plain heal() uses the record
    report = starfish.heal(model, dense4, images, epochs=2, quiet=True)
    assert report.target_alignment["blocks.0"].startswith("kept channels of blocks.0.mlp.fc2 (24 of 32")


def test_interactive_steps_record_only_what_was_pruned(dense4, images, cfg):
    model = copy.deepcopy(dense4)
    pruner = vit_pruner(model, images[:1])
    handle = starfish.attach(pruner, dense4, images, cfg)
    groups = pruner.step(interactive=True)
    assert handle.steps == 0  # healing waits until the caller has gone through the groups
    with pytest.raises(errors.MaskNotFoundError, match="removed no channel. In an interactive step, call group.prune"):
        for _ in groups:
            pass  # the caller prunes nothing
    assert handle.reports == []
    # apply only the first (residual) group
    model2 = copy.deepcopy(dense4)
    pruner2 = vit_pruner(model2, images[:1])
    handle2 = starfish.attach(pruner2, dense4, images, cfg)
    for i, group in enumerate(pruner2.step(interactive=True)):
        if i == 0:
            group.prune()
    assert handle2.steps == 1 and handle2.reports[0].target_alignment["blocks.0"].startswith("kept channels")
    assert model2.blocks[0].mlp.fc1.out_features == 64  # MLP groups were skipped, and not recorded
    assert "blocks.0.mlp.fc1" not in tp_graph._RECORDS[model2].kept_out()


@pytest.mark.parametrize(
    "importance",
    [tp.importance.GroupMagnitudeImportance(p=1), tp.importance.GroupTaylorImportance(),
     tp.importance.LAMPImportance(), tp.importance.RandomImportance()],
    ids=["magnitude", "taylor", "lamp", "random"],
)
def test_importance_criteria(importance, dense4, images, labels, cfg):
    model = copy.deepcopy(dense4)
    pruner = vit_pruner(model, images[:1], ratio=0.3, importance=importance)
    handle = starfish.attach(pruner, dense4, images, cfg)
    if isinstance(importance, tp.importance.GroupTaylorImportance):
        nn.functional.cross_entropy(model(images), labels).backward()
    pruner.step()
    assert handle.reports[0].epoch_losses[-1] < handle.reports[0].epoch_losses[0]


def test_group_norm_pruner_base_pruner_and_trainable_all(dense4, images, cfg):
    model = copy.deepcopy(dense4)
    pruner = vit_pruner(model, images[:1], pruner_cls=tp.pruner.GroupNormPruner)
    assert isinstance(pruner, tp.pruner.BasePruner)
    handle = starfish.attach(pruner, dense4, images, cfg.replace(trainable="all"))
    before_norm = model.blocks[0].norm1.weight.detach().clone()
    pruner.step()
    report = handle.reports[0]
    assert report.trainable_parameters == sum(p.numel() for p in model.parameters())
    assert model.blocks[0].norm1.weight.shape == (24,)
    assert not torch.equal(model.blocks[0].norm1.weight, before_norm[: 24])  # norms trained too


def test_default_trains_only_pruned_layers(dense4, images, cfg):
    model = copy.deepcopy(dense4)
    pruner = vit_pruner(model, images[:1])
    tp_graph.track(pruner)
    pruner.step()
    before = state_copy(model)
    starfish.heal(model, dense4, images, cfg)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # the pruned layers; the head too, whose inputs were pruned (it is healed through the model's output)
    assert changed and all(k.split(".")[-2] in ("qkv", "proj", "fc1", "fc2", "head") for k in changed)


def test_heal_after_mlp_only_pruning_without_a_record(images, cfg):
    dense = tiny_vit()
    model = copy.deepcopy(dense)
    build, _, setup = CASES["timm_deit_tiny_mlp"]
    pruner = tp.pruner.MetaPruner(model, images[:1], importance=tp.importance.GroupMagnitudeImportance(),
                                  pruning_ratio=0.5, **setup(model))
    pruner.step()  # no attach: pruned earlier
    report = starfish.heal(model, dense, images, cfg)
    assert set(report.target_alignment.values()) == {"direct"}
    assert report.epoch_losses[-1] < report.epoch_losses[0]
    assert "no kept-channel record" in " ".join(report.notes)


def test_residual_pruned_without_a_record_aligns_what_stays_comparable(dense4, images, cfg):
    """Pruned earlier, without attach: no record of the kept residual channels. The blocks whose
    width changed leave the loss, the final output (the classifier was not pruned) is aligned,
    and the report says which were left out."""
    model = copy.deepcopy(dense4)
    pruner = vit_pruner(model, images[:1])
    pruner.step()
    saved = state_copy(model)
    with pytest.raises(errors.ModelMismatchError, match=r"(?s)fails a forward.*num_heads / head_dim"):
        starfish.heal(model, dense4, images, cfg)  # attention bookkeeping not updated after pruning
    assert_state_equal(model, saved)
    tp_graph.sync_attention(model, pruner)  # Torch-Pruning's recipe: update heads after pruning
    report = starfish.heal(model, dense4, images, cfg)
    assert report.blocks == ["(output)"]
    notes = " ".join(report.notes)
    assert "left out of the loss" in notes and "blocks.0" in notes and "blocks.1" in notes
    assert report.worse_restored or report.held_out_after < report.held_out_before


def test_nothing_comparable_is_a_clear_error_and_changes_nothing(dense4, images, cfg):
    model = copy.deepcopy(dense4)
    pruner = tp.pruner.MetaPruner(model, images[:1], importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=0.25, num_heads=_heads(model))  # the classifier pruned too
    pruner.step()
    tp_graph.sync_attention(model, pruner)
    saved = state_copy(model)
    with pytest.raises(errors.BlockError, match=r"(?s)no block of the pruned model can be compared.*final output"):
        starfish.heal(model, dense4, images, cfg)
    assert_state_equal(model, saved)


def test_pruner_that_has_not_pruned_yet(dense4, images, cfg):
    model = copy.deepcopy(dense4)
    pruner = vit_pruner(model, images[:1])
    starfish.attach(pruner, dense4, images, cfg)
    with pytest.raises(errors.MaskNotFoundError, match="has not pruned anything yet"):
        starfish.heal(model, dense4, images, cfg)


def test_dense_that_is_not_the_pruners_model(dense4, images, cfg):
    model = copy.deepcopy(dense4)
    pruner = vit_pruner(model, images[:1])
    other = copy.deepcopy(dense4)
    with torch.no_grad():
        other.blocks[1].mlp.fc1.weight.add_(1.0)
    step = pruner.step
    with pytest.raises(errors.ModelMismatchError, match="not the model the pruner started from.*blocks.1.mlp.fc1"):
        starfish.attach(pruner, other, images, cfg)
    assert pruner.step == step  # nothing wrapped


def test_attach_after_a_step_is_refused(dense4, images, cfg):
    model = copy.deepcopy(dense4)
    pruner = vit_pruner(model, images[:1], iterative_steps=2)
    pruner.step()
    with pytest.raises(ValueError, match="attach .*before the first pruner.step"):
        starfish.attach(pruner, dense4, images, cfg)


def test_calibration_the_pruned_model_cannot_take(dense4, cfg):
    model = copy.deepcopy(dense4)
    pruner = vit_pruner(model, torch.randn(1, 1, 8, 8))
    starfish.attach(pruner, dense4, torch.randn(8, 3, 8, 8), cfg)
    with pytest.raises(errors.CalibrationError, match=r"cannot take calibration batches of shape \(\d+, 3, 8, 8\)"):
        pruner.step()


def test_state_dict_round_trip(dense4, images, cfg, tmp_path):
    model = copy.deepcopy(dense4)
    pruner = vit_pruner(model, images[:1], prune_num_heads=True, head_pruning_ratio=0.5)
    starfish.attach(pruner, dense4, images, cfg)
    pruner.step()
    expected = model(images)
    path = tmp_path / "healed.pth"
    tp.save(tp.state_dict(model), path)
    fresh = copy.deepcopy(dense4)
    # Torch-Pruning's format pickles module attributes: a full (not weights-only) load, for a file we wrote
    tp.load_state_dict(fresh, state_dict=torch.load(path, weights_only=False))
    torch.testing.assert_close(fresh(images), expected)
    assert fresh.blocks[0].attn.num_heads == model.blocks[0].attn.num_heads


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=[pytest.mark.slow] if n in SLOW_CASES else []) for n in CASES]
)
def test_coverage_matrix(name):
    build, size, setup = CASES[name]
    torch.manual_seed(0)
    dense = build().eval()
    model = copy.deepcopy(dense)
    x = torch.randn(16, 3, size, size, generator=torch.Generator().manual_seed(0))
    pruner = tp.pruner.MetaPruner(model, x[:1], importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=0.25, **setup(model))
    handle = starfish.attach(pruner, dense, x, starfish.HealConfig(epochs=2, batch_size=8, lr=2e-4, quiet=True,
                                                                   diagnostic_samples=16))
    pruner.step()
    shapes = {n: p.shape for n, p in model.named_parameters()}
    report = handle.reports[0]
    assert report.epoch_losses[-1] < report.epoch_losses[0], report.epoch_losses
    assert improved_or_restored(report)
    assert sum(p.numel() for p in model.parameters()) < 0.95 * sum(p.numel() for p in dense.parameters())
    assert {n: p.shape for n, p in model.named_parameters()} == shapes and report.mask_unchanged
    model(x[:2]).sum().backward()
    if name == "timm_deit_tiny_heads":
        attn = model.blocks[0].attn
        assert attn.num_heads < 3 and attn.head_dim == 64  # whole heads removed, head size kept
        assert attn.qkv.out_features == 3 * attn.num_heads * 64 == 3 * attn.attn_dim
    if name == "timm_deit_tiny_embed":
        assert all(v.startswith("kept channels") for b, v in report.target_alignment.items() if b.startswith("blocks."))
    if name in ("timm_deit_tiny_mlp", "timm_deit_tiny_heads"):
        assert set(report.target_alignment.values()) == {"direct"}


def test_positional_interactive_flag_early_break_and_track_twice(dense4, images, cfg):
    model = copy.deepcopy(dense4)
    pruner = vit_pruner(model, images[:1])
    record = tp_graph.track(pruner)
    assert tp_graph.track(pruner) is record  # idempotent: steps are never recorded twice
    handle = starfish.attach(pruner, dense4, images, cfg)
    for group in pruner.step(True):  # interactive flag by position
        group.prune()
        break  # stop after the first (residual) group
    assert handle.steps == 1 and record.groups == 1 and not record.inconsistent
    assert handle.reports[0].target_alignment["blocks.0"].startswith("kept channels")
    assert model.blocks[0].mlp.fc1.out_features == 64


class FailingHeal:
    """Makes the heal fail as it starts (a stand-in for any error inside healing)."""

    @starfish.hookimpl
    def starfish_heal_started(self, model, plan, config, total_steps):
        raise RuntimeError("heal failed on purpose")


def test_a_heal_that_fails_after_an_early_break_reaches_the_caller(dense4, images, cfg):
    """Leaving an interactive step's loop early heals right there; if that heal fails, the error is
    raised by the next pruner.step() (or handle.check()), not lost in garbage collection."""
    import contextlib

    starfish.plugin_manager().register(FailingHeal())
    model = copy.deepcopy(dense4)
    pruner = vit_pruner(model, images[:1], iterative_steps=3)
    handle = starfish.attach(pruner, dense4, images, cfg)
    with pytest.warns(RuntimeWarning, match="healing after an interrupted interactive step failed"):
        for group in pruner.step(interactive=True):
            group.prune()
            break
    assert isinstance(handle.pending_error, RuntimeError)
    with pytest.raises(RuntimeError, match="heal failed on purpose"):
        pruner.step()
    assert handle.pending_error is None
    # closed explicitly, the error comes out of the with statement itself
    with pytest.raises(RuntimeError, match="heal failed on purpose"):
        with contextlib.closing(pruner.step(interactive=True)) as groups:
            for group in groups:
                group.prune()
                break
    handle.check()  # raised already: nothing pending


def test_tracked_model_is_not_kept_alive(dense4, images):
    import gc
    import weakref

    model = copy.deepcopy(dense4)
    pruner = vit_pruner(model, images[:1])
    tp_graph.track(pruner)
    pruner.step()
    ref = weakref.ref(model)
    del model, pruner
    gc.collect()
    assert ref() is None


def test_a_loop_left_early_heals_at_the_with_block_or_warns_at_the_next_step(dense4, images, cfg):
    """Groups still referenced after an early break are not garbage: the heal cannot run at the
    break by itself. A ``with`` block heals at its end; otherwise the next step() or check() heals
    them first, with a warning that says how to heal at the break."""
    model = copy.deepcopy(dense4)
    pruner = vit_pruner(model, images[:1], iterative_steps=3)
    handle = starfish.attach(pruner, dense4, images, cfg)
    with pruner.step(interactive=True) as groups:
        for group in groups:
            group.prune()
            break
    assert handle.steps == 1 and len(handle.reports) == 1  # healed as the with block ended

    groups = pruner.step(interactive=True)
    for group in groups:
        group.prune()
        break
    assert handle.steps == 1  # still referenced: not healed yet
    with pytest.warns(errors.HealingWarning, match="healed now"):
        handle.check()
    assert handle.steps == 2 and len(handle.reports) == 2
    handle.check()  # nothing left open: no second heal
    assert handle.steps == 2
