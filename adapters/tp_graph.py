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

import re
import weakref
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import nn

from starfish_plugin.core.plan import MaskedTensor, SparsityPlan
from starfish_plugin.errors import (
    AttachError,
    CheckpointFileError,
    MaskNotFoundError,
    ModelMismatchError,
    PrunerError,
    StarfishError,
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
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)
TRAINED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

_RECORDS: weakref.WeakKeyDictionary[nn.Module, KeptChannels] = weakref.WeakKeyDictionary()


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
        # modules without channels of their own (pooling, activations, concatenations, whole blocks):
        # name -> how their output channels derive from prunable modules' (see ``trace``)
        self.derived: dict[str, list] = {}
        self.widths: dict[str, int] = {}  # original output width of every prunable module traced
        self.example: tuple[tuple, dict] | None = None  # an input the model ran before pruning

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

    def trace(self, model: nn.Module, args: tuple, kwargs: dict) -> bool:
        """Run ``model`` once on an example input and work out, for every module whose output is
        not a prunable layer's own (pooling, activations, concatenations such as DenseNet's, whole
        blocks), from which prunable layers' output channels its output channels come. Keeps the
        input for ``check_forward``. Returns ``False`` (and records nothing) if the forward fails."""
        derived = _trace_channels(model, args, kwargs, self)
        if derived is None:
            self.derived = {}
            return False
        self.derived = derived
        self.example = (args, kwargs)
        return True

    def check_forward(self, model: nn.Module) -> None:
        """Raise ``PrunerError`` if the pruned model no longer runs the example input it ran before."""
        if self.example is None:
            return
        failure = _failed_forward(model, *self.example)
        if failure is not None:
            raise _broken_model_error(model, *failure)

    def pruned_modules(self) -> set[str]:
        return {name for (name, _), kept in self.kept.items() if len(kept) < self.original[(name, _)]}


def _set_plain(module: nn.Module, name: str, value: int) -> None:
    """``module.<name> = value`` for a plain int attribute (``nn.Module.__setattr__`` is typed for
    tensors and modules only)."""
    setattr(module, name, value)


def sync_attention(model: nn.Module, pruner: Any | None = None) -> None:
    """Update attention bookkeeping after qkv / head / embedding pruning so forward still works."""
    heads = getattr(pruner, "num_heads", None) or {}
    for module in model.modules():
        qkv = getattr(module, "qkv", None)
        if isinstance(qkv, nn.Linear) and hasattr(module, "num_heads") and hasattr(module, "head_dim"):
            num_heads, head_dim = cast(int, module.num_heads), cast(int, module.head_dim)
            if qkv.out_features == 3 * num_heads * head_dim:
                continue  # qkv untouched (e.g. an interactive caller skipped its group)
            num_heads = int(heads.get(qkv, num_heads))
            head_dim = qkv.out_features // (3 * num_heads)
            _set_plain(module, "num_heads", num_heads)
            _set_plain(module, "head_dim", head_dim)
            if hasattr(module, "attn_dim"):
                _set_plain(module, "attn_dim", num_heads * head_dim)
        conv_proj = getattr(module, "conv_proj", None)
        if isinstance(conv_proj, nn.Conv2d) and hasattr(module, "hidden_dim"):
            _set_plain(module, "hidden_dim", conv_proj.out_channels)  # torchvision VisionTransformer
        _sync_split_attention(module, heads)


# Hugging Face attention: separate projections, the head size kept as an attribute, the head count
# found by the forward's ``view(..., -1, head_size)``: pruning head dimensions without updating the
# head size silently merges heads.
_SPLIT_PROJECTIONS = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"))
_HEAD_SIZE_NAMES = ("head_dim", "attention_head_size")


def _head_count(module: nn.Module, proj: nn.Linear, heads: Mapping[nn.Module, int], kv: bool) -> int | None:
    if proj in heads:
        return int(heads[proj])
    config = getattr(module, "config", None)
    names = ("num_key_value_heads", "num_attention_heads") if kv else ("num_attention_heads",)
    for owner in (module, config):
        for name in names:
            value = getattr(owner, name, None) if owner is not None else None
            if isinstance(value, int) and value > 0:
                return value
    return None


def _sync_split_attention(module: nn.Module, heads: Mapping[nn.Module, int]) -> None:
    """Head size, head count and grouped-query ratio of a Hugging Face attention module, from its
    pruned projections and the pruner's head counts. The softmax scale is left as the dense model's:
    healing aligns the pruned attention with the dense one."""
    for q_name, k_name, v_name in _SPLIT_PROJECTIONS:
        q, k = getattr(module, q_name, None), getattr(module, k_name, None)
        v = getattr(module, v_name, None)
        if not (isinstance(q, nn.Linear) and isinstance(k, nn.Linear) and isinstance(v, nn.Linear)):
            continue
        size_name = next((n for n in _HEAD_SIZE_NAMES if isinstance(getattr(module, n, None), int)), None)
        q_heads, kv_heads = _head_count(module, q, heads, kv=False), _head_count(module, k, heads, kv=True)
        if size_name is None or not q_heads or not kv_heads:
            return
        if q.out_features % q_heads or k.out_features % kv_heads:
            return  # uneven: left for the forward check to report
        setattr(module, size_name, q.out_features // q_heads)
        if isinstance(getattr(module, "num_attention_heads", None), int):
            _set_plain(module, "num_attention_heads", q_heads)
        if isinstance(getattr(module, "all_head_size", None), int):
            _set_plain(module, "all_head_size", q.out_features)
        if isinstance(getattr(module, "num_key_value_groups", None), int) and q_heads % kv_heads == 0:
            _set_plain(module, "num_key_value_groups", q_heads // kv_heads)
        return


# --- following channels through layers without channels of their own ------------------------

# autograd nodes whose output channels are their (first traceable) input's: activations,
# element-wise arithmetic (residual adds, SE scaling), dropout, pooling
_PASS_THROUGH = re.compile(
    r"(Relu|Relu6|Hardtanh|Threshold|LeakyRelu|Elu|Gelu|Silu|Mish|Hardswish|Hardsigmoid|Sigmoid|Tanh|Softplus|"
    r"Clamp|ClampMin|ClampMax|Add|Sub|Mul|Div|Neg|Clone|ToCopy|NativeDropout|Dropout|"
    r"MaxPool\dD(WithIndices)?|AvgPool\dD|AdaptiveAvgPool\dD|AdaptiveMaxPool\dD)Backward\d*"
)
_MAX_DEPTH = 200


class _EvalMode:
    """Evaluation mode for a forward, every module's own ``training`` flag restored afterwards."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.flags: list[tuple[nn.Module, bool]] = []

    def __enter__(self) -> None:
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.model.eval()

    def __exit__(self, *_exc: object) -> None:
        for module, flag in self.flags:
            module.training = flag


def _device_of(model: nn.Module) -> torch.device | None:
    tensor: torch.Tensor | None = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return None if tensor is None else tensor.device


def _moved(value: Any, device: torch.device | None, grad: bool = False, copy: bool = False) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.detach().to(device) if device is not None else value.detach()
        if copy:
            value = value.clone()  # not a view that would keep a whole calibration set alive
        if grad and value.is_floating_point():
            value = value.clone().requires_grad_(True)
        return value
    if isinstance(value, Mapping):
        return {k: _moved(v, device, grad, copy) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_moved(v, device, grad, copy) for v in value)
    return value


def _source_dim(module: nn.Module, shape: tuple[int, ...], count: int) -> int | None:
    """The dimension of ``module``'s output that holds its ``count`` channels."""
    dims = [d for d in dict.fromkeys((1, len(shape) - 1)) if shape[d] == count]
    if len(dims) == 2:  # as many channels as the last dimension: the layer type decides
        return len(shape) - 1 if isinstance(module, (nn.Linear, nn.LayerNorm)) else 1
    return dims[0] if dims else None


def _saved_dim(fn: Any) -> int | None:
    dim = getattr(fn, "_saved_dim", None)
    if not isinstance(dim, int):
        return None
    return dim - 2**64 if dim >= 2**63 else dim  # negative dims come back as unsigned


def _cat_expression(found: list[list | None], dim: int | None) -> list | None:
    """The channels of a concatenation of ``found`` along ``dim``: ``["cat", parts, dim, ndim]``
    when it joins channels, the common part when it joins along another dimension, else ``None``."""
    parts = [p for p in found if p is not None]
    if not parts or dim is None or len(parts) != len(found):
        return None
    channel, ndim = parts[0][2], parts[0][3]
    if not all(p[2] == channel and p[3] == ndim for p in parts):
        return None
    if (dim + ndim if dim < 0 else dim) == channel:
        return ["cat", parts, channel, ndim]
    return parts[0] if all(p == parts[0] for p in parts) else None


def _trace_channels(model: nn.Module, args: tuple, kwargs: dict, record: KeptChannels) -> dict[str, list] | None:
    """Module name -> where its output channels come from, as nested lists of plain types:
    ``["src", layer, dim, ndim]`` (a prunable layer's own output channels) or
    ``["cat", [parts...], dim, ndim]`` (a concatenation along the channel dimension).

    One forward with autograd on, in eval mode; from each module's output the autograd graph is
    walked back through activations, element-wise ops and pooling to prunable layers (Conv,
    Linear, norms). A module is kept only if the channels so found match its output's width.
    """
    sources: dict[int, list] = {}
    outputs: list[tuple[str, Any, tuple[int, ...]]] = []
    alive: list[Any] = []  # autograd nodes kept alive so their ids stay unique

    def hook(module: nn.Module, _inputs: Any, output: Any, name: str) -> None:
        if not isinstance(output, torch.Tensor) or output.grad_fn is None or output.dim() < 2:
            return
        fn, shape = output.grad_fn, tuple(output.shape)
        alive.append(fn)
        if isinstance(module, NORMS + TRAINED) and id(fn) not in sources:  # innermost module first
            count = channel_count(module, "out")
            dim = _source_dim(module, shape, count) if count else None
            if count and dim is not None:  # (dim is None unless count is set)
                sources[id(fn)] = ["src", name, dim, len(shape)]
                record.widths[name] = record.original.get((name, "out"), count)
        if name:
            outputs.append((name, fn, shape))

    handles = [m.register_forward_hook(lambda m, a, o, name=n: hook(m, a, o, name)) for n, m in model.named_modules()]
    device = _device_of(model)
    try:
        with torch.enable_grad(), _EvalMode(model):
            model(*_moved(args, device, grad=True), **_moved(kwargs, device, grad=True))
    except Exception:  # noqa: BLE001 - an input the model cannot take: nothing traced, nothing checked
        return None
    finally:
        for handle in handles:
            handle.remove()

    memo: dict[int, list | None] = {}

    def resolve(fn: Any, depth: int) -> list | None:
        if fn is None:
            return None
        key = id(fn)
        if key in sources:
            return sources[key]
        if key in memo:
            return memo[key]
        if depth > _MAX_DEPTH:
            return None
        alive.append(fn)
        result = None
        name = fn.name()
        if name.startswith("CatBackward"):
            result = _cat_expression([resolve(f, depth + 1) for f, _ in fn.next_functions], _saved_dim(fn))
        elif _PASS_THROUGH.fullmatch(name):
            # a residual add's operands share their channels; of a broadcast product (x * scale) the
            # widest operand is the one whose channels go through
            width = -1
            for f, _ in fn.next_functions:
                part = resolve(f, depth + 1)
                value = record.evaluate(part) if part is not None else None
                if value is not None and len(value[0]) > width:
                    result, width = part, len(value[0])
        memo[key] = result
        return result

    derived: dict[str, list] = {}
    for name, fn, shape in outputs:  # forward order: earlier results are reused by later walks
        expr = resolve(fn, 0)
        if expr is None or expr[3] != len(shape):
            continue
        value = record.evaluate(expr)
        if value is not None and len(value[0]) == shape[expr[2]]:
            derived[name] = expr
    return derived


# --- telling the user when Torch-Pruning fails or breaks the model --------------------------

SETUP = (
    "ignored_layers=[...] for layers it must leave alone (a layer listed there keeps its output channels), "
    "num_heads={qkv_or_q_and_kv_linear: heads} for attention, unwrapped_parameters={param: dim} for bare "
    "nn.Parameters, in_channel_groups / out_channel_groups for grouped layers"
)


def _failed_forward(model: nn.Module, args: tuple, kwargs: dict) -> tuple[str, Exception] | None:
    """``None`` if ``model`` runs the input, else (innermost module that was running, the error)."""
    stack: list[str] = []

    def enter(name: str) -> None:
        stack.append(name)

    def leave(name: str) -> None:
        if name in stack:
            del stack[len(stack) - 1 - stack[::-1].index(name)]

    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(lambda _m, _a, name=name: enter(name)))
        handles.append(module.register_forward_hook(lambda _m, _a, _o, name=name: leave(name)))
    device = _device_of(model)
    try:
        with torch.no_grad(), _EvalMode(model):
            model(*_moved(args, device), **_moved(kwargs, device))
        return None
    except Exception as exc:  # noqa: BLE001 - reported to the user with the module that raised it
        return (stack[-1] if stack else ""), exc
    finally:
        for handle in handles:
            handle.remove()


def _broken_model_error(model: nn.Module, where: str, exc: Exception) -> PrunerError:
    module = dict(model.named_modules()).get(where) if where else None
    place = f"in module {where!r} ({type(module).__name__})" if module is not None else "in the model's own forward"
    advice = (
        f"Build the model again from the dense copy and set the pruner up so that it leaves the channels "
        f"{where!r} uses alone: add it to ignored_layers, together with the layers that produce its input "
        "(for a residual stream: the stem or patch embedding and every layer that writes into it, such as "
        "attention proj and MLP fc2)"
        if module is not None
        else "Build the model again from the dense copy and set the pruner up so that it leaves alone the "
        "layers whose channels the forward reshapes"
    )
    heads = getattr(module, "num_heads", None)
    split = next(
        (
            names
            for names in _SPLIT_PROJECTIONS
            if module is not None and all(isinstance(getattr(module, n, None), nn.Linear) for n in names)
        ),
        None,
    )
    if split is not None:
        projections = ", ".join(f"{where}.{n}" for n in split)
        advice += (
            f". {where!r} is an attention module with separate projections ({projections}): give "
            "Torch-Pruning num_heads={<projection>: heads} for each of them so it prunes the same dimensions "
            "in every head (starfish then updates head_dim / attention_head_size)"
        )
        if any("rotary" in name or "rope" in name for name, _ in model.named_modules()):
            advice += (
                "; this model uses rotary position embeddings, whose size is the head size, so the head "
                "size cannot shrink: prune whole heads instead with prune_num_heads=True, "
                "prune_head_dims=False (and head_pruning_ratio)"
            )
    elif isinstance(heads, int) and module is not None:  # (heads is None when module is)
        linears = [f"{where}.{n}" for n, m in module.named_children() if isinstance(m, nn.Linear)]
        advice += (
            f". {where!r} is an attention module (num_heads={heads}): Torch-Pruning needs num_heads="
            f"{{<Linear>: {heads}}} for its projections ({', '.join(linears) or 'its Linear layers'}) to prune "
            "whole heads, and starfish updates the head bookkeeping of timm/torchvision attention with a "
            "fused qkv and of Hugging Face attention; if the forward still fails, add the attention module "
            "to ignored_layers"
        )
    return PrunerError(
        f"Torch-Pruning produced a {type(model).__name__} that cannot run its forward: after pruner.step() "
        f"it fails {place} on a calibration input it ran before the step ({type(exc).__name__}: {exc}). "
        "Torch-Pruning changed the weights of layers whose channels that module still expects in their old "
        "number (a shape or head count kept as a module attribute, or channels it should not have coupled). "
        f"Healing did not run; the model is left as the pruner left it. {advice}. Torch-Pruning's other "
        f"options: {SETUP}."
    )


def _failing_group(exc: BaseException) -> Any:
    """The Torch-Pruning group being ranked or pruned when ``exc`` was raised, if any."""
    try:
        from torch_pruning.dependency import Group
    except ImportError:  # pragma: no cover - only Torch-Pruning pruners get here
        return None
    tb, group = exc.__traceback__, None
    while tb is not None:
        candidate = tb.tb_frame.f_locals.get("group")
        if isinstance(candidate, Group):
            group = candidate  # keep the innermost
        tb = tb.tb_next
    return group


def _listed(names: list[str], shown: int = 4) -> str:
    text = ", ".join(repr(n) for n in names[:shown])
    return text + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _pruner_error(pruner: Any, record: KeptChannels, exc: Exception, shapes: dict[str, torch.Size]) -> PrunerError:
    model = pruner.model
    where, misfits = "", []
    group = _failing_group(exc)
    if group is not None:
        for i, (dep, idxs) in enumerate(group):
            module = dep.target.module
            name = record.names.get(id(module))
            if name is None or not isinstance(module, nn.Module):
                continue
            if i == 0:
                where = f" while handling the group of {name!r}"
            dim = "out" if isinstance(module, NORMS) or pruner.DG.is_out_channel_pruning_fn(dep.handler) else "in"
            count = channel_count(module, dim)
            plain = [int(getattr(j, "idx", j)) for j in idxs]
            if count is not None and plain and max(plain) >= count and name not in misfits:
                misfits.append(name)
    text = (
        f"Torch-Pruning could not prune this {type(model).__name__}: pruner.step() raised "
        f"{type(exc).__name__}: {exc}{where}."
    )
    if misfits:
        rank = {name: i for i, name in enumerate(record.names.values())}
        misfits.sort(key=lambda n: rank.get(n, len(rank)))
        holders = list(dict.fromkeys(n.rpartition(".")[0] for n in misfits if "." in n))
        text += (
            f" Its dependency graph coupled {_listed(misfits)} with layers of more channels than they have: "
            "those layers work along another dimension than the channels (after a transpose or permute, as "
            "MLP-Mixer's token-mixing MLPs do, or a channel shuffle), which Torch-Pruning cannot follow. Add "
            + (f"them, or the modules holding them ({_listed(holders)}), " if holders else "them ")
            + "to ignored_layers."
        )
    changed = any(shapes.get(n) != p.shape for n, p in model.named_parameters())
    text += (
        " The model is partly pruned: build it again from the dense copy, and a new pruner."
        if changed
        else " The model was not changed, but the pruner counted the step: build a new pruner."
    )
    return PrunerError(f"{text} Set the pruner up with {SETUP}.")


class _Diagnosed:
    """Turns an error Torch-Pruning raises into a ``PrunerError`` that says how to set it up."""

    def __init__(self, pruner: Any, record: KeptChannels) -> None:
        self.pruner, self.record = pruner, record
        self.shapes = {n: p.shape for n, p in pruner.model.named_parameters()}

    def __enter__(self) -> _Diagnosed:
        return self

    def __exit__(self, kind: Any, exc: BaseException | None, _tb: Any) -> Literal[False]:
        if isinstance(exc, Exception) and not isinstance(exc, StarfishError):
            raise _pruner_error(self.pruner, self.record, exc, self.shapes) from exc
        return False

    def groups(self, groups: Any) -> Iterator[Any]:
        """Torch-Pruning's groups, its errors diagnosed."""
        iterator = iter(groups or ())
        while True:
            with self:
                try:
                    group = next(iterator)
                except StopIteration:
                    return
            yield group


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
        raise AttachError(
            "the pruner has already stepped, so the channels it removed are unknown; "
            "attach (or track) before the first pruner.step(). A model pruned earlier can still be "
            "healed with starfish.heal(model, dense, calibration) if its block widths are unchanged"
        )
    record = KeptChannels(pruner.model)
    _RECORDS[pruner.model] = record
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
    return record.trace(model, _moved(args, None, copy=True), _moved(kwargs, None, copy=True))


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
    guard = _Diagnosed(pruner, record)
    with guard:
        groups = step(*args, interactive=True, **kwargs)
    if interactive:
        return _interactive(pruner, record, guard, groups)
    for group in guard.groups(groups):
        with guard:
            record.run_group(group, pruner.DG, group.prune)
    _finish_step(pruner, record)
    record.check_forward(pruner.model)
    return None


def _interactive(pruner: Any, record: KeptChannels, guard: _Diagnosed, groups) -> Iterator[Any]:
    pending, before = {}, {}
    failed = False
    try:
        for group in guard.groups(groups):
            pending = record.removals(group, pruner.DG)
            before = record.sizes(pending)
            yield group  # the caller decides whether to group.prune()
            record.apply(pending, before)
            pending = {}
    except GeneratorExit:
        raise
    except BaseException:
        failed = True
        raise
    finally:  # also when the caller breaks out early: commit the last group and finish the step
        if pending:
            record.apply(pending, before)
        _finish_step(pruner, record)
        if not failed:
            record.check_forward(pruner.model)


def _finish_step(pruner: Any, record: KeptChannels) -> None:
    record.steps += 1
    sync_attention(pruner.model, pruner)


@hookimpl
def starfish_prepare_pruner(pruner: Any, model: nn.Module, dense: nn.Module, example: Any) -> Callable[..., Any] | None:
    if not is_torch_pruning_pruner(pruner):
        return None
    if getattr(pruner, "current_step", 0) == 0:
        _check_dense(model, dense)
    record = _RECORDS.get(model)
    if record is not None and record.runner_installed:
        runner: Callable[..., Any] = lambda step, *args, **kwargs: step(*args, **kwargs)  # noqa: E731 - track() records
    else:
        record = _start(pruner)
        record.runner_installed = True

        def runner(step: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            return run_step(pruner, step, *args, **kwargs)

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
        if name in names and isinstance(module, TRAINED):
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
                "customized_pruners=..., and check pruning_ratio / ignored_layers"
            )
        notes = [f"Torch-Pruning: {record.steps} step(s), {record.groups} group(s) pruned; kept channels recorded"]
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
