"""What an export says about its model: ``starfish.json`` (read back by ``load_exported``) and a
model card (``README.md``): how it was pruned and healed, and what it was checked against."""

from __future__ import annotations

import importlib.metadata
import json
import math
import platform
from pathlib import Path
from typing import Any

import torch
from torch import nn

from starfish_plugin.core.nm_pattern import nm_violation

CARD_FILE, FACTS_FILE = "README.md", "starfish.json"
PACKAGES = ("starfish-plugin", "torch", "transformers", "timm", "torchvision", "torch-pruning", "torchao", "onnx",
            "onnxruntime", "onnxscript", "safetensors")
HEAL_FIELDS = ("loss", "strategy", "recipe_applied", "n_samples", "epoch_losses", "block_cosine_before",
               "block_cosine_after", "held_out_samples", "held_out_before", "held_out_after", "output_cosine_before",
               "output_cosine_after", "returned_state", "adapter", "sparsity", "mask_unchanged")


def versions() -> dict[str, str]:
    """Installed versions of the packages an export may involve (those present)."""
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def layer_sparsity(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Every weight matrix or kernel of ``model`` (a plain model, masks folded): its shape, share of
    zeros and pattern (``"2:4"`` where every group of 4 inputs has at most 2 non-zeros, else
    ``"unstructured"`` when it has zeros, ``"dense"``)."""
    layers: dict[str, dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if p.dim() < 2 or not p.is_floating_point():
            continue
        w = p.detach()
        zeros = float((w == 0).float().mean())
        two_d = w.reshape(w.shape[0], -1)
        if zeros >= 0.5 - 1e-9 and two_d.shape[1] % 4 == 0 and nm_violation(two_d, 2, 4) is None:
            pattern = "2:4"
        else:
            pattern = "unstructured" if zeros > 0 else "dense"
        layers[name] = {"shape": list(w.shape), "zeros": round(zeros, 4), "pattern": pattern}
    return layers


def heal_facts(report: Any) -> dict[str, Any]:
    """The healing report's fields a reader of the card needs (``{}`` without a report)."""
    if report is None:
        return {}
    facts = {k: getattr(report, k) for k in HEAL_FIELDS if hasattr(report, k)}
    config = getattr(report, "config", {}) or {}
    facts["recipe"] = {k: config.get(k) for k in ("recipe", "epochs", "lr", "batch_size", "loss", "strategy")}
    return json.loads(json.dumps(facts, default=str))


def write_card(directory: Path, facts: dict[str, Any]) -> None:
    """``starfish.json`` and a short ``README.md`` model card from ``facts``."""
    (directory / FACTS_FILE).write_text(json.dumps(facts, indent=2, default=str) + "\n")
    layers = facts.get("layers", {})
    patterns = sorted({v["pattern"] for v in layers.values()})
    total = sum(math.prod(v["shape"]) for v in layers.values())
    zeros = sum(math.prod(v["shape"]) * v["zeros"] for v in layers.values())
    heal = facts.get("heal", {})
    lines = [
        f"# {facts['architecture']} (pruned, healed with STARFISH)", "",
        f"Exported by starfish-plugin as `{facts['format']}` ({', '.join(facts['files'])}). "
        f"Load it with `starfish_plugin.load_exported(\"{directory.name}\")`"
        + (f" or `{facts['load_hint']}`" if facts.get("load_hint") else "") + ".", "",
        f"- weight matrices: {len(layers)}, {zeros / total:.1%} zeros overall" if total else "- no weight matrices",
        f"- patterns: {', '.join(patterns) or 'none'}",
    ]
    if heal:
        lines += [
            f"- healed: loss {heal.get('loss')}, strategy {heal.get('strategy', 'joint')}, "
            f"{heal.get('n_samples')} calibration samples, recipe {heal.get('recipe')}",
            f"- held-out objective {heal.get('held_out_before')} -> {heal.get('held_out_after')} "
            f"(state returned: {heal.get('returned_state')})",
            f"- final-output cosine to the dense model {heal.get('output_cosine_before')} -> "
            f"{heal.get('output_cosine_after')}",
        ]
    else:
        lines.append("- no heal report was given to the export: healing facts not recorded")
    for key, value in facts.get("checks", {}).items():
        lines.append(f"- check, {key}: {value}")
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in facts.get("versions", {}).items()), ""]
    (directory / CARD_FILE).write_text("\n".join(lines))


def read_facts(directory: Path) -> dict[str, Any]:
    """The ``starfish.json`` of an export directory."""
    return json.loads((directory / FACTS_FILE).read_text())


def dtype_name(model: nn.Module) -> str:
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in model.parameters()})
    return ",".join(dtypes) or str(torch.get_default_dtype())
