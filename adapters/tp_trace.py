"""Following the kept channels through a pruned model's forward: pooling, activations, residual
adds and concatenations, so blocks without channels of their own can be aligned."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from starfish_plugin.adapters.tp_kept import NORMS, KeptChannels, channel_count, is_trained

_PASS_THROUGH = re.compile(
    r"(Relu|Relu6|Hardtanh|Threshold|LeakyRelu|Elu|Gelu|Silu|Mish|Hardswish|Hardsigmoid|Sigmoid|Tanh|Softplus|"
    r"Clamp|ClampMin|ClampMax|Add|Sub|Mul|Div|Neg|Clone|ToCopy|NativeDropout|Dropout|"
    r"MaxPool\dD(WithIndices)?|AvgPool\dD|AdaptiveAvgPool\dD|AdaptiveMaxPool\dD)Backward\d*"
)
_MAX_DEPTH = 200


class EvalMode:
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


def device_of(model: nn.Module) -> torch.device | None:
    tensor: torch.Tensor | None = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return None if tensor is None else tensor.device


def moved(value: Any, device: torch.device | None, grad: bool = False, copy: bool = False) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.detach().to(device) if device is not None else value.detach()
        if copy:
            value = value.clone()  # not a view that would keep a whole calibration set alive
        if grad and value.is_floating_point():
            value = value.clone().requires_grad_(True)
        return value
    if isinstance(value, Mapping):
        return {k: moved(v, device, grad, copy) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(moved(v, device, grad, copy) for v in value)
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


def trace_channels(model: nn.Module, args: tuple, kwargs: dict, record: KeptChannels) -> dict[str, list] | None:
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
        if (isinstance(module, NORMS) or is_trained(module)) and id(fn) not in sources:  # innermost module first
            count = channel_count(module, "out")
            dim = _source_dim(module, shape, count) if count else None
            if count and dim is not None:  # (dim is None unless count is set)
                sources[id(fn)] = ["src", name, dim, len(shape)]
                record.widths[name] = record.original.get((name, "out"), count)
        if name:
            outputs.append((name, fn, shape))

    handles = [m.register_forward_hook(lambda m, a, o, name=n: hook(m, a, o, name)) for n, m in model.named_modules()]
    device = device_of(model)
    try:
        with torch.enable_grad(), EvalMode(model):
            model(*moved(args, device, grad=True), **moved(kwargs, device, grad=True))
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
