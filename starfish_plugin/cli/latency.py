"""Forward latency of a pruned model against its dense model (``starfish bench``)."""

from __future__ import annotations

import copy
import platform
import statistics
import time

import torch
from torch import nn


def materialize(model: nn.Module) -> nn.Module:
    """A copy whose masks are baked into plain weights (prune hooks and parametrizations removed,
    by the adapters' ``starfish_remove_masks``), which is how a pruned model is deployed."""
    from starfish_plugin.plugins.manager import plugin_manager

    with torch.no_grad():  # plain tensors hold the masked weights: deepcopy accepts them
        model = copy.deepcopy(_detached(model))
    plugin_manager().hook.starfish_remove_masks(model=model)
    return model


def _detached(model: nn.Module) -> nn.Module:
    """``model`` with every tensor attribute that is not a parameter or buffer (the masked weight a
    prune hook leaves as a non-leaf tensor, which deepcopy refuses) detached, in place."""
    for module in model.modules():
        for name, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) and value.grad_fn is not None:
                setattr(module, name, value.detach())
    return model


@torch.inference_mode()
def _time(model: nn.Module, x: torch.Tensor) -> float:
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    model(x)
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def compare_latency(
    dense: nn.Module, pruned: nn.Module, batch_size: int, image_size: int, channels: int = 3,
    repeats: int = 30, device: str = "cpu",
) -> dict:
    """Median forward seconds of both models, interleaved, on one random batch; and their ratio."""
    models = {"dense": dense.to(device).eval(), "pruned": materialize(pruned).to(device).eval()}
    x = torch.randn(batch_size, channels, image_size, image_size, device=device)
    for model in models.values():  # warm-up
        for _ in range(3):
            _time(model, x)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            times[name].append(_time(model, x))
    med = {name: statistics.median(t) for name, t in times.items()}
    params = {name: sum(int((p != 0).sum()) for p in m.parameters()) for name, m in models.items()}
    return {
        "batch_size": batch_size, "image_size": image_size, "repeats": repeats, "device": device,
        "hardware": torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.processor()
        or platform.machine(),
        "threads": torch.get_num_threads(),
        "dense_ms": med["dense"] * 1e3, "pruned_ms": med["pruned"] * 1e3, "speedup": med["dense"] / med["pruned"],
        "nonzero_parameters": params,
        "note": "dense kernels for both; unstructured zeros give no CPU speedup, a physically smaller "
        "(Torch-Pruning) model does",
    }
