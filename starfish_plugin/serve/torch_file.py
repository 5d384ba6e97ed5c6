"""``format="torch"``: a weights-only ``model.pt`` (masks folded in as zeros, pruned shapes and module
attributes kept) and the constructor that rebuilds the architecture (``timm:<name>``,
``torchvision:<name>``, ``starfish:<name>`` and its arguments), checked by rebuilding it once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from starfish_plugin.errors import CheckpointFileError, ExportError
from starfish_plugin.io.model_files import build_model
from starfish_plugin.io.structured import StructuredCheckpointError, load_structured_, structured_state

TORCH_FILE = "model.pt"


def guess_spec(model: nn.Module) -> tuple[str | None, dict[str, Any]]:
    """The constructor of a timm model (its ``pretrained_cfg`` names it) and its class count."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and cfg.get("architecture"):
        args = {"num_classes": model.num_classes} if isinstance(getattr(model, "num_classes", None), int) else {}
        return f"timm:{cfg['architecture']}", args
    return None, {}


def rebuild(spec: str, args: dict[str, Any], state: dict[str, Any], source: str) -> nn.Module:
    try:
        model = build_model(spec, model_args=args)
        return load_structured_(model, state, source).eval()
    except (CheckpointFileError, StructuredCheckpointError, RuntimeError) as exc:
        raise ExportError(
            f"the architecture built by {spec!r} with {args} does not take this model's weights ({exc}); pass the "
            "model_spec and model_args that built it, e.g. model_spec='timm:vit_small_patch16_224', "
            "model_args={'num_classes': 10}"
        ) from exc


def save_torch(model: nn.Module, directory: Path, spec: str | None, args: dict[str, Any] | None) -> dict[str, Any]:
    guessed, guessed_args = guess_spec(model)
    spec = spec or guessed
    args = dict(guessed_args if args is None and spec == guessed else args or {})
    if spec is None:
        raise ExportError(
            f"format='torch' records how to rebuild the architecture, and {type(model).__name__} does not say: pass "
            "model_spec ('timm:<name>', 'torchvision:<name>' or 'starfish:<name>') and model_args (its constructor "
            "arguments, e.g. {'num_classes': 10})"
        )
    state = structured_state(model)
    copy = rebuild(spec, args, state, "the model being exported")
    mine = state["state_dict"]
    theirs = copy.state_dict()
    if set(mine) != set(theirs) or any(not torch.equal(mine[k], theirs[k].cpu()) for k in mine):
        raise ExportError(f"rebuilding {spec!r} with {args} does not give back this model's weights exactly; pass "
                          "the model_spec and model_args that built it")
    torch.save(state, directory / TORCH_FILE)
    return {"model_spec": spec, "model_args": args,
            "load_hint": f"load_structured_(build_model({spec!r}, model_args={args}), torch.load('{TORCH_FILE}'))"}


def load_torch(directory: Path, facts: dict[str, Any]) -> nn.Module:
    state = torch.load(directory / TORCH_FILE, map_location="cpu", weights_only=True)
    return rebuild(facts["model_spec"], facts.get("model_args", {}), state, str(directory / TORCH_FILE))
