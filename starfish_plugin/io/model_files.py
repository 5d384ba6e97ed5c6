"""Models and checkpoints for the command line: build by name, load dense and pruned weights safely.

Every file is read with ``torch.load(..., weights_only=True)``; a file that needs full unpickling
(which can run arbitrary code) is refused unless the caller passes ``unsafe=True``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune

from starfish_plugin.errors import CheckpointFileError
from starfish_plugin.io.structured import (
    StructuredCheckpointError,
    is_structured,
    load_structured_,
    plain_state_dict,
    structured_state,
)

PRUNED_FORMATS = ("auto", "prune", "masks", "torch-pruning", "structured", "weights")


def build_model(spec: str, num_classes: int | None = None) -> nn.Module:
    """``timm:<name>``, ``torchvision:<name>`` or ``starfish:<shipped model>``, untrained (weights
    come from a file)."""
    source, _, name = spec.partition(":")
    kwargs: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    if source == "starfish":
        import dataclasses

        from starfish_plugin.demo.zoo import SPECS, tiny_vit

        if name not in SPECS:
            raise CheckpointFileError(f"starfish ships no model {name!r}; choose from {sorted(SPECS)}")
        return tiny_vit(dataclasses.replace(SPECS[name], **kwargs)).eval()
    if source == "timm" and name:
        import timm

        if not timm.is_model(name):
            raise CheckpointFileError(f"timm has no model {name!r}; see timm.list_models('{name[:4]}*')")
        return timm.create_model(name, pretrained=False, **kwargs).eval()
    if source == "torchvision" and name:
        import torchvision

        if name not in torchvision.models.list_models():
            raise CheckpointFileError(f"torchvision has no model {name!r}; see torchvision.models.list_models()")
        return torchvision.models.get_model(name, weights=None, **kwargs).eval()
    raise CheckpointFileError(
        f"--model {spec!r}: write timm:<name>, torchvision:<name> or starfish:<name>, e.g. timm:deit_small_patch16_224"
    )


def load_file(path: str | Path, unsafe: bool = False) -> Any:
    """``torch.load`` with ``weights_only=True`` unless ``unsafe``; clear errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointFileError(f"checkpoint {path} does not exist (or is not a file)")
    try:
        return torch.load(path, map_location="cpu", weights_only=not unsafe)
    except Exception as exc:  # noqa: BLE001 - every failure here means the same to the user
        text = str(exc)
        if not unsafe and "Unsupported global" in text:
            raise CheckpointFileError(
                f"{path} holds Python objects that only full unpickling can load, which can run arbitrary code; "
                "if you trust the file, pass --unsafe-pickle"
            ) from exc
        raise CheckpointFileError(f"{path} is not a readable torch checkpoint (corrupt or truncated: "
                                  f"{type(exc).__name__})") from exc


def state_dict_of(obj: Any, path: str | Path) -> dict[str, Any]:
    """The state dict in a loaded file: a bare one, or under ``state_dict`` / ``model`` / ``module``."""
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "module"):
            if isinstance(obj.get(key), dict):
                return obj[key]
        if obj and all(isinstance(k, str) for k in obj):
            return obj
    raise CheckpointFileError(f"{path} holds a {type(obj).__name__}, not a state dict")


def load_weights_(model: nn.Module, state: dict[str, Any], path: str | Path, what: str) -> None:
    """``model.load_state_dict(state)`` with an error that names the mismatch."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [k for k in expected if k in state and hasattr(state[k], "shape")
              and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        detail = []
        if missing:
            detail.append(f"missing {missing[:3]}")
        if unexpected:
            detail.append(f"unexpected {unexpected[:3]}")
        if shapes:
            k = shapes[0]
            detail.append(f"{k} has shape {tuple(state[k].shape)}, the model {tuple(expected[k].shape)}")
        raise CheckpointFileError(
            f"the {what} checkpoint {path} is for another architecture than {type(model).__name__} "
            f"({'; '.join(detail)}); check --model and --num-classes"
        )
    model.load_state_dict(state)


def detect_format(obj: Any) -> str:
    """Which of ``PRUNED_FORMATS`` a loaded pruned-model file is."""
    if isinstance(obj, dict) and "full_state_dict" in obj and "attributions" in obj:
        return "torch-pruning"
    if is_structured(obj):
        return "structured"
    state = obj if isinstance(obj, dict) else {}
    if any(k.endswith("_orig") for k in state) and any(k.endswith("_mask") for k in state):
        return "prune"
    tensors = [v for v in state.values() if isinstance(v, torch.Tensor)]
    if tensors and all(t.dtype == torch.bool for t in tensors):
        return "masks"
    return "weights"


def load_pruned(
    dense: nn.Module, path: str | Path, fmt: str = "auto", unsafe: bool = False, dense_has_weights: bool = True
) -> tuple[nn.Module, str]:
    """The pruned model from ``path``, built on a copy of ``dense``; returns it and the format read.

    ``dense_has_weights=False`` says ``dense`` is an untrained architecture: then a mask
    dictionary (which holds no weights) is refused.
    """
    obj = load_file(path, unsafe)
    fmt = detect_format(obj) if fmt == "auto" else fmt
    if fmt == "masks" and not dense_has_weights:
        raise CheckpointFileError(
            f"{path} is a mask dictionary and holds no weights; pass --dense with the dense weights"
        )
    model = copy.deepcopy(dense)
    if fmt == "torch-pruning":
        import torch_pruning as tp

        try:
            tp.load_state_dict(model, state_dict=obj)
        except Exception as exc:  # noqa: BLE001
            raise CheckpointFileError(f"{path} is not a Torch-Pruning state dict for this model ({exc})") from exc
        return model.eval(), fmt
    if fmt == "structured":
        try:
            return load_structured_(model, obj, str(path)).eval(), fmt
        except StructuredCheckpointError as exc:
            raise CheckpointFileError(str(exc)) from exc
    state = state_dict_of(obj, path)
    if fmt == "prune":
        modules = dict(model.named_modules())
        for key in [k for k in state if k.endswith("_mask")]:
            owner, _, tensor_name = key[: -len("_mask")].rpartition(".")
            if owner not in modules or not hasattr(modules[owner], tensor_name):
                raise CheckpointFileError(
                    f"{path} masks {key[:-5]}, which {type(model).__name__} does not have; check --model"
                )
            prune.custom_from_mask(modules[owner], tensor_name, state[key])
        load_weights_(model, state, path, "pruned")
    elif fmt == "masks":
        params = dict(model.named_parameters())
        modules = dict(model.named_modules())
        for name, mask in state.items():
            if name not in params or tuple(params[name].shape) != tuple(mask.shape):
                raise CheckpointFileError(f"mask {name!r} in {path} matches no parameter of that shape in the model")
            owner, _, tensor_name = name.rpartition(".")
            prune.custom_from_mask(modules[owner], tensor_name, mask)
    elif fmt == "weights":
        load_weights_(model, state, path, "pruned")
    else:
        raise CheckpointFileError(f"unknown pruned format {fmt!r}; choose from {PRUNED_FORMATS}")
    return model.eval(), fmt


def save_pruned(model: nn.Module, fmt: str, path: str | Path) -> None:
    """Write the healed model in form ``fmt``: ``torch-pruning`` with ``tp.state_dict`` (a pickle),
    ``structured`` weights-only with its shapes, ``weights`` a state dict with masks folded in as
    zeros, anything else as the model's state dict (``weight_orig`` + ``weight_mask`` stay)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "torch-pruning":
        import torch_pruning as tp

        torch.save(tp.state_dict(model), path)
    elif fmt == "structured":
        torch.save(structured_state(model), path)
    elif fmt == "weights":
        torch.save(plain_state_dict(model), path)
    else:
        torch.save(model.state_dict(), path)
