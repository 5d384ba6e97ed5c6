"""Block discovery for the supported families, explicit selection, and clear errors otherwise."""

import pytest
import timm
import torch
import torchvision
from torch import nn

import starfish_plugin as starfish
from starfish_plugin.errors import BlockError


def _n(names, prefix):
    return [n for n in names if n.startswith(prefix)]


def test_timm_vit_family():
    for name in ("vit_tiny_patch16_224", "deit_tiny_patch16_224", "deit3_small_patch16_224",
                 "deit_tiny_distilled_patch16_224"):
        model = timm.create_model(name, pretrained=False)
        assert starfish.find_blocks(model) == [f"blocks.{i}" for i in range(len(model.blocks))], name


def test_torchvision_vit():
    model = torchvision.models.vit_b_16(weights=None)
    names = starfish.find_blocks(model)
    assert names == [f"encoder.layers.encoder_layer_{i}" for i in range(12)]


def test_resnets():
    for model in (torchvision.models.resnet18(weights=None), timm.create_model("resnet18", pretrained=False)):
        assert starfish.find_blocks(model) == [f"layer{s}.{i}" for s in range(1, 5) for i in range(2)]


def test_torchvision_mobilenets_and_efficientnet_and_convnext():
    mv2 = starfish.find_blocks(torchvision.models.mobilenet_v2(weights=None))
    assert mv2 == [f"features.{i}" for i in range(19)]
    mv3 = starfish.find_blocks(torchvision.models.mobilenet_v3_small(weights=None))
    assert mv3 == [f"features.{i}" for i in range(13)]
    eff = starfish.find_blocks(torchvision.models.efficientnet_b0(weights=None))
    assert eff[0] == "features.0" and eff[-1] == "features.8"
    assert "features.1.0" in eff and "features.2.1" in eff and "features.2" not in eff
    assert len(eff) == 2 + 16  # stem, 16 MBConv blocks, head conv
    cnx = starfish.find_blocks(torchvision.models.convnext_tiny(weights=None))
    assert cnx[:2] == ["features.0", "features.1.0"] and "features.2" in cnx  # downsample layers are blocks
    assert len(_n(cnx, "features.5.")) == 9


def test_timm_cnns():
    eff = starfish.find_blocks(timm.create_model("efficientnet_b0", pretrained=False))
    assert eff[0] == "blocks.0.0" and len(eff) == 16
    mv1 = starfish.find_blocks(timm.create_model("mobilenetv1_100", pretrained=False))
    assert len(mv1) == 13 and mv1[0] == "blocks.0.0"
    mv3 = starfish.find_blocks(timm.create_model("mobilenetv3_small_100", pretrained=False))
    assert mv3[0] == "blocks.0.0" and len(mv3) == 1 + 2 + 3 + 2 + 3 + 1
    cnx = starfish.find_blocks(timm.create_model("convnext_atto", pretrained=False))
    assert cnx[0] == "stages.0.blocks.0" and len(cnx) == 2 + 2 + 6 + 2


def test_discovered_blocks_exist_and_produce_tensors():
    model = torchvision.models.mobilenet_v3_small(weights=None).eval()
    names = starfish.find_blocks(model)
    from starfish_plugin.base.outputs import capture_outputs

    with torch.no_grad(), capture_outputs(model, names) as outs:
        model(torch.randn(1, 3, 64, 64))
    assert list(outs) == names and all(o.dim() == 4 for o in outs.values())


def test_unknown_model_asks_for_blocks():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(BlockError, match=r"blocks=\['name', \.\.\.\]"):
        starfish.find_blocks(model)


def test_blocks_held_in_a_module_list_of_module_lists_are_the_ones_that_run():
    # timm Twins keeps each stage's blocks in a ModuleList inside ``blocks``: a ModuleList is never
    # called, so the blocks are what it holds
    from timm.models.twins import Twins

    model = Twins(img_size=32, embed_dims=(8, 16, 32, 64), num_heads=(1, 1, 2, 2), mlp_ratios=(2,) * 4,
                  depths=(2, 2, 2, 1), sr_ratios=(4, 2, 1, 1), wss=(4, 2, 2, 1), num_classes=10).eval()
    names = starfish.find_blocks(model)
    assert names == ["blocks.0.0", "blocks.0.1", "blocks.1.0", "blocks.1.1", "blocks.2.0", "blocks.2.1", "blocks.3.0"]
    ran: list[str] = []
    for name in names:
        model.get_submodule(name).register_forward_hook(lambda *_, name=name: ran.append(name))
    model(torch.randn(2, 3, 32, 32))
    assert ran == names
