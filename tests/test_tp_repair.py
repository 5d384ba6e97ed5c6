"""Repair after a Torch-Pruning step (issue 31): models set up as Torch-Pruning's examples do, which
its step leaves unable to run, are repaired by rule inside ``starfish.attach`` and healed; what
cannot be repaired is named; the user's own ``starfish_repair_pruned`` hook runs before the check.

Real Torch-Pruning, timm and transformers throughout; random-init models built small."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from helpers import assert_state_equal, state_copy
from torch import nn

import starfish_plugin as starfish
from starfish_plugin import errors

tp = pytest.importorskip("torch_pruning")
timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
warnings.filterwarnings("ignore", message="Unwrapped parameters detected")


def images(n: int = 32, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def tokens(n: int = 32) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, 128, (n, 12), generator=torch.Generator().manual_seed(0))}


def _output_transform(out):
    from starfish_plugin.base.model_io import main_output

    return main_output(out).sum()


def attach_and_step(dense: nn.Module, data, ignored, setup=lambda model: {}, **kwargs):
    """A pruner as a new user builds it (the classifier ignored; ``setup(model)``: more of its
    arguments that name the model's modules), attached, one step."""
    model = copy.deepcopy(dense)
    example = {k: v[:2] for k, v in data.items()} if isinstance(data, dict) else data[:2]
    pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=0.5, ignored_layers=ignored(model), **setup(model), **kwargs)
    handle = starfish.attach(pruner, dense, data, epochs=2, batch_size=16, quiet=True)
    pruner.step()
    return model, pruner, handle.reports[-1]


def improved(report) -> bool:
    return report.held_out_after < report.held_out_before and report.mean_cosine_after > report.mean_cosine_before


def test_poolformer_layer_scale_shapes_follow_their_pruned_scales():
    """timm ``Scale`` keeps ``shape=(dim, 1, 1)`` and views its pruned parameter with it."""
    from timm.models import metaformer

    torch.manual_seed(0)
    dense = metaformer.MetaFormer(depths=(1, 1, 2, 1), dims=(8, 16, 32, 64), token_mixers=metaformer.Pooling,
                                  norm_layers=metaformer.GroupNorm1, num_classes=10).eval()
    model, _, report = attach_and_step(dense, images(), lambda m: [m.head.fc])
    scale = model.stages[2].blocks[0].res_scale1
    assert scale.shape == (scale.scale.numel(), 1, 1) and scale.scale.numel() < 32
    assert "res_scale1.shape: (32, 1, 1) -> (16, 1, 1)" in " ".join(report.notes)
    assert improved(report)


@pytest.mark.parametrize("family", ["vit", "bert"])
def test_hugging_face_attention_without_num_heads_gets_them_before_the_step(family):
    """Four heads of 8: without num_heads Torch-Pruning cuts 32 query dimensions to 16 in any
    place, which no longer split into heads; attach gives it the head counts first, so every
    head loses the same dimensions, and the head size is then updated."""
    torch.manual_seed(0)
    if family == "vit":
        config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=64, image_size=32, patch_size=8, num_labels=10)
        dense, data = transformers.ViTForImageClassification(config).eval(), images()
    else:
        config = transformers.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64, num_labels=3)
        dense, data = transformers.BertForSequenceClassification(config).eval(), tokens()
    model, pruner, report = attach_and_step(dense, data, lambda m: [m.classifier],
                                            output_transform=_output_transform)
    notes = " ".join(report.notes)
    assert "num_heads given to Torch-Pruning for 6 attention projection(s)" in notes
    fresh = tp.pruner.MetaPruner(copy.deepcopy(dense), {k: v[:2] for k, v in data.items()} if isinstance(data, dict)
                                 else data[:2], importance=tp.importance.GroupMagnitudeImportance(p=2),
                                 output_transform=_output_transform)
    assert fresh.num_heads == {}  # Torch-Pruning's shared default dicts were not written to
    attention = [m for m in model.modules() if hasattr(m, "all_head_size") or hasattr(m, "q_proj")]
    for m in attention:
        q = getattr(m, "query", None) or m.q_proj
        size = getattr(m, "attention_head_size", None) or m.head_dim
        assert q.out_features == 4 * size  # four heads, each narrower
    assert improved(report)


def test_bert_whole_heads_update_the_head_count():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, num_labels=3)
    dense = transformers.BertForSequenceClassification(config).eval()
    heads = {}
    model = copy.deepcopy(dense)
    for m in model.modules():
        if hasattr(m, "query"):
            heads.update({m.query: 4, m.key: 4, m.value: 4})
    pruner = tp.pruner.MetaPruner(model, {"input_ids": tokens(2)["input_ids"]}, pruning_ratio=0.5,
                                  importance=tp.importance.GroupMagnitudeImportance(p=2), num_heads=heads,
                                  prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=0.5,
                                  output_transform=_output_transform, ignored_layers=[model.classifier])
    handle = starfish.attach(pruner, dense, tokens(), epochs=2, batch_size=16, quiet=True)
    pruner.step()
    attn = model.bert.encoder.layer[0].attention.self
    assert (attn.num_attention_heads, attn.attention_head_size, attn.all_head_size) == (2, 8, 16)
    assert improved(handle.reports[-1])


def _swin():
    torch.manual_seed(0)
    return timm.create_model("swin_tiny_patch4_window7_224", num_classes=10, img_size=32, window_size=4,
                             embed_dim=16, depths=(2, 2), num_heads=(1, 2)).eval()


def test_swin_position_tables_and_patch_merging_are_repaired_and_heal():
    """timm Swin set up as Torch-Pruning's timm example does (num_heads for every qkv). Its step
    prunes the relative position bias tables' rows (a bare parameter's last non-singleton
    dimension: positions, with one head) and removes the pruned channels from only one of the four
    copies ``PatchMerging`` stacks (reshape-flatten of 2 x 2 x C); attach repairs both and heals."""
    dense = _swin()
    def heads(m: nn.Module) -> dict:
        return {"num_heads": {a.qkv: a.num_heads for a in m.modules() if hasattr(a, "relative_position_bias_table")}}

    model, _, report = attach_and_step(dense, images(), lambda m: [m.head.fc], heads)
    notes = " ".join(report.notes)
    assert "relative_position_bias_table" in notes and "channels repeated by a reshape" in notes
    for name, m in model.named_modules():
        if hasattr(m, "relative_position_bias_table"):
            assert torch.equal(m.relative_position_bias_table, dense.get_submodule(name).relative_position_bias_table)
    merge = model.layers[1].downsample
    stream = model.layers[0].blocks[1].mlp.fc2.out_features
    assert merge.norm.normalized_shape == (4 * stream,) and merge.reduction.in_features == 4 * stream
    assert improved(report)


def test_sizes_the_pruner_updated_itself_are_left_alone():
    """A ResNet bottleneck's conv attributes are Torch-Pruning's to update; a width that equals
    another dimension's old size must not be taken for a stale one."""
    from torchvision.models.resnet import Bottleneck, ResNet

    torch.manual_seed(0)
    dense = ResNet(Bottleneck, [1, 1, 1, 1], num_classes=10).eval()
    model, _, report = attach_and_step(dense, images(), lambda m: [m.fc])
    assert not any(n.startswith("repaired after") for n in report.notes)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            assert (m.out_channels, m.in_channels // m.groups) == tuple(m.weight.shape[:2])
    assert improved(report)


def test_pvt_v2_attention_is_named_where_no_repair_can_fix_it():
    """PVT-v2's attention reshapes its output to its input's width, which Torch-Pruning does not
    couple with the attention's inner width: no attribute can fix that.
    The error names the module, what is expected and what was found, and nothing is healed."""
    from timm.models.pvt_v2 import PyramidVisionTransformerV2

    torch.manual_seed(0)
    dense = PyramidVisionTransformerV2(depths=(1, 1, 2, 1), embed_dims=(8, 16, 32, 64), num_heads=(1, 1, 2, 2),
                                       num_classes=10).eval()
    saved = state_copy(dense)
    with pytest.raises(errors.PrunerError, match=r"(?s)could not repair it.*'stages.0.blocks.0.attn' \(Attention\).*"
                       r"stages.0.blocks.0.attn.q.out_features: expected \d+, the attention's input width.*found \d+.*"
                       r"put stages.0.blocks.0.attn in ignored_layers"):
        attach_and_step(dense, images(), lambda m: [m.head])
    assert_state_equal(dense, saved)
