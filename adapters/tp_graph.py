"""Adapter for Torch-Pruning: structures physically removed through a dependency graph.

Torch-Pruning leaves no mask: pruned channels, MLP units and heads are gone. This adapter

* records, for every pruned module, which *original* output/input channels survive (through
  ``starfish.attach`` or ``track``), so that dense targets can be indexed by the kept channels
  when the residual stream (embedding width, a CNN stage's channels) was pruned;
* keeps timm ``Attention`` (``num_heads``, ``head_dim``, ``attn_dim``) and torchvision
  ``VisionTransformer`` (``hidden_dim``) attributes in step with the pruned shapes;
* tells ``heal`` what to train: the surviving weights and biases of the pruned Linear/Conv
  layers (``HealConfig(trainable="all")`` trains every parameter).

A model pruned without a record can still be healed when the block outputs keep their width
(only MLP units or heads pruned).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from starfish_plugin.errors import MaskNotFoundError, ModelMismatchError
from starfish_plugin.hookspecs import hookimpl
from starfish_plugin.masks import MaskedTensor, SparsityPlan

NAME = "torch_pruning"
HINT = (
    "With Torch-Pruning, call starfish.attach(pruner, dense, calibration) (or "
    "starfish_plugin.adapters.tp_graph.track(pruner)) before the first pruner.step(): the kept "
    "channels are recorded and attention modules updated (tp_graph.sync_attention(model, pruner)). "
    "The record belongs to that model object: a copy has none, nor has a model reloaded from any "
    "file but starfish's structured one (starfish_plugin.structured_checkpoint.structured_state), "
    "so heal the tracked model itself or save it in that form."
)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)
TRAINED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

_RECORDS: "weakref.WeakKeyDictionary[nn.Module, KeptChannels]" = weakref.WeakKeyDictionary()


def is_torch_pruning_pruner(pruner: object) -> bool:
    """A Torch-Pruning ``BasePruner`` (or subclass, user-defined ones included)."""
    try:
        import torch_pruning
    except ImportError:
        return False
    return isinstance(pruner, torch_pruning.pruner.BasePruner)


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
        return {
            name: torch.tensor(kept, dtype=torch.long)
            for (name, dim), kept in self.kept.items()
            if dim == "out" and (name, dim) not in self.inconsistent
        }

    def original_out(self) -> dict[str, int]:
        return {name: size for (name, dim), size in self.original.items() if dim == "out"}

    def pruned_modules(self) -> set[str]:
        return {name for (name, _), kept in self.kept.items() if len(kept) < self.original[(name, _)]}


def sync_attention(model: nn.Module, pruner: Any | None = None) -> None:
    """Update attention bookkeeping after qkv / head / embedding pruning so forward still works."""
    heads = getattr(pruner, "num_heads", None) or {}
    for module in model.modules():
        qkv = getattr(module, "qkv", None)
        if isinstance(qkv, nn.Linear) and hasattr(module, "num_heads") and hasattr(module, "head_dim"):
            if qkv.out_features == 3 * module.num_heads * module.head_dim:
                continue  # qkv untouched (e.g. an interactive caller skipped its group)
            module.num_heads = int(heads.get(qkv, module.num_heads))
            module.head_dim = qkv.out_features // (3 * module.num_heads)
            if hasattr(module, "attn_dim"):
                module.attn_dim = module.num_heads * module.head_dim
        conv_proj = getattr(module, "conv_proj", None)
        if isinstance(conv_proj, nn.Conv2d) and hasattr(module, "hidden_dim"):
            module.hidden_dim = conv_proj.out_channels  # torchvision VisionTransformer


def _check_dense(model: nn.Module, dense: nn.Module) -> None:
    ours = dict(model.named_parameters())
    theirs = dict(dense.named_parameters())
    if set(ours) != set(theirs):
        diff = sorted(set(ours) ^ set(theirs))[:5]
        raise ModelMismatchError(
            f"dense is not the model the pruner started from: parameter names differ ({diff}); "
            "pass dense = copy.deepcopy(model) taken before creating the pruner"
        )
    for name, p in ours.items():
        q = theirs[name]
        if p.shape != q.shape or not torch.equal(p.detach().cpu(), q.detach().cpu()):
            raise ModelMismatchError(
                f"dense is not the model the pruner started from: parameter {name!r} differs; "
                "pass dense = copy.deepcopy(model) taken before creating the pruner"
            )


def _start(pruner: Any) -> KeptChannels:
    if getattr(pruner, "current_step", 0) > 0:
        raise ValueError(
            "the pruner has already stepped, so the channels it removed are unknown; "
            "attach (or track) before the first pruner.step(). A model pruned earlier can still be "
            "healed with starfish.heal(model, dense, calibration) if its block widths are unchanged"
        )
    record = KeptChannels(pruner.model)
    _RECORDS[pruner.model] = record
    return record


def track(pruner: Any) -> KeptChannels:
    """Record the kept channels of every later ``pruner.step()`` without healing after it.

    ``starfish.attach`` records them for you; use ``track`` to prune now and heal later with
    ``starfish.heal(model, dense, calibration)``. Call it before the first step.

    Example:
        >>> tp_graph.track(pruner)
        >>> pruner.step()
        >>> starfish.heal(pruner.model, dense, images)
    """
    record = _RECORDS.get(pruner.model)
    if record is not None and record.runner_installed:
        return record  # already recording (track or attach): never record a step twice
    record = _start(pruner)
    original = pruner.step

    def step(*args: Any, **kwargs: Any):
        return run_step(pruner, original, *args, **kwargs)

    pruner.step = step
    record.runner_installed = True
    return record


def export_record(model: nn.Module) -> dict[str, Any] | None:
    """The kept-channel record of ``model`` in plain types (for a weights-only file), or ``None``."""
    record = _RECORDS.get(model)
    if record is None or not record.kept:
        return None
    return {
        "kept": {f"{name}|{dim}": list(kept) for (name, dim), kept in record.kept.items()},
        "original": {f"{name}|{dim}": size for (name, dim), size in record.original.items()},
        "inconsistent": sorted(f"{name}|{dim}" for name, dim in record.inconsistent),
        "steps": record.steps,
        "groups": record.groups,
    }


def import_record(model: nn.Module, data: dict[str, Any]) -> None:
    """Give ``model`` (rebuilt from a file) the kept-channel record ``export_record`` wrote."""

    def key(text: str) -> tuple[str, str]:
        name, _, dim = text.rpartition("|")
        return name, dim

    record = KeptChannels(model)
    record.kept = {key(k): [int(c) for c in v] for k, v in data["kept"].items()}
    record.original = {key(k): int(v) for k, v in data["original"].items()}
    record.inconsistent = {key(k) for k in data.get("inconsistent", [])}
    record.steps, record.groups = int(data.get("steps", 0)), int(data.get("groups", 0))
    _RECORDS[model] = record


def run_step(pruner: Any, step: Callable[..., Any], *args: Any, interactive: bool = False, **kwargs: Any):
    """Run one Torch-Pruning step through ``step`` while recording the kept channels."""
    if args:  # step(True): the flag given by position
        interactive, args = bool(args[0]), args[1:]
    record = _RECORDS.get(pruner.model) or _start(pruner)
    groups = step(*args, interactive=True, **kwargs)
    if interactive:
        return _interactive(pruner, record, groups)
    for group in groups or ():
        record.run_group(group, pruner.DG, group.prune)
    _finish_step(pruner, record)
    return None


def _interactive(pruner: Any, record: KeptChannels, groups) -> Iterator[Any]:
    pending, before = {}, {}
    try:
        for group in groups or ():
            pending = record.removals(group, pruner.DG)
            before = record.sizes(pending)
            yield group  # the caller decides whether to group.prune()
            record.apply(pending, before)
            pending = {}
    finally:  # also when the caller breaks out early: commit the last group and finish the step
        if pending:
            record.apply(pending, before)
        _finish_step(pruner, record)


def _finish_step(pruner: Any, record: KeptChannels) -> None:
    record.steps += 1
    sync_attention(pruner.model, pruner)


@hookimpl
def starfish_prepare_pruner(pruner, model, dense):
    if not is_torch_pruning_pruner(pruner):
        return None
    if getattr(pruner, "current_step", 0) == 0:
        _check_dense(model, dense)
    record = _RECORDS.get(model)
    if record is not None and record.runner_installed:
        return lambda step, *args, **kwargs: step(*args, **kwargs)  # track() already records
    _start(pruner).runner_installed = True

    def runner(step, *args, **kwargs):
        return run_step(pruner, step, *args, **kwargs)

    return runner


def _trained_entries(model: nn.Module, names: set[str]) -> list[MaskedTensor]:
    entries = []
    for name, module in model.named_modules():
        if name in names and isinstance(module, TRAINED):
            for tensor_name in ("weight", "bias"):
                param = getattr(module, tensor_name, None)
                if isinstance(param, nn.Parameter):
                    entries.append(
                        MaskedTensor(f"{name}.{tensor_name}", param, torch.ones_like(param, dtype=torch.bool),
                                     "structural", "zero")
                    )
    return entries


def _shrunk_modules(model: nn.Module, dense: nn.Module) -> set[str]:
    dense_modules = dict(dense.named_modules())
    shrunk = set()
    for name, module in model.named_modules():
        other = dense_modules.get(name)
        if other is None or not isinstance(module, TRAINED) or type(other) is not type(module):
            continue
        if getattr(module, "weight", None) is not None and module.weight.shape != other.weight.shape:
            shrunk.add(name)
    return shrunk


@hookimpl(trylast=True)  # masks, when present, are read by the mask adapters first
def starfish_find_masks(model, dense):
    record = _RECORDS.get(model)
    if record is not None:
        names = record.pruned_modules()
        if not names:
            raise MaskNotFoundError(
                f"the Torch-Pruning pruner of this {type(model).__name__} has not pruned anything yet; "
                "call pruner.step() first (check pruning_ratio / iterative_steps / ignored_layers)"
            )
        notes = [f"Torch-Pruning: {record.steps} step(s), {record.groups} group(s) pruned; kept channels recorded"]
        if record.inconsistent:
            notes.append(f"kept-channel records dropped as inconsistent: {sorted(n for n, _ in record.inconsistent)[:5]}")
        return SparsityPlan(_trained_entries(model, names), NAME, structural=True, notes=notes,
                            kept_out_channels=record.kept_out(), original_out_channels=record.original_out(),
                            hint=HINT)
    if dense is None:
        return None
    names = _shrunk_modules(model, dense)
    if not names:
        return None
    notes = ["Torch-Pruning-style structural pruning found by comparing shapes with dense; no kept-channel record"]
    return SparsityPlan(_trained_entries(model, names), NAME, structural=True, notes=notes, hint=HINT)


@hookimpl
def starfish_supported_forms() -> list[str]:
    return [
        "Torch-Pruning: channels / MLP units / heads physically removed (shapes smaller than the dense model's); "
        "attach before pruning to record the kept channels when the residual width is pruned"
    ]


@hookimpl
def starfish_write_back(model, plan):
    if plan.adapter != NAME:
        return None
    return True  # the pruned model is healed in place and already in Torch-Pruning's form
