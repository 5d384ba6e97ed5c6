"""What a structurally pruned model saves: parameters, and multiply-accumulates of its Linear and
Conv layers on one input (the layers pruning shrinks; norms and activations are left out)."""

from __future__ import annotations

import torch
from torch import nn

from starfish_plugin.base.model_io import Inputs, call_model


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def layer_macs(model: nn.Module, x: Inputs) -> int:
    """Multiply-accumulates of every ``nn.Linear`` and ``nn.Conv*d`` in one forward on ``x``."""
    total = 0

    def count(module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        if not isinstance(output, torch.Tensor):
            return
        if isinstance(module, nn.Linear):
            total += output.numel() * module.in_features
        else:  # a convolution: each output element sums in_channels/groups x kernel products
            conv = module
            assert isinstance(conv, nn.modules.conv._ConvNd)
            kernel = int(torch.tensor(conv.kernel_size).prod())
            total += output.numel() * (conv.in_channels // conv.groups) * kernel

    handles = [m.register_forward_hook(count) for m in model.modules()
               if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    try:
        call_model(model, x)
    finally:
        for handle in handles:
            handle.remove()
    return total
