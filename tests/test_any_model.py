"""Healing any model: block discovery rules, structured and integer inputs, model outputs that are
not tensors, pruned weights outside every block, and the warning when healing hurts."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from helpers import assert_state_equal, l1_prune_, state_copy
from torch import nn
from torch.nn.utils import prune
from torch.utils.data import DataLoader, Dataset

import starfish_plugin as starfish
from starfish_plugin.core.blocks import (
    OUTPUT_BLOCK,
    RULE_FAMILY,
    RULE_HF,
    RULE_POOL_STAGES,
    RULE_REPEATED,
    discover_blocks,
)
from starfish_plugin.errors import BlockError, CalibrationError, CalibrationTypeError, HealingWarning

transformers = pytest.importorskip("transformers")

FAST = dict(epochs=2, batch_size=8, lr=1e-3, quiet=True, diagnostic_samples=32)


def tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=2, intermediate_size=64, use_cache=False)
    return transformers.LlamaForCausalLM(config).eval()


def tiny_bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, num_labels=3)
    return transformers.BertForSequenceClassification(config).eval()


def prune_linears_(model: nn.Module, amount: float = 0.6, skip: tuple[str, ...] = ("lm_head",)) -> nn.Module:
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and not name.endswith(skip):
            prune.l1_unstructured(m, "weight", amount=amount)
    return model


def tokens(n: int = 32, seq: int = 10, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, seq, dtype=torch.long)
    mask[::2, -3:] = 0
    return {"input_ids": torch.randint(0, 64, (n, seq), generator=g), "attention_mask": mask}


# -- discovery -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_discovery_rules_in_order():
    from timm.models.regnet import RegNet, RegNetCfg
    from torchvision.models.vgg import VGG, make_layers

    assert discover_blocks(torchvision.models.resnet18()).rule == RULE_FAMILY
    llama = discover_blocks(tiny_llama())
    assert llama.rule == RULE_HF and llama.names == ["model.layers.0", "model.layers.1"]
    bert = discover_blocks(tiny_bert())  # BertEmbeddings is in _no_split_modules but occurs once
    assert bert.names == ["bert.encoder.layer.0", "bert.encoder.layer.1"]
    convnext = discover_blocks(transformers.ConvNextForImageClassification(transformers.ConvNextConfig(
        hidden_sizes=[8, 16], depths=[2, 2], num_stages=2, num_labels=3)))
    assert convnext.names == [f"convnext.encoder.stages.{s}.layers.{i}" for s in range(2) for i in range(2)]
    regnet = discover_blocks(RegNet(RegNetCfg(depth=6, w0=8, wa=8.0, wm=2.0, group_size=8)))
    assert regnet.rule == RULE_REPEATED and regnet.names[0] == "s1.b1" and len(regnet.names) == 6
    assert "Bottleneck x6" in regnet.considered[-1]
    shuffle = discover_blocks(torchvision.models.shufflenet_v2_x0_5())
    assert shuffle.rule == RULE_REPEATED and shuffle.names[:2] == ["stage2.0", "stage2.1"] and len(shuffle.names) == 16
    vgg = discover_blocks(VGG(make_layers([8, "M", 16, "M", 16, "M"], batch_norm=True), init_weights=False))
    assert vgg.rule == RULE_POOL_STAGES and vgg.names == ["features.3", "features.7", "features.11"]


def test_discovery_never_picks_single_layers():
    """torchvision VGG's `features` holds only layers: never 29 conv/bn/relu 'blocks'."""
    names = starfish.find_blocks(torchvision.models.vgg11_bn())
    assert len(names) == 5 and all(n.startswith("features.") for n in names)
    densenet = starfish.find_blocks(torchvision.models.densenet121())
    assert densenet[0] == "features.denseblock1" and "features.conv0" not in densenet


def test_no_rule_applies_lists_what_it_considered():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(BlockError, match=r"(?s)Considered:.*repeated composite modules: none.*blocks=\['name'"):
        starfish.find_blocks(model)


def test_report_names_the_rule_and_blocks():
    dense = tiny_llama()
    pruned = prune_linears_(copy.deepcopy(dense))
    report = starfish.heal(pruned, dense, tokens(), **FAST)
    assert report.block_rule == RULE_HF and report.blocks == ["model.layers.0", "model.layers.1"]
    explicit = starfish.heal(pruned, dense, tokens(), blocks=["model.layers.1"], **FAST)
    assert explicit.block_rule == "given (HealConfig.blocks)"


# -- inputs --------------------------------------------------------------------------------------
def test_token_ids_as_a_tensor_heal_a_decoder_lm():
    dense = tiny_llama()
    pruned = prune_linears_(copy.deepcopy(dense))
    saved = state_copy(dense)
    masks = {n: m.weight_mask.clone() for n, m in pruned.named_modules() if hasattr(m, "weight_mask")}
    report = starfish.heal(pruned, dense, tokens()["input_ids"], **FAST)
    assert report.mask_unchanged and report.masked_weights_zero
    assert all(torch.equal(m.weight_mask, masks[n]) for n, m in pruned.named_modules() if hasattr(m, "weight_mask"))
    assert report.mean_cosine_after > report.mean_cosine_before
    assert_state_equal(dense, saved)


class _DictDataset(Dataset):
    def __init__(self, batch: dict[str, torch.Tensor]) -> None:
        self.batch = batch

    def __len__(self) -> int:
        return len(self.batch["input_ids"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.batch.items()} | {"labels": torch.tensor(i % 3)}


@pytest.mark.parametrize("form", ["dict", "dataset", "dataloader", "generator", "tuple"])
def test_dict_batches_are_keyword_arguments(form):
    """BERT with attention masks, from every container a user has; all give the same heal."""
    dense = tiny_bert()
    batch = tokens()
    if form == "dict":
        calibration = batch
    elif form == "dataset":
        calibration = _DictDataset(batch)
    elif form == "dataloader":
        calibration = DataLoader(_DictDataset(batch), batch_size=8)
    elif form == "generator":
        calibration = ({k: v[i : i + 8] for k, v in batch.items()} for i in range(0, 32, 8))
    else:  # positional inputs: ((input_ids, attention_mask), labels)
        # a positional mask is not known to be one, so padding would count in the loss: compare without padding
        batch["attention_mask"] = torch.ones_like(batch["attention_mask"])
        calibration = [((batch["input_ids"][i : i + 8], batch["attention_mask"][i : i + 8]), torch.zeros(8))
                       for i in range(0, 32, 8)]
        calibration = [(x, y.long()) for x, y in calibration]
    pruned = prune_linears_(copy.deepcopy(dense), skip=("classifier",))
    report = starfish.heal(pruned, dense, calibration, **FAST)
    reference = prune_linears_(copy.deepcopy(dense), skip=("classifier",))
    expected = starfish.heal(reference, dense, batch, **FAST)
    assert report.epoch_losses == pytest.approx(expected.epoch_losses, rel=1e-5)
    assert report.mean_cosine_after > report.mean_cosine_before


def test_dict_inputs_on_disk_equal_memory(tmp_path):
    dense = tiny_bert()
    results = []
    for mode in ("memory", "disk"):
        pruned = prune_linears_(copy.deepcopy(dense), skip=("classifier",))
        report = starfish.heal(pruned, dense, tokens(), inputs=mode, cache_dir=str(tmp_path), **FAST)
        results.append((report.epoch_losses, {k: v.clone() for k, v in pruned.state_dict().items()}))
    assert results[0][0] == results[1][0]
    assert all(torch.equal(results[0][1][k], results[1][1][k]) for k in results[0][1])
    assert not list(tmp_path.glob("starfish-inputs-*"))  # the inputs' files are removed


def test_inconsistent_dict_batches_are_refused_with_the_key():
    batches = [tokens(8, 10), {"input_ids": torch.randint(0, 64, (8, 12)), "attention_mask": torch.ones(8, 12)}]
    dense = tiny_bert()
    pruned = prune_linears_(copy.deepcopy(dense), skip=("classifier",))
    saved = state_copy(pruned)
    with pytest.raises(CalibrationError, match=r"input 'attention_mask' of per-sample shape \(12,\)|input 'input_ids'"):
        starfish.heal(pruned, dense, batches, **FAST)
    assert_state_equal(pruned, saved)


def test_uint8_images_get_a_clear_error(dense, pruned):
    with pytest.raises(CalibrationTypeError, match=r"images.float\(\) / 255"):
        starfish.heal(pruned, dense, torch.randint(0, 255, (8, 1, 8, 8), dtype=torch.uint8), **FAST)


def test_evaluate_takes_dict_batches_and_model_outputs():
    model = tiny_bert()
    batch = tokens(16) | {"labels": torch.arange(16) % 3}
    with torch.no_grad():
        expected = (model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1)
                    == batch["labels"]).float().mean().item() * 100
    assert starfish.evaluate(model, [batch]) == pytest.approx(expected)


# -- pruned weights outside the blocks ------------------------------------------------------------
def _cnn_with_pruned_head():
    from torch.ao.pruning import WeightNormSparsifier

    torch.manual_seed(0)
    dense = torchvision.models.resnet18(num_classes=8).eval()
    pruned = copy.deepcopy(dense)
    sparsifier = WeightNormSparsifier(sparsity_level=1.0, sparse_block_shape=(1, 4), zeros_per_block=2)
    sparsifier.prepare(pruned, [{"tensor_fqn": "fc.weight"}])  # only the classifier: outside every block
    sparsifier.step()
    return dense, pruned


def test_a_pruned_head_is_healed_through_the_output():
    dense, pruned = _cnn_with_pruned_head()
    before = pruned.fc.parametrizations.weight.original.detach().clone()
    images = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    report = starfish.heal(pruned, dense, images, **FAST)
    assert report.blocks[-1] == OUTPUT_BLOCK
    assert report.output_aligned and report.untrained_tensors == []
    after = pruned.fc.parametrizations.weight.original.detach()
    mask = pruned.fc.parametrizations.weight[0].mask.bool()
    assert not torch.equal(before[mask], after[mask])  # the head trained
    assert report.block_cosine_after[OUTPUT_BLOCK] > report.block_cosine_before[OUTPUT_BLOCK]
    assert report.mask_unchanged and report.masked_weights_zero


def test_no_training_signal_at_all_is_a_clear_error():
    dense, pruned = _cnn_with_pruned_head()
    saved = state_copy(pruned)
    images = torch.randn(16, 3, 32, 32)
    with pytest.raises(BlockError, match=r"none of the 1 pruned tensors .* gets a training signal.*align_output"):
        starfish.heal(pruned, dense, images, align_output="never", **FAST)
    assert_state_equal(pruned, saved)


def test_output_alignment_is_not_added_when_blocks_cover_every_pruned_weight(dense, pruned, images):
    report = starfish.heal(pruned, dense, images, **FAST)
    assert OUTPUT_BLOCK not in report.blocks
    always = starfish.heal(l1_prune_(copy.deepcopy(dense)), dense, images, align_output="always", **FAST)
    assert always.blocks[-1] == OUTPUT_BLOCK


# -- the guard -------------------------------------------------------------------------------------
def test_healing_that_hurts_is_undone_or_warned_about():
    """A learning rate far too high makes the held-out score worse: by default the pruned weights
    come back unchanged; with ``if_worse="warn"`` they stay, with a warning that names the cause."""
    dense = tiny_llama()
    pruned = prune_linears_(copy.deepcopy(dense), amount=0.3)
    saved = {k: v.clone() for k, v in pruned.state_dict().items()}
    report = starfish.heal(pruned, dense, tokens(), epochs=1, batch_size=8, lr=1.0, min_lr=0.5, quiet=True)
    assert report.worse_restored and all(torch.equal(v, saved[k]) for k, v in pruned.state_dict().items())
    with pytest.warns(HealingWarning, match=r"did not improve the held-out score .* learning rate"):
        report = starfish.heal(pruned, dense, tokens(), epochs=1, batch_size=8, lr=1.0, min_lr=0.5, quiet=True,
                               if_worse="warn")
    assert report.mean_cosine_after < report.mean_cosine_before
    assert report.healing_worsened


def test_prune_hook_weights_are_refreshed_only_where_the_forward_skips_the_module():
    """torchvision Swin reads ``qkv.weight`` without calling ``qkv``: only such weights are
    recomputed each step; every other prune hook recomputes its own weight in forward."""
    from torchvision.models.swin_transformer import SwinTransformer

    from starfish_plugin.base.model_io import modules_called

    torch.manual_seed(0)
    swin = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=[4, 4],
                           num_classes=10).eval()
    for module in swin.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.utils.prune.l1_unstructured(module, "weight", amount=0.5)
    plan = starfish.find_masks(swin)
    stale = plan.skip_refresh_of_called(modules_called(swin, torch.randn(1, 3, 32, 32)))
    names = {e.name for e in plan._stale or []}
    assert stale == len(names) and names and all(n.endswith(("qkv.weight", "proj.weight")) for n in names)
    assert len(plan) > stale  # the MLP layers and the head are called, so not refreshed
