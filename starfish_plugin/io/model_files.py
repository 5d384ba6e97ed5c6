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

from starfish_plugin.errors import CheckpointFileError
from starfish_plugin.extras import need
from starfish_plugin.io.state_dicts import load_weights_, state_dict_of
from starfish_plugin.io.structured import (
    StructuredCheckpointError,
    is_structured,
    load_structured_,
    plain_state_dict,
    structured_state,
)
from starfish_plugin.runtime.atomic import write_atomically


def build_model(spec: str, num_classes: int | None = None, model_args: dict[str, Any] | None = None) -> nn.Module:
    """``timm:<name>``, ``torchvision:<name>`` or ``starfish:<shipped model>``, untrained (weights
    come from a file), with ``model_args`` passed to its constructor."""
    kwargs: dict[str, Any] = dict(model_args or {})
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        return _construct(spec, kwargs)
    except TypeError as exc:  # an argument the constructor does not take
        raise CheckpointFileError(
            f"--model {spec} does not take the constructor arguments {sorted(kwargs)}: {exc}; check --model-arg "
            "and --num-classes against the model's constructor"
        ) from exc


def _construct(spec: str, kwargs: dict[str, Any]) -> nn.Module:
    source, _, name = spec.partition(":")
    if source == "starfish":
        import dataclasses

        from starfish_plugin.demo.zoo import SPECS, tiny_vit

        if name not in SPECS:
            raise CheckpointFileError(f"starfish ships no model {name!r}; choose from {sorted(SPECS)}")
        return tiny_vit(dataclasses.replace(SPECS[name], **kwargs)).eval()
    if source == "timm" and name:
        timm = need("timm", f"--model {spec}")

        if not timm.is_model(name):
            raise CheckpointFileError(f"timm has no model {name!r}; see timm.list_models('{name[:4]}*')")
        return timm.create_model(name, pretrained=False, **kwargs).eval()
    if source == "torchvision" and name:
        torchvision = need("torchvision", f"--model {spec}")

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


CORE_FORMATS = ("structured", "weights")


def pruned_formats() -> tuple[str, ...]:
    """Every pruned-model file format: ``auto``, the core's (``structured``, ``weights``) and the
    ones plugins read and write (``prune``, ``masks``, ``torch-pruning``, ...)."""
    from starfish_plugin.plugins.manager import plugin_manager

    plugged = [f for formats in plugin_manager().hook.starfish_file_formats() for f in formats]
    return ("auto", *dict.fromkeys([*plugged, *CORE_FORMATS]))


def detect_format(obj: Any) -> str:
    """Which of ``pruned_formats()`` a loaded pruned-model file is (``weights`` when nothing else fits)."""
    from starfish_plugin.plugins.manager import plugin_manager

    if is_structured(obj):
        return "structured"
    return plugin_manager().hook.starfish_detect_format(obj=obj) or "weights"


def load_pruned(
    dense: nn.Module, path: str | Path, fmt: str = "auto", unsafe: bool = False, dense_has_weights: bool = True
) -> tuple[nn.Module, str]:
    """The pruned model from ``path``, built on a copy of ``dense``; returns it and the format read.

    ``dense_has_weights=False`` says ``dense`` is an untrained architecture: then a mask
    dictionary (which holds no weights) is refused.
    """
    from starfish_plugin.plugins.manager import plugin_manager

    obj = load_file(path, unsafe)
    fmt = detect_format(obj) if fmt == "auto" else fmt
    if fmt == "masks" and not dense_has_weights:
        raise CheckpointFileError(
            f"{path} is a mask dictionary and holds no weights; pass --dense with the dense weights"
        )
    model = copy.deepcopy(dense)
    if fmt == "structured":
        try:
            return load_structured_(model, obj, str(path)).eval(), fmt
        except StructuredCheckpointError as exc:
            raise CheckpointFileError(str(exc)) from exc
    if fmt == "weights":
        load_weights_(model, state_dict_of(obj, path), path, "pruned")
        return model.eval(), fmt
    loaded = plugin_manager().hook.starfish_load_pruned(model=model, obj=obj, fmt=fmt, source=str(path))
    if loaded is None:
        raise CheckpointFileError(f"unknown pruned format {fmt!r}; choose from {pruned_formats()}")
    return loaded.eval(), fmt


def save_pruned(model: nn.Module, fmt: str, path: str | Path) -> None:
    """Write the healed model in form ``fmt``, atomically: ``structured`` weights-only with its
    shapes, ``weights`` a state dict with masks folded in as zeros, a plugin's format by that plugin
    (``torch-pruning``: ``tp.state_dict``, a pickle; ``prune``: ``weight_orig`` + ``weight_mask``);
    anything else as the model's state dict."""
    from starfish_plugin.plugins.manager import plugin_manager

    def write(tmp: Path) -> None:
        if fmt == "structured":
            torch.save(structured_state(model), tmp)
        elif fmt == "weights":
            torch.save(plain_state_dict(model), tmp)
        elif not plugin_manager().hook.starfish_save_pruned(model=model, fmt=fmt, path=tmp):
            torch.save(model.state_dict(), tmp)

    write_atomically(Path(path), write, lambda reason: CheckpointFileError(
        f"writing {path} failed ({reason}); free space there or choose another path"
    ))
