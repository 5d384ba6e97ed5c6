"""The shipped CNN (starfish:resnet_fmnist): it loads, is found by block discovery and is as accurate
as its metadata says (checked on the first 1,000 Fashion-MNIST test images)."""

import json

import pytest
import torch
from torch import nn

import starfish_plugin as starfish
from starfish_plugin.demo.datasets import fashion_mnist_root, load_fashion_mnist
from starfish_plugin.demo.zoo import CHECKPOINT_DIR, ResidualBlock, SmallResNet, load_checkpoint
from starfish_plugin.io.model_files import build_model

META = json.loads((CHECKPOINT_DIR / "resnet_fmnist.json").read_text())


def test_checkpoint_is_small_and_loads_with_weights_only():
    path = CHECKPOINT_DIR / "resnet_fmnist.pt"
    assert path.stat().st_size < 2 * 1024**2
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = load_checkpoint("resnet_fmnist")
    assert isinstance(model, SmallResNet) and not model.training
    assert set(state) == set(model.state_dict())
    assert sum(p.numel() for p in model.parameters()) == META["parameters"]
    assert model(torch.zeros(2, *META["input_size"])).shape == (2, len(META["classes"]))


def test_residual_blocks_are_stages_of_one_block_class():
    model = build_model("starfish:resnet_fmnist")  # what the CLI's --model starfish:resnet_fmnist builds
    assert isinstance(model, SmallResNet)
    names = model.block_names()
    assert names == [f"stages.{i}.{j}" for i in range(3) for j in range(2)]
    assert all(isinstance(model.get_submodule(n), ResidualBlock) for n in names)
    assert all(isinstance(stage, nn.Sequential) for stage in model.stages)


@pytest.mark.skipif(fashion_mnist_root() is None,
                    reason="Fashion-MNIST is not installed (apt-get install -y dataset-fashion-mnist, "
                           "or set STARFISH_FASHION_MNIST to a folder with the IDX files)")
def test_accuracy_matches_metadata():
    images, labels = load_fashion_mnist("test")
    images, labels = images[:1000], labels[:1000]
    top1 = starfish.evaluate(load_checkpoint("resnet_fmnist"), zip(images.split(250), labels.split(250)))
    assert abs(top1 - META["test_top1"]) <= 2.0, f"{top1:.2f} on 1,000 test images, metadata says {META['test_top1']}"
