"""Torch-Pruning's kept channels: for every pruned module, which original output and input
channels survive (``KeptChannels``), and the channel counts modules keep."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn

from starfish_plugin.adapters.tp_fixes import Fix, Misfit

NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)
TRAINED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2): a linear layer with its weight stored ``(in, out)``."""
    return type(module).__name__ == "Conv1D" and isinstance(getattr(module, "nf", None), int)


def is_trained(module: nn.Module) -> bool:
    """A layer whose surviving weights the heal trains (Linear, convolutions, Conv1D)."""
    return isinstance(module, TRAINED) or is_conv1d(module)

def channel_count(module: nn.Module, dim: str) -> int | None:
    """Current number of output (``"out"``) or input (``"in"``) channels of a prunable module."""
    if isinstance(module, nn.Linear):
        return module.out_features if dim == "out" else module.in_features
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels if dim == "out" else module.in_channels
    if isinstance(module, (nn.modules.batchnorm._BatchNorm,)):
        return module.num_features
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[-1]
    if isinstance(module, nn.GroupNorm):
        return module.num_channels
    if isinstance(module, nn.MultiheadAttention):
        return module.embed_dim
    if is_conv1d(module):
        return int(cast(torch.Tensor, module.weight).shape[1 if dim == "out" else 0])
    return None


class KeptChannels:
    """Which original channels survive in each module of one model pruned by Torch-Pruning."""

    def __init__(self, model: nn.Module) -> None:
        # keyed by id(): holding the modules themselves would keep the model alive forever
        self.names = {id(module): name for name, module in model.named_modules()}
        self.runner_installed = False
        self.kept: dict[tuple[str, str], list[int]] = {}
        self.original: dict[tuple[str, str], int] = {}
        self.groups = 0
        self.steps = 0
        self.inconsistent: set[tuple[str, str]] = set()
        # modules without channels of their own (pooling, activations, concatenations, whole blocks):
        # name -> how their output channels derive from prunable modules' (see ``trace``)
        self.derived: dict[str, list] = {}
        self.widths: dict[str, int] = {}  # original output width of every prunable module traced
        self.example: tuple[tuple, dict] | None = None  # an input the model ran before pruning
        self.fixes: list[Fix] = []  # what the repair after each step changed
        self.misfits: list[Misfit] = []  # what the repair after the last step could not
        self.notes: list[str] = []  # set-up completed before the first step, for the report
        self.dense: Callable[[], nn.Module | None] | None = None  # weakref to the weights before the first step
        # attach's starfish_repair_pruned relay, behind a weak reference
        self.user_repair: Callable[[], Callable[[int], None] | None] | None = None

    def removals(self, group: Any, graph: Any) -> dict[tuple[str, str], tuple[nn.Module, set[int]]]:
        """What pruning ``group`` will remove, per (module name, "out"/"in"), in current coordinates."""
        out: dict[tuple[str, str], tuple[nn.Module, set[int]]] = {}
        for dep, idxs in group:
            module = dep.target.module
            name = self.names.get(id(module))
            if name is None or not isinstance(module, nn.Module):
                continue  # graph-internal ops and bare nn.Parameters (cls_token, pos_embed)
            dim = "out" if isinstance(module, NORMS) or graph.is_out_channel_pruning_fn(dep.handler) else "in"
            plain = {int(getattr(i, "idx", i)) for i in idxs}
            out.setdefault((name, dim), (module, set()))[1].update(plain)
        return out

    def sizes(self, pending: dict[tuple[str, str], tuple[nn.Module, set[int]]]) -> dict[tuple[str, str], int | None]:
        """Current channel counts of the modules ``pending`` names, taken before pruning."""
        return {key: channel_count(module, key[1]) for key, (module, _) in pending.items()}

    def apply(self, pending: dict[tuple[str, str], tuple[nn.Module, set[int]]], before: dict) -> None:
        """Commit ``pending`` for the modules that really shrank; count the group if any did."""
        applied = False
        for key, (module, idxs) in pending.items():
            size_before, size_now = before[key], channel_count(module, key[1])
            if size_before is None or size_now == size_before:
                continue  # not pruned (an interactive caller skipped the group) or not a channel module
            applied = True
            if key not in self.kept:
                self.kept[key] = list(range(size_before))
                self.original[key] = size_before
            if len(self.kept[key]) != size_before or size_now != size_before - len(idxs):
                self.inconsistent.add(key)
            self.kept[key] = [c for i, c in enumerate(self.kept[key]) if i not in idxs]
        self.groups += applied

    def run_group(self, group: Any, graph: Any, prune: Callable[[], None]) -> None:
        pending = self.removals(group, graph)
        before = self.sizes(pending)
        prune()
        self.apply(pending, before)

    def kept_out(self) -> dict[str, torch.Tensor]:
        out = {
            name: torch.tensor(kept, dtype=torch.long)
            for (name, dim), kept in self.kept.items()
            if dim == "out" and (name, dim) not in self.inconsistent
        }
        for name, (kept, _) in self._derived_kept().items():
            out.setdefault(name, torch.tensor(kept, dtype=torch.long))
        return out

    def original_out(self) -> dict[str, int]:
        out = {name: size for (name, dim), size in self.original.items() if dim == "out"}
        for name, (_, original) in self._derived_kept().items():
            out.setdefault(name, original)
        return out

    def _derived_kept(self) -> dict[str, tuple[list[int], int]]:
        """Kept channels of the traced modules without a record of their own that lost channels."""
        out = {}
        for name, expr in self.derived.items():
            if (name, "out") in self.kept:
                continue  # a prunable module: its own record
            value = self.evaluate(expr)
            if value is not None and len(value[0]) < value[1]:
                out[name] = value
        return out

    def evaluate(self, expr: list) -> tuple[list[int], int] | None:
        """(kept original channels, original width) of a traced expression, or ``None`` if unknown."""
        if expr[0] == "src":
            key = (expr[1], "out")
            original = self.original.get(key, self.widths.get(expr[1]))
            if key in self.inconsistent or original is None:
                return None
            return list(self.kept.get(key, range(original))), original
        kept: list[int] = []
        offset = 0
        for child in expr[1]:  # "cat": the channels of each part, shifted by the widths before it
            value = self.evaluate(child)
            if value is None:
                return None
            kept += [offset + c for c in value[0]]
            offset += value[1]
        return kept, offset

    def pruned_modules(self) -> set[str]:
        return {name for (name, _), kept in self.kept.items() if len(kept) < self.original[(name, _)]}
