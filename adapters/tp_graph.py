"""Adapter for Torch-Pruning: structures physically removed through a dependency graph.

Torch-Pruning leaves no mask: pruned channels, MLP units and heads are gone. This adapter

* records, for every pruned module, which *original* output/input channels survive (through
  ``starfish.attach`` or ``track``), so that dense targets can be indexed by the kept channels
  when the residual stream (embedding width, a CNN stage's channels) was pruned;
* keeps timm ``Attention`` (``num_heads``, ``head_dim``, ``attn_dim``), torchvision
  ``VisionTransformer`` (``hidden_dim``) and Hugging Face attention (``head_dim`` /
  ``attention_head_size``, ``num_key_value_groups``) attributes in step with the pruned shapes;
* tells ``heal`` what to train: the surviving weights and biases of the pruned Linear/Conv
  layers (``HealConfig(trainable="all")`` trains every parameter);
* given an example input (``attach`` takes one from the calibration data, ``track`` takes
  ``example_inputs``), follows the kept channels through pooling, activations, residual adds and
  concatenations to the output of every module, so blocks without channels of their own (a
  MaxPool in a plain ``Sequential``, a DenseNet dense block) can be aligned;
* turns a Torch-Pruning failure, or a pruned model that no longer runs the example input, into a
  ``PrunerError`` that says how to set the pruner up, before anything is healed.

A model pruned without a record can still be healed when the block outputs keep their width
(only MLP units or heads pruned).
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from starfish_plugin.adapters.tp_attention import (
    complete_num_heads,
    sync_attention,  # noqa: F401 - public: tp_graph.sync_attention
)
from starfish_plugin.adapters.tp_errors import Diagnosed, broken_model_error, check_dense, failed_forward
from starfish_plugin.adapters.tp_kept import KeptChannels, is_trained
from starfish_plugin.adapters.tp_repair import Snapshot, input_width, repair_pruned, repeated_channels, snapshot
from starfish_plugin.adapters.tp_trace import moved, trace_channels
from starfish_plugin.core.plan import MaskedTensor, SparsityPlan
from starfish_plugin.errors import (
    AttachError,
    CheckpointFileError,
    MaskNotFoundError,
    StructuredCheckpointError,
)
from starfish_plugin.plugins.hookspecs import hookimpl

NAME = "torch_pruning"
HINT = (
    "With Torch-Pruning, call starfish.attach(pruner, dense, calibration) (or "
    "starfish_plugin.adapters.tp_graph.track(pruner, example_inputs)) before the first pruner.step(): the kept "
    "channels are recorded and attention modules updated (tp_graph.sync_attention(model, pruner)). "
    "The record belongs to that model object: a copy has none, nor has a model reloaded from any "
    "file but starfish's structured one, so heal the tracked model itself or save it in that form. "
    "For the command line, in the script that prunes: `tp_graph.track(pruner, example_inputs)` before the "
    "first step, then `torch.save(structured_state(model), 'pruned.pt')` (from starfish_plugin.adapters import "
    "tp_graph; from starfish_plugin.io.structured import structured_state), and "
    "`starfish heal --pruned pruned.pt ...` (no --unsafe-pickle needed)"
)

_RECORDS: weakref.WeakKeyDictionary[nn.Module, KeptChannels] = weakref.WeakKeyDictionary()


def is_torch_pruning_pruner(pruner: object) -> bool:
    """A Torch-Pruning ``BasePruner`` (or subclass, user-defined ones included)."""
    try:
        import torch_pruning
    except ImportError:
        return False
    return isinstance(pruner, torch_pruning.pruner.BasePruner)




def trace_record(record: KeptChannels, model: nn.Module, args: tuple, kwargs: dict) -> bool:
    """Run ``model`` once on an example input and work out, for every module whose output is
    not a prunable layer's own (pooling, activations, concatenations such as DenseNet's, whole
    blocks), from which prunable layers' output channels its output channels come. Keeps the
    input for ``check_forward``. Returns ``False`` (and records nothing) if the forward fails."""
    derived = trace_channels(model, args, kwargs, record)
    if derived is None:
        record.derived = {}
        return False
    record.derived = derived
    record.example = (args, kwargs)
    return True


def check_forward(record: KeptChannels, model: nn.Module) -> None:
    """Raise ``PrunerError`` if the pruned model no longer runs the example input it ran before
    (after repairing what ``tp_repair.repeated_channels`` can, on the first step of an attached
    pruner, whose dense model holds the weights it started from)."""
    if record.example is None:
        return
    dense = record.dense() if record.dense is not None and record.steps == 1 else None
    for _ in range(64):  # one repeated-channel repair per failing module
        failure = failed_forward(model, *record.example)
        if failure is None:
            return
        width = input_width(model, failure[0], record.example) if dense is not None else None
        fixes = repeated_channels(model, dense, record, failure[0], width) if width is not None else []
        if not fixes:
            raise broken_model_error(model, *failure, misfits=record.misfits)
        record.fixes += fixes

def _start(pruner: Any) -> KeptChannels:
    if getattr(pruner, "current_step", 0) > 0:
        raise AttachError(
            "the pruner has already stepped, so the channels it removed are unknown; "
            "attach (or track) before the first pruner.step(). A model pruned earlier can still be "
            "healed with starfish.heal(model, dense, calibration) if its block widths are unchanged"
        )
    record = KeptChannels(pruner.model)
    _RECORDS[pruner.model] = record
    added = complete_num_heads(pruner)
    if added:
        record.notes.append(f"num_heads given to Torch-Pruning for {len(added)} attention projection(s) it was not "
                            f"told about, so that it prunes every head alike: {', '.join(added[:6])}"
                            + (" ..." if len(added) > 6 else ""))
    return record


def track(pruner: Any, example_inputs: Any = None) -> KeptChannels:
    """Record the kept channels of every later ``pruner.step()`` without healing after it.

    ``starfish.attach`` records them for you; use ``track`` to prune now and heal later with
    ``starfish.heal(model, dense, calibration)``. Call it before the first step.

    Args:
        pruner: a Torch-Pruning pruner that has not stepped yet.
        example_inputs: an input the model takes (as for Torch-Pruning: a Tensor, a tuple of
            positional inputs or a dict of keyword inputs). With it, the kept channels are also
            followed through concatenations (DenseNet), pooling and activations to the output of
            every module, and each step checks that the pruned model still runs it.

    Example:
        >>> tp_graph.track(pruner, images[:1])
        >>> pruner.step()
        >>> starfish.heal(pruner.model, dense, images)
    """
    record = _RECORDS.get(pruner.model)
    if record is not None and record.runner_installed:
        if example_inputs is not None and record.example is None:
            use_example(pruner.model, example_inputs)
        return record  # already recording (track or attach): never record a step twice
    record = _start(pruner)
    if example_inputs is not None:
        use_example(pruner.model, example_inputs)
    original = pruner.step

    def step(*args: Any, **kwargs: Any):
        return run_step(pruner, original, *args, **kwargs)

    pruner.step = step
    record.runner_installed = True
    return record


def use_example(model: nn.Module, example_inputs: Any) -> bool:
    """Trace the tracked ``model`` on ``example_inputs`` (see ``track``); ``False`` if it cannot run them.

    The input is kept (detached) to check after every step that the pruned model still runs.
    """
    record = _RECORDS.get(model)
    if record is None:
        raise AttachError("use_example needs a tracked model: call tp_graph.track(pruner) or starfish.attach first")
    args: tuple[Any, ...]
    if isinstance(example_inputs, Mapping):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    else:
        args, kwargs = (example_inputs,), {}
    return trace_record(record, model, moved(args, None, copy=True), moved(kwargs, None, copy=True))


def export_record(model: nn.Module) -> dict[str, Any] | None:
    """The kept-channel record of ``model`` in plain types (for a weights-only file), or ``None``."""
    record = _RECORDS.get(model)
    if record is None or not record.kept:
        return None
    return {
        "kept": {f"{name}|{dim}": list(kept) for (name, dim), kept in record.kept.items()},
        "original": {f"{name}|{dim}": size for (name, dim), size in record.original.items()},
        "inconsistent": sorted(f"{name}|{dim}" for name, dim in record.inconsistent),
        "derived": dict(record.derived),
        "widths": dict(record.widths),
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
    record.derived = {str(k): _plain_expr(v) for k, v in (data.get("derived") or {}).items()}
    record.widths = {str(k): int(v) for k, v in (data.get("widths") or {}).items()}
    record.steps, record.groups = int(data.get("steps", 0)), int(data.get("groups", 0))
    _RECORDS[model] = record


def _plain_expr(expr: Any) -> list:
    """A traced channel expression read back from a file, checked."""
    if not isinstance(expr, (list, tuple)) or len(expr) != 4 or expr[0] not in ("src", "cat"):
        raise ValueError(f"malformed channel expression {expr!r}")
    head = str(expr[1]) if expr[0] == "src" else [_plain_expr(e) for e in expr[1]]
    return [expr[0], head, int(expr[2]), int(expr[3])]


def run_step(pruner: Any, step: Callable[..., Any], *args: Any, interactive: bool = False, **kwargs: Any):
    """Run one Torch-Pruning step through ``step`` while recording the kept channels.

    Raises:
        PrunerError: Torch-Pruning raised while ranking or pruning (the message says how to set the
            pruner up), or the pruned model no longer runs the example input it ran before the step.
    """
    if args:  # step(True): the flag given by position
        interactive, args = bool(args[0]), args[1:]
    record = _RECORDS.get(pruner.model) or _start(pruner)
    before = snapshot(pruner.model)
    guard = Diagnosed(pruner, record)
    with guard:
        groups = step(*args, interactive=True, **kwargs)
    if interactive:
        return _interactive(pruner, record, guard, groups, before)
    for group in guard.groups(groups):
        with guard:
            record.run_group(group, pruner.DG, group.prune)
    _finish_step(pruner, record, before)
    check_forward(record, pruner.model)
    return None


def _interactive(pruner: Any, record: KeptChannels, guard: Diagnosed, groups, before: Snapshot) -> Iterator[Any]:
    pending, sizes = {}, {}
    failed = False
    try:
        for group in guard.groups(groups):
            pending = record.removals(group, pruner.DG)
            sizes = record.sizes(pending)
            yield group  # the caller decides whether to group.prune()
            record.apply(pending, sizes)
            pending = {}
    except GeneratorExit:
        raise
    except BaseException:
        failed = True
        raise
    finally:  # also when the caller breaks out early: commit the last group and finish the step
        if pending:
            record.apply(pending, sizes)
        _finish_step(pruner, record, before)
        if not failed:
            check_forward(record, pruner.model)


def _finish_step(pruner: Any, record: KeptChannels, before: Snapshot) -> None:
    """Count the step, repair the pruned model by rule, then (attached) let the user's
    ``starfish_repair_pruned`` hooks fix their own modules."""
    record.steps += 1
    fixes, record.misfits = repair_pruned(pruner.model, pruner, before)
    record.fixes += fixes
    user_repair = record.user_repair() if record.user_repair is not None else None
    if user_repair is not None:
        user_repair(record.steps)


@hookimpl
def starfish_prepare_pruner(pruner: Any, model: nn.Module, dense: nn.Module, example: Any,
                            repair: Callable[[int], None] | None = None) -> Callable[..., Any] | None:
    if not is_torch_pruning_pruner(pruner):
        return None
    if getattr(pruner, "current_step", 0) == 0:
        check_dense(model, dense)
    record = _RECORDS.get(model)
    if record is not None and record.runner_installed:
        runner: Callable[..., Any] = lambda step, *args, **kwargs: step(*args, **kwargs)  # noqa: E731 - track() records
    else:
        record = _start(pruner)
        record.runner_installed = True

        def runner(step: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            return run_step(pruner, step, *args, **kwargs)

    if getattr(pruner, "current_step", 0) == 0:  # checked equal above: the weights the pruner starts from
        record.dense = weakref.ref(dense)
    # held weakly: the record lives as long as the model, and must not keep the attachment alive
    record.user_repair = weakref.WeakMethod(repair) if inspect.ismethod(repair) else (lambda: repair)
    if record.example is None and example is not None:
        # kept channels at every module's output (concatenations, pooling), and a model the pruner
        # breaks reported as such after the step
        use_example(model, example)
    return runner


# --- files: Torch-Pruning's own format, and the kept-channel record in structured files ---------

FILE_FORMAT = "torch-pruning"


@hookimpl
def starfish_file_formats() -> list[str]:
    return [FILE_FORMAT]


@hookimpl
def starfish_detect_format(obj: Any) -> str | None:
    if isinstance(obj, dict) and "full_state_dict" in obj and "attributions" in obj:
        return FILE_FORMAT
    return None


@hookimpl
def starfish_load_pruned(model: nn.Module, obj: Any, fmt: str, source: str) -> nn.Module | None:
    if fmt != FILE_FORMAT:
        return None
    import torch_pruning as tp

    try:
        tp.load_state_dict(model, state_dict=obj)
    except Exception as exc:  # noqa: BLE001 - any failure means the file does not fit this model
        raise CheckpointFileError(f"{source} is not a Torch-Pruning state dict for this model ({exc})") from exc
    return model


@hookimpl
def starfish_save_pruned(model: nn.Module, fmt: str, path: Path) -> bool | None:
    if fmt != FILE_FORMAT:
        return None
    import torch_pruning as tp

    torch.save(tp.state_dict(model), path)
    return True


@hookimpl
def starfish_export_state(model: nn.Module) -> dict[str, Any]:
    return {"kept_channels": export_record(model)}


@hookimpl
def starfish_import_state(model: nn.Module, state: dict[str, Any], source: str) -> None:
    data = state.get("kept_channels")
    if not data:
        return
    try:
        if not isinstance(data, dict):
            raise TypeError(f"a {type(data).__name__}, not a dict")
        import_record(model, data)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise StructuredCheckpointError(f"the kept-channel record in {source} is malformed ({exc!r})") from exc


def _trained_entries(model: nn.Module, names: set[str]) -> list[MaskedTensor]:
    entries = []
    for name, module in model.named_modules():
        if name in names and is_trained(module):
            for tensor_name in ("weight", "bias"):
                param = getattr(module, tensor_name, None)
                if isinstance(param, nn.Parameter):
                    entries.append(
                        MaskedTensor(
                            f"{name}.{tensor_name}",
                            param,
                            torch.ones_like(param, dtype=torch.bool),
                            "structural",
                            "zero",
                        )
                    )
    return entries


def _shrunk_modules(model: nn.Module, dense: nn.Module) -> set[str]:
    dense_modules = dict(dense.named_modules())
    shrunk = set()
    for name, module in model.named_modules():
        other = dense_modules.get(name)
        if other is None or not is_trained(module) or type(other) is not type(module):
            continue
        if getattr(module, "weight", None) is not None and module.weight.shape != other.weight.shape:
            shrunk.add(name)
    return shrunk


@hookimpl(trylast=True)  # masks, when present, are read by the mask adapters first
def starfish_find_masks(model, dense):
    record = _RECORDS.get(model)
    if record is not None:
        names = record.pruned_modules()
        if not names and record.steps == 0:
            raise MaskNotFoundError(
                f"the Torch-Pruning pruner of this {type(model).__name__} has not pruned anything yet; "
                "call pruner.step() first (check pruning_ratio / iterative_steps / ignored_layers)"
            )
        if not names:
            raise MaskNotFoundError(
                f"Torch-Pruning ran {record.steps} step(s) on this {type(model).__name__} but removed no channel. "
                "In an interactive step, call group.prune() on the groups to apply. Otherwise no layer it can "
                "prune was left to it: it prunes nn.Linear / nn.Conv / norm layers; layers of "
                "other classes (e.g. Hugging Face's Conv1D in GPT-2) need a custom pruner registered with "
                "customized_pruners=... (for GPT-2's MLPs: starfish_plugin.adapters.tp_build.mlp_width_pruner), "
                "and check pruning_ratio / ignored_layers"
            )
        notes = [f"Torch-Pruning: {record.steps} step(s), {record.groups} group(s) pruned; kept channels recorded"]
        notes += record.notes
        if record.fixes:
            shown = "; ".join(str(f) for f in record.fixes[:6])
            more = f" and {len(record.fixes) - 6} more" if len(record.fixes) > 6 else ""
            notes.append(f"repaired after Torch-Pruning ({len(record.fixes)} attribute(s)): {shown}{more}")
        if record.inconsistent:
            notes.append(
                f"kept-channel records dropped as inconsistent: {sorted(n for n, _ in record.inconsistent)[:5]}"
            )
        return SparsityPlan(
            _trained_entries(model, names),
            NAME,
            structural=True,
            notes=notes,
            kept_out_channels=record.kept_out(),
            original_out_channels=record.original_out(),
            hint=HINT,
        )
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
