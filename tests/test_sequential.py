"""``strategy="sequential"``: one block at a time, each healed from the inputs that reach it.

Real toolkits only: torch.nn.utils.prune hooks, torch.ao parametrizations (2:4), Hugging Face Llama
and GPT-2 built from configs, timm and torchvision models built without weights."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_state_equal, improved_or_restored, l1_prune_, sparsify_2_4_, state_copy, tiny_vit
from test_language_models import VOCAB, tiny_gpt2, tiny_llama
from torch import nn
from torch.nn.utils import prune

import starfish_plugin as starfish
from starfish_plugin import errors
from starfish_plugin.plugins.manager import plugin_manager

transformers = pytest.importorskip("transformers")
LENGTH = 12


def tokens(n: int = 96, seed: int = 0) -> dict[str, torch.Tensor]:
    """Token ids with right padding (attention_mask 0) of random lengths."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, LENGTH), generator=gen)
    lengths = torch.randint(4, LENGTH + 1, (n,), generator=gen)
    mask = (torch.arange(LENGTH)[None, :] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


def prune_decoder_(model: nn.Module, amount: float = 0.6) -> nn.Module:
    layers = model.model.layers if hasattr(model, "model") else model.transformer.h
    for module in layers.modules():
        if isinstance(getattr(module, "weight", None), nn.Parameter) and module.weight.dim() == 2:
            prune.l1_unstructured(module, "weight", amount=amount)
    return model


SEQ = {"strategy": "sequential", "epochs": 3, "batch_size": 16, "quiet": True}


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_a_decoder_lm_heals_block_by_block_with_its_masks_kept(make):
    dense = make()
    pruned = prune_decoder_(copy.deepcopy(dense))
    masks = {k: v.clone() for k, v in pruned.state_dict().items() if k.endswith("_mask")}
    dense_state = state_copy(dense)
    report = starfish.heal(pruned, dense, tokens(), **SEQ)
    assert report.strategy == "sequential"
    assert report.mask_unchanged and report.masked_weights_zero
    assert all(torch.equal(pruned.state_dict()[k], m) for k, m in masks.items())
    assert report.held_out_after < report.held_out_before  # the whole model, on held-out sequences
    assert report.mean_cosine_after > report.mean_cosine_before
    assert report.output_cosine_after > report.output_cosine_before
    blocks = report.sequential_blocks
    assert [b["block"] for b in blocks] == report.blocks
    assert blocks[0]["inputs"] == "captured" and all(b["inputs"] == "carried" for b in blocks[1:])
    assert all(b["held_out_after"] < b["held_out_before"] for b in blocks)
    assert_state_equal(dense, dense_state)


def test_torch_ao_2_4_parametrizations_heal_sequentially_and_stay_2_4():
    from starfish_plugin.core.nm_pattern import check_nm

    dense = tiny_vit(depth=3)
    pruned = copy.deepcopy(dense)
    layers = sparsify_2_4_(pruned, "blocks.")
    masks = {n: pruned.get_submodule(n).parametrizations.weight[0].mask.clone() for n in layers}
    images = torch.randn(128, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    report = starfish.heal(pruned, dense, images, **SEQ)
    assert report.mask_unchanged and report.masked_weights_zero
    for n in layers:
        module = pruned.get_submodule(n)
        assert torch.equal(module.parametrizations.weight[0].mask, masks[n])
        check_nm(module.weight.detach(), n, 2, 4)  # raises if the healed weight is not 2:4
    assert improved_or_restored(report)
    assert report.held_out_after < report.held_out_before


@pytest.mark.slow
@pytest.mark.parametrize("offload", ["none", "disk"])
def test_pruned_tensors_outside_the_blocks_heal_last_with_the_blocks_frozen(offload, tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    dense = torchvision.models.resnet18(num_classes=10).eval()
    dense_state = state_copy(dense)
    pruned = copy.deepcopy(dense)
    for module in pruned.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            prune.l1_unstructured(module, "weight", amount=0.6)
    images = torch.randn(96, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    report = starfish.heal(pruned, dense, images, **{**SEQ, "epochs": 2}, offload=offload, cache_dir=str(tmp_path))
    assert_state_equal(dense, dense_state)
    rest = report.sequential_blocks[-1]
    assert rest["block"] == "(outside the blocks)" and rest["trained"]
    assert report.untrained_tensors == []
    assert any("conv1.weight" in note and "healed last" in note for note in report.notes)
    assert report.mask_unchanged and improved_or_restored(report)
    assert report.output_cosine_after > report.output_cosine_before


def test_blocks_with_something_between_them_get_their_inputs_captured():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    dense = timm.create_model("convnext_atto", num_classes=10).eval()
    pruned = copy.deepcopy(dense)
    for name, module in pruned.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and ".blocks." in name:
            prune.l1_unstructured(module, "weight", amount=0.5)
    images = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    report = starfish.heal(pruned, dense, images, **{**SEQ, "epochs": 1})
    how = {b["block"]: b["inputs"] for b in report.sequential_blocks}
    # a stage's downsampling runs before its first block: those inputs are captured, the rest carried
    assert how["stages.1.blocks.0"] == "captured" and how["stages.1.blocks.1"] == "carried"
    assert report.mask_unchanged and improved_or_restored(report)


def test_dense_inputs_option_heals_each_block_from_the_dense_models_inputs():
    dense = tiny_llama(layers=2)
    pruned = prune_decoder_(copy.deepcopy(dense))
    report = starfish.heal(pruned, dense, tokens(), **SEQ, sequential_inputs="dense")
    assert report.config["sequential_inputs"] == "dense"
    assert report.mask_unchanged and report.held_out_after < report.held_out_before


def test_without_a_held_out_split_each_block_is_judged_on_training_samples():
    dense = tiny_llama(layers=2)
    pruned = prune_decoder_(copy.deepcopy(dense))
    report = starfish.heal(pruned, dense, tokens(48), **SEQ, holdout=0, diagnostic_samples=16)
    assert report.judged_on == "training samples" and report.held_out_samples == 16
    assert report.mask_unchanged and improved_or_restored(report)


def test_a_sequential_heal_that_helps_nothing_returns_the_pruned_weights_bit_for_bit():
    dense = tiny_vit(depth=2)
    pruned = l1_prune_(copy.deepcopy(dense), amount=0.7)
    before = state_copy(pruned)
    images = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    report = starfish.heal(pruned, dense, images, **SEQ, recipe="paper", lr=50.0, min_lr=1.0)
    assert report.returned_state == "start" and report.worse_restored
    assert any("put back unchanged" in note for note in report.notes)
    assert report.held_out_after == report.held_out_before
    assert_state_equal(pruned, before)


class Interrupt:
    """Stops the heal like a Ctrl-C would, at a given step (counted over every block)."""

    def __init__(self, at_step: int) -> None:
        self.at_step, self.steps = at_step, 0

    @starfish.hookimpl
    def starfish_step_ended(self, step, total_steps, config):
        self.steps += 1
        if self.steps == self.at_step:
            raise KeyboardInterrupt


def test_an_interrupted_sequential_heal_resumes_to_the_uninterrupted_weights(tmp_path):
    dense = tiny_llama(layers=3)
    data = tokens(64)
    config = {**SEQ, "recipe": "paper", "checkpoint_dir": str(tmp_path)}
    reference = prune_decoder_(copy.deepcopy(dense))
    full = starfish.heal(reference, dense, data, **{**config, "checkpoint_dir": None})

    model = prune_decoder_(copy.deepcopy(dense))
    start = state_copy(model)
    plugin = Interrupt(at_step=10)  # 32 training sequences, batch 16: 2 steps per epoch, 6 per block
    plugin_manager().register(plugin)
    try:
        with pytest.raises(KeyboardInterrupt):
            starfish.heal(model, dense, data, **config)
    finally:
        plugin_manager().unregister(plugin)
    assert_state_equal(model, start)  # restored on the interrupt
    report = starfish.heal(model, dense, data, **config)
    resumed = {b["block"]: b["resumed_after_epoch"] for b in report.sequential_blocks}
    assert resumed == {"model.layers.0": 3, "model.layers.1": 1, "model.layers.2": 0}
    assert_state_equal(model, state_copy(reference))
    assert report.held_out_after == full.held_out_after


@pytest.mark.parametrize("overrides, message", [
    ({"loss": "kl"}, "need the whole model's output"),
    ({"loss": "cosine+next_token"}, "need the whole model's output"),
    ({"blocks": ["blocks.0", "(output)"]}, "cannot align '\\(output\\)'"),
])
def test_what_sequential_cannot_do_is_refused_before_anything_changes(overrides, message):
    dense = tiny_vit(depth=2)
    pruned = l1_prune_(copy.deepcopy(dense))
    before = state_copy(pruned)
    images = torch.randn(64, 1, 8, 8)
    with pytest.raises(errors.StarfishError, match=message):
        starfish.heal(pruned, dense, images, **{**SEQ, **overrides})
    assert_state_equal(pruned, before)


def test_an_unknown_strategy_is_a_config_error():
    with pytest.raises(errors.ConfigError, match="strategy must be one of"):
        starfish.HealConfig(strategy="pipeline")


class DenseWatcher:
    """Records, at every step, how many of the dense model's blocks hold their weights in memory."""

    def __init__(self, dense: nn.Module) -> None:
        self.layers = list(dense.model.layers)
        self.in_memory: list[int] = []

    @starfish.hookimpl
    def starfish_step_ended(self, step, total_steps, config):
        self.in_memory.append(sum(layer.mlp.up_proj.weight.numel() > 0 for layer in self.layers))


def test_offloaded_dense_blocks_heal_bit_for_bit_like_in_memory_and_come_back(tmp_path):
    dense = tiny_llama(layers=3)
    data = tokens(64)
    config = {**SEQ, "recipe": "paper"}
    in_memory = prune_decoder_(copy.deepcopy(dense))
    expected = starfish.heal(in_memory, dense, data, **config)

    dense_state = state_copy(dense)
    dense_params = [id(p) for p in dense.parameters()]
    model = prune_decoder_(copy.deepcopy(dense))
    watcher = DenseWatcher(dense)
    plugin_manager().register(watcher)
    try:
        report = starfish.heal(model, dense, data, **config, offload="disk", cache_dir=str(tmp_path))
    finally:
        plugin_manager().unregister(watcher)
    # while a block trains, only that dense block is in memory; the others wait in their files
    assert watcher.in_memory and set(watcher.in_memory) == {1}
    assert_state_equal(model, state_copy(in_memory))  # the same heal, bit for bit
    assert report.held_out_after == expected.held_out_after
    assert report.mask_unchanged and report.masked_weights_zero
    assert_state_equal(dense, dense_state)  # the dense model comes back as it was ...
    assert [id(p) for p in dense.parameters()] == dense_params  # ... the same Parameter objects
    assert not list(tmp_path.glob("starfish-offload-*"))  # its files removed
    assert any("dense model's blocks offloaded" in n for n in report.notes)


def test_offload_with_masks_read_against_the_dense_model_keeps_them(tmp_path):
    """The exact-zeros adapter tells pruned zeros from the dense model's own: the masks are read back
    with the dense model whole again, so they match."""
    from starfish_plugin.adapters.nm_layouts import infer_masks_from_zeros

    dense = tiny_llama(layers=2)
    model = copy.deepcopy(dense)
    with torch.no_grad():
        for module in model.model.layers.modules():
            if isinstance(module, nn.Linear):
                module.weight.mul_(module.weight.abs() > module.weight.abs().median())
    report = starfish.heal(infer_masks_from_zeros(model), dense, tokens(64), **SEQ, offload="disk",
                           cache_dir=str(tmp_path))
    assert report.adapter == "nm_layouts"
    assert report.mask_unchanged and report.masked_weights_zero


def test_offloaded_dense_blocks_come_back_when_the_heal_is_interrupted(tmp_path):
    dense = tiny_llama(layers=2)
    dense_state = state_copy(dense)
    model = prune_decoder_(copy.deepcopy(dense))
    plugin = Interrupt(at_step=3)
    plugin_manager().register(plugin)
    try:
        with pytest.raises(KeyboardInterrupt):
            starfish.heal(model, dense, tokens(64), **SEQ, offload="disk", cache_dir=str(tmp_path))
    finally:
        plugin_manager().unregister(plugin)
    assert_state_equal(dense, dense_state)
    assert not list(tmp_path.glob("starfish-offload-*"))


def test_offload_outside_sequential_is_refused():
    dense = tiny_vit(depth=2)
    pruned = l1_prune_(copy.deepcopy(dense))
    before = state_copy(pruned)
    with pytest.raises(errors.ConfigError, match="offload='disk' applies to strategy='sequential'"):
        starfish.heal(pruned, dense, torch.randn(64, 1, 8, 8), quiet=True, offload="disk")
    assert_state_equal(pruned, before)
