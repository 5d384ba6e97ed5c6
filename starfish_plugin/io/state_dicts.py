"""State dicts read from files: found inside the file's object, loaded with errors that name the
mismatch. No plugin or toolkit knowledge (adapters use these too)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from starfish_plugin.errors import CheckpointFileError


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
