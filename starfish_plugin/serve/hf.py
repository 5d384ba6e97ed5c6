"""``format="hf"``: a Hugging Face folder (``config.json`` + safetensors) that transformers, vLLM and
SGLang load as it is: pruned weights are exact zeros, tied weights stay tied, and a model whose
widths Torch-Pruning cut gets a config whose shapes rebuild it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from starfish_plugin.errors import ExportError

# config fields that follow one module's width, by the attribute of the module that holds it
WIDTH_FIELDS = {"intermediate_size": ("mlp.up_proj", "out_features"), "n_inner": ("mlp.c_fc", "nf")}


def is_hf_model(model: nn.Module) -> bool:
    return callable(getattr(model, "save_pretrained", None)) and getattr(model, "config", None) is not None


def _shapes_of_fresh(model: nn.Module, config: Any) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        fresh = type(model)(config)
    return {n: tuple(p.shape) for n, p in fresh.state_dict().items()}


def _widths(model: nn.Module, suffix: str, attribute: str) -> set[int]:
    return {int(getattr(m, attribute)) for n, m in model.named_modules()
            if n.endswith(suffix) and isinstance(getattr(m, attribute, None), int)}


def config_for(model: nn.Module) -> Any:
    """``model.config``, with the widths Torch-Pruning changed written in (a copy), checked by
    building the architecture from it on the meta device and comparing every tensor's shape."""
    import copy

    config = copy.deepcopy(model.config)
    own = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    if _shapes_of_fresh(model, config) == own:
        return config
    for field, (suffix, attribute) in WIDTH_FIELDS.items():
        widths = _widths(model, suffix, attribute)
        if hasattr(config, field) and len(widths) == 1:
            setattr(config, field, widths.pop())
    fresh = _shapes_of_fresh(model, config)
    differ = [(n, own[n], fresh.get(n)) for n in own if fresh.get(n) != own[n]]
    if differ:
        name, have, want = differ[0]
        raise ExportError(
            f"{type(model).__name__}'s config cannot describe its pruned shapes: {name} is {have} but the config "
            f"builds {want} ({len(differ)} tensor(s) differ). A Hugging Face config holds one width per kind of "
            "layer; prune every layer of a kind to the same width (Torch-Pruning's global_pruning=False), or export "
            "with format='torch' or 'onnx'"
        )
    return config


def save_hf(model: nn.Module, directory: Path) -> dict[str, Any]:
    """Write ``model`` (plain: masks made permanent) with ``save_pretrained`` (safetensors)."""
    if not is_hf_model(model):
        raise ExportError(
            f"format='hf' needs a Hugging Face transformers model (with save_pretrained and a config); "
            f"{type(model).__name__} is not one. Export timm/torchvision models with format='torch' or 'onnx'"
        )
    hf = cast(Any, model)  # a transformers PreTrainedModel
    hf.config = config_for(model)
    hf.save_pretrained(directory, safe_serialization=True)
    architecture = (hf.config.architectures or [type(model).__name__])[0]
    return {"hf_architecture": architecture,
            "load_hint": f"transformers.{architecture}.from_pretrained(path)"}


def load_hf(directory: Path, facts: dict[str, Any]) -> nn.Module:
    from starfish_plugin.extras import need

    transformers = need("transformers", "loading a Hugging Face export")
    cls = getattr(transformers, facts["hf_architecture"], None)
    if cls is None:
        raise ExportError(f"{directory} holds a {facts['hf_architecture']}, which this transformers "
                          f"({transformers.__version__}) does not have; install the version in starfish.json")
    return cls.from_pretrained(directory).eval()
