"""Save a model with swapped kernels and load it back, weights-only (no pickled code)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from starfish_plugin.deploy.kernels import KERNEL_CLASSES, KernelLinear
from starfish_plugin.errors import KernelError

FORMAT = "starfish-inference/1"


def save_for_inference(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Write ``model``'s state dict and which layer runs which kernel (CSR/BSR weights stay sparse)."""
    kernels = {name: m.spec() for name, m in model.named_modules() if isinstance(m, KernelLinear)}
    torch.save({"format": FORMAT, "kernels": kernels, "state_dict": model.state_dict()}, Path(path))


def load_for_inference(model: nn.Module, path: str | os.PathLike[str], map_location: str | None = None) -> nn.Module:
    """``model`` (the plain architecture: the dense model, or a pruned one with its masks removed)
    with the saved layers swapped for their kernels and every weight loaded, in place."""
    device = next((t.device for t in [*model.parameters(), *model.buffers()]), torch.device("cpu"))
    blob = torch.load(Path(path), map_location=map_location, weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise KernelError(f"{path} is not a file written by save_for_inference (format {FORMAT!r}); "
                          "for a plain state dict use model.load_state_dict(torch.load(path))")
    for name, spec in blob["kernels"].items():
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            layer = None
        if not isinstance(layer, (nn.Linear, KernelLinear)):
            raise KernelError(f"{path} swaps layer {name!r}, which {type(model).__name__} has not as a Linear; "
                              "load it into the architecture it was saved from")
        if (layer.in_features, layer.out_features) != (spec["in_features"], spec["out_features"]):
            raise KernelError(f"{path}: layer {name!r} is {spec['out_features']}x{spec['in_features']} there and "
                              f"{layer.out_features}x{layer.in_features} here; build the model with the saved shapes")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, KERNEL_CLASSES[spec["kernel"]].from_spec(spec))
    model.load_state_dict(blob["state_dict"])
    return model.to(device).eval()  # the file's tensors come on the device they were saved from
