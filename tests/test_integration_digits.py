"""Real data: the shipped digits ViT, pruned at 0.9 with torch.nn.utils.prune, healed on 500 images."""

import copy

import pytest
import torch

import starfish_plugin as starfish
from starfish_plugin.demo.datasets import load_digits_split
from starfish_plugin.demo.run import prune_vit_
from starfish_plugin.demo.zoo import load_checkpoint


@pytest.mark.slow
def test_healing_recovers_accuracy_on_digits():
    torch.manual_seed(0)
    split = load_digits_split()
    test = list(zip(split["test"][0].split(200), split["test"][1].split(200)))
    dense = load_checkpoint("vit_digits")
    pruned = prune_vit_(copy.deepcopy(dense), 0.9)
    dense_acc, pruned_acc = starfish.evaluate(dense, test), starfish.evaluate(pruned, test)
    calibration = split["train"][0][:500]  # unlabeled
    report = starfish.heal(pruned, dense, calibration, epochs=10, seed=0, quiet=True)
    healed_acc = starfish.evaluate(pruned, test)
    assert dense_acc > 90.0
    assert pruned_acc < dense_acc - 30.0  # pruning at 0.9 really hurts
    assert healed_acc > pruned_acc + 20.0  # and healing really recovers
    assert report.mask_unchanged and report.masked_weights_zero
    assert abs(report.sparsity - 0.9) < 1e-3
