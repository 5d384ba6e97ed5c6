"""Forward latency of a pruned model against its dense model (``starfish bench``)."""

from __future__ import annotations

import copy
import platform
import statistics
import time
from typing import cast

import torch
from torch import nn
from torch.nn.utils import parametrize, prune


def materialize(model: nn.Module) -> nn.Module:
    """A copy whose masks are baked into plain weights (prune hooks and parametrizations removed),
    which is how a pruned model is deployed."""
    for module in model.modules():  # prune's computed weights are non-leaf tensors, which deepcopy
        for hook in module._forward_pre_hooks.values():  # refuses; the hook recomputes them anyway
            if isinstance(hook, prune.BasePruningMethod):
                setattr(module, hook._tensor_name, getattr(module, hook._tensor_name).detach())
    model = copy.deepcopy(model)
    for module in model.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                prune.remove(module, hook._tensor_name)
        if parametrize.is_parametrized(module):
            for name in list(cast(nn.ModuleDict, module.parametrizations)):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
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
