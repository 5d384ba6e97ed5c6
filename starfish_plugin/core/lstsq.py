"""Closed-form recovery: each pruned layer's surviving weights solved by masked ridge regression.

For every pruned ``Linear`` / ``Conv1d`` / ``Conv2d`` weight (grouped and depthwise convolutions
included) and every output row ``r`` with surviving inputs ``S``, the new row is

    w_S = argmin || X_p w_S - X_d w_dense_r ||^2 + lambda ||w_S||^2

where ``X_p`` are the layer's inputs in the *pruned* model and ``X_d`` the same layer's inputs in
the dense model, on the same calibration samples: the layer learns to give the dense layer's
output from the inputs it really receives, correcting the error of the layers before it. Layers
are solved block by block in execution order (later blocks see the already-solved earlier
ones), from sums that never hold more than one block's inputs: ``X_p^T X_p`` and ``X_p^T X_d``
(float64), so memory does not grow with the calibration set. Rows up to ``DIRECT_MAX_WIDTH``
inputs wide are solved exactly (batched Cholesky, in batches that fit ``memory_budget``); wider
ones by Jacobi-preconditioned conjugate gradients, all rows of a layer at once, started from the
pruned weights. This is the family of CORP, SNOWS and SparseGPT's update; the
mask is untouched (zeros stay zero) and masked entries a toolkit keeps are left as they were.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypedDict

import torch
import torch.nn.functional as F
from torch import nn

from starfish_plugin.base.model_io import Inputs, attention_mask, call_model
from starfish_plugin.core.plan import MaskedTensor, SparsityPlan
from starfish_plugin.core.warm_start import eligible_layer, tied_weights

DEFAULT_RIDGE = 1e-2  # lambda = ridge * mean(diag(X_p^T X_p)), SparseGPT's dampening scale
DEFAULT_MEMORY = 1024**3
DIRECT_MAX_WIDTH = 512  # wider rows are solved by conjugate gradients (one matrix product per iteration)
CG_ITERATIONS = 100
CG_TOLERANCE = 1e-6  # relative residual at which every row of a batch has converged


class LstsqResult(TypedDict):
    """What ``lstsq_recover_`` returns (a plain dict)."""

    solved: list[str]
    skipped: list[str]
    passes: int
    rows: int


class _Stop(Exception):
    """Raised from a hook to end a forward once the layers of interest have run."""


@dataclass(eq=False)
class _Layer:
    """One pruned layer: its plan entry, both modules, and its sums over the calibration inputs."""

    entry: MaskedTensor
    dense: nn.Module  # an nn.Linear, nn.Conv1d, nn.Conv2d or Hugging Face Conv1D
    pruned: nn.Module
    groups: int
    width: int  # inputs per output row (in_features, or in_channels / groups * kernel size)
    gram: torch.Tensor | None = None  # [groups, width, width]: X_p^T X_p
    cross: torch.Tensor | None = None  # [groups, width, width]: X_p^T X_d
    total: torch.Tensor | None = None  # [groups, width]: X_p^T 1 (for a bias that differs)
    dense_inputs: list[torch.Tensor] = field(default_factory=list)
    calls: int = 0
    transposed: bool = False  # Hugging Face's Conv1D keeps its weight as [in, out]

    def rows_of(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (the weight's shape) as one row per output: a view."""
        return tensor.T if self.transposed else tensor.reshape(tensor.shape[0], -1)

    @property
    def bytes(self) -> int:
        return 2 * self.groups * self.width * self.width * 8


def _columns(module: nn.Module, x: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
    """The layer's input as rows of what each output row multiplies: ``[groups, M, width]``."""
    if not isinstance(module, nn.Conv1d | nn.Conv2d):  # a Linear, or Hugging Face's Conv1D (x @ W)
        if tokens is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(tokens.shape):
            x = x[tokens.bool()]  # real tokens only
        return x.reshape(1, -1, x.shape[-1])
    conv = module
    assert isinstance(conv, (nn.Conv1d, nn.Conv2d))
    kernel, dilation, stride = tuple(conv.kernel_size), tuple(conv.dilation), tuple(conv.stride)
    padding = tuple(int(p) for p in conv.padding)  # string paddings ("same") are never eligible
    if isinstance(conv, nn.Conv1d):
        x = x.unsqueeze(2)
        kernel, dilation, padding, stride = (1, *kernel), (1, *dilation), (0, *padding), (1, *stride)
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # [N, C*k, L]
    n, _, length = cols.shape
    cols = cols.reshape(n, conv.groups, -1, length).permute(1, 0, 3, 2)  # [groups, N, L, width]
    return cols.reshape(conv.groups, n * length, -1)


def _eligible_layers(plan: SparsityPlan, dense: nn.Module, pruned: nn.Module) -> tuple[list[_Layer], list[str]]:
    dense_modules, tied = dict(dense.named_modules()), tied_weights(dense)
    layers, skipped = [], []
    for entry in plan:
        transposed = _is_conv1d_of(entry, dense_modules, tied)
        module = dense_modules[entry.name[: -len(".weight")]] if transposed else _solvable_layer(
            entry, dense_modules, tied)
        if not transposed and (not isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d)
                               or isinstance(getattr(module, "padding", 0), str)):
            skipped.append(entry.name)  # not a layer (or a Conv3d, or a string padding such as "same")
            continue
        assert module is not None
        owner = pruned.get_submodule(entry.name[: -len(".weight")])
        groups = getattr(module, "groups", 1)
        width = entry.parameter.shape[0] if transposed else entry.parameter[0].numel()
        layers.append(_Layer(entry, module, owner, groups, width, transposed=transposed))
    return layers, skipped


def _solvable_layer(entry: MaskedTensor, dense_modules: dict[str, nn.Module], tied: set[int]) -> nn.Module | None:
    """The dense layer of a pruned ``weight`` with the same outputs: the same shape, or (structured
    pruning, e.g. an MLP's output projection after Torch-Pruning removed hidden units) fewer input
    channels, whose solution maps the pruned layer's own inputs onto the dense layer's outputs."""
    same_shape = eligible_layer(entry, dense_modules, tied)
    if same_shape is not None or not entry.name.endswith(".weight"):
        return same_shape
    module = dense_modules.get(entry.name[: -len(".weight")])
    if not isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d) or id(module.weight) in tied:
        return None
    dense_shape, pruned_shape = tuple(module.weight.shape), tuple(entry.parameter.shape)
    same_outputs = dense_shape[0] == pruned_shape[0] and dense_shape[2:] == pruned_shape[2:]
    if not same_outputs or getattr(module, "groups", 1) != 1 or getattr(module, "padding_mode", "zeros") != "zeros":
        return None  # fewer outputs need kept indices; grouped convolutions with removed channels are left alone
    return module


def _is_conv1d_of(entry: MaskedTensor, dense_modules: dict[str, nn.Module], tied: set[int]) -> bool:
    """Whether ``entry`` is the weight of a Hugging Face ``Conv1D`` (GPT-2's linear layer, ``x @ W``)."""
    module = dense_modules.get(entry.name[: -len(".weight")]) if entry.name.endswith(".weight") else None
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(weight, torch.Tensor)
            and weight.shape == entry.parameter.shape and id(weight) not in tied)


def _execution_order(layers: list[_Layer], pruned: nn.Module, x: Inputs) -> list[_Layer]:
    """``layers`` in the order the pruned model first calls them (layers never called are left out)."""
    order: list[_Layer] = []
    seen: set[int] = set()

    def note(layer: _Layer) -> None:
        if id(layer) not in seen:
            seen.add(id(layer))
            order.append(layer)

    handles = [layer.pruned.register_forward_pre_hook(lambda _m, _a, layer=layer: note(layer)) for layer in layers]
    try:
        with torch.no_grad():
            call_model(pruned, x)
    finally:
        for h in handles:
            h.remove()
    return order


def _group(layers: list[_Layer], blocks: Sequence[str], memory_budget: int) -> list[list[_Layer]]:
    """Consecutive layers of one block per group (layers outside every block join the group they
    run in), split further where a group's sums would exceed ``memory_budget``."""
    def block_of(layer: _Layer) -> str | None:
        name = layer.entry.name
        return max((b for b in blocks if name.startswith(b + ".")), key=len, default=None)

    groups: list[list[_Layer]] = []
    current_block: str | None = None
    for layer in layers:
        block = block_of(layer)
        size = sum(m.bytes for m in groups[-1]) if groups else 0
        new_block = block is not None and block != current_block
        if not groups or (new_block and current_block is not None) or size + layer.bytes > memory_budget:
            groups.append([])
        if block is not None:
            current_block = block
        groups[-1].append(layer)
    return [g for g in groups if g]


def _accumulate(layer: _Layer, x_p: torch.Tensor, x_d: torch.Tensor, tokens: torch.Tensor | None) -> None:
    p = _columns(layer.pruned, x_p, tokens).double()
    d = _columns(layer.dense, x_d, tokens).double()
    gram, cross, total = p.transpose(1, 2) @ p, p.transpose(1, 2) @ d, p.sum(1)
    if layer.gram is None:
        layer.gram, layer.cross, layer.total = gram, cross, total
    else:
        assert layer.cross is not None and layer.total is not None
        layer.gram += gram
        layer.cross += cross
        layer.total += total


def _run_pass(group: list[_Layer], dense: nn.Module, pruned: nn.Module, batches: Sequence[Inputs]) -> None:
    """Accumulate every layer's sums of ``group`` over ``batches`` (both forwards stop after the
    group's last layer)."""
    last = group[-1]
    tokens: list[torch.Tensor | None] = [None]

    def dense_hook(layer: _Layer, args: tuple) -> None:
        layer.dense_inputs.append(args[0].detach())

    def pruned_hook(layer: _Layer, args: tuple) -> None:
        if layer.calls < len(layer.dense_inputs):  # paired with the same call in the dense model
            _accumulate(layer, args[0].detach(), layer.dense_inputs[layer.calls], tokens[0])
        layer.calls += 1

    def stop(*_args) -> None:
        raise _Stop

    handles = []
    try:
        for layer in group:
            handles.append(layer.dense.register_forward_pre_hook(lambda _m, a, layer=layer: dense_hook(layer, a)))
            handles.append(layer.pruned.register_forward_pre_hook(lambda _m, a, layer=layer: pruned_hook(layer, a)))
        handles += [last.dense.register_forward_hook(stop), last.pruned.register_forward_hook(stop)]
        for x in batches:
            tokens[0] = attention_mask(x)
            for layer in group:
                layer.dense_inputs, layer.calls = [], 0
            for model in (dense, pruned):
                try:
                    call_model(model, x)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
        for layer in group:
            layer.dense_inputs = []


def _direct(
    gram: torch.Tensor, lam: torch.Tensor, m: torch.Tensor, b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve each row's system exactly: ``(M G M + lam M + (1 - M)) w = b`` (batched Cholesky);
    returns the solutions and which rows succeeded."""
    a = gram * (m.unsqueeze(2) * m.unsqueeze(1))
    a = a + torch.diag_embed(lam.unsqueeze(1) * m + (1 - m))
    factor, info = torch.linalg.cholesky_ex(a)
    good = info == 0
    w = torch.zeros_like(b)
    if bool(good.any()):
        w[good] = torch.cholesky_solve(b[good].unsqueeze(2), factor[good]).squeeze(2)
    return w, good


def _conjugate_gradients(
    gram: torch.Tensor, lam: torch.Tensor, m: torch.Tensor, b: torch.Tensor, x0: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same systems for rows that share one ``gram`` (one group), by Jacobi-preconditioned
    conjugate gradients: one ``[rows, width] @ [width, width]`` product per iteration."""
    lam_ = lam.unsqueeze(1)

    def apply(v: torch.Tensor) -> torch.Tensor:
        return ((v * m) @ gram) * m + lam_ * v * m + v * (1 - m)

    precond = gram.diagonal() * m + lam_ * m + (1 - m)
    x = x0 * m
    r = b - apply(x)
    z = r / precond
    p = z.clone()
    rz = (r * z).sum(1)
    b_norm = b.norm(dim=1).clamp_min(1e-30)
    for _ in range(CG_ITERATIONS):
        if bool((r.norm(dim=1) / b_norm <= CG_TOLERANCE).all()):
            break
        ap = apply(p)
        alpha = rz / (p * ap).sum(1).clamp_min(1e-300)
        x = x + alpha.unsqueeze(1) * p
        r = r - alpha.unsqueeze(1) * ap
        z = r / precond
        rz_new = (r * z).sum(1)
        p = z + (rz_new / rz.clamp_min(1e-300)).unsqueeze(1) * p
        rz = rz_new
    return x, torch.isfinite(x).all(1)


def _solve(layer: _Layer, ridge: float, memory_budget: int) -> int:
    """Write the ridge solution into the surviving entries of ``layer``; returns rows solved."""
    entry, gram, cross, total = layer.entry, layer.gram, layer.cross, layer.total
    assert gram is not None and cross is not None and total is not None
    param = layer.rows_of(entry.parameter)  # a view: [out, width]
    rows = param.shape[0]
    per_group = rows // layer.groups
    mask = layer.rows_of(entry.mask)
    dense_weight = layer.dense.weight
    assert isinstance(dense_weight, torch.Tensor)
    target_w = layer.rows_of(dense_weight.detach()).double()
    dense_bias = getattr(layer.dense, "bias", None)
    pruned_bias = getattr(layer.pruned, "bias", None)
    shift = None
    if isinstance(dense_bias, torch.Tensor):
        current = pruned_bias.detach().double() if isinstance(pruned_bias, torch.Tensor) else 0.0
        shift = dense_bias.detach().double() - current  # the bias difference the weights must carry
    diag_mean = gram.diagonal(dim1=1, dim2=2).mean(1)  # per group
    new = param.detach().clone()
    direct = layer.width <= DIRECT_MAX_WIDTH
    per_row = 3 * layer.width * layer.width * 8 if direct else 8 * layer.width * 8
    chunk = min(max(1, memory_budget // per_row), per_group)  # never across groups
    solved = 0
    for group in range(layer.groups):
        for start in range(group * per_group, (group + 1) * per_group, chunk):
            r = torch.arange(start, min((group + 1) * per_group, start + chunk))
            m = mask[r].to(gram.device, torch.float64)
            ok = m.sum(1) > 0
            if not bool(ok.any()) or not bool(diag_mean[group] > 0):
                continue  # rows pruned to nothing, or a layer whose inputs were all zero
            r, m = r[ok.cpu()], m[ok]
            lam = (ridge * diag_mean[group]).clamp_min(1e-12).expand(len(r))
            b = target_w[r].to(gram.device) @ cross[group].T
            if shift is not None:
                b = b + total[group].unsqueeze(0) * shift[r].to(gram.device).unsqueeze(1)
            b = b * m
            if direct:
                w, good = _direct(gram[group].expand(len(r), -1, -1), lam, m, b)
            else:
                start_w = new[r].to(gram.device, torch.float64)
                w, good = _conjugate_gradients(gram[group], lam, m, b, start_w)
            if bool(good.any()):
                new[r[good.cpu()]] = w[good].to(new.device, new.dtype)
                solved += int(good.sum())
    with torch.no_grad():
        param.copy_(torch.where(mask.to(new.device), new, param.detach()))
    return solved


@torch.no_grad()
def lstsq_recover_(
    plan: SparsityPlan,
    pruned: nn.Module,
    dense: nn.Module,
    batches: Sequence[Inputs],
    blocks: Sequence[str] = (),
    ridge: float = DEFAULT_RIDGE,
    memory_budget: int = DEFAULT_MEMORY,
) -> LstsqResult:
    """Solve the surviving weights of every eligible pruned layer in closed form, in place.

    Args:
        plan: the pruned model's plan; its ``parameter`` tensors are rewritten at surviving
            entries only (the mask, and any masked entries the toolkit keeps, stay as they were).
        pruned, dense: both models, in eval mode, on the device of ``batches``.
        batches: calibration inputs (padding tokens of batches with an ``attention_mask`` are
            left out of the sums).
        blocks: block names: layers of one block are solved together, blocks in order, so each
            block's solve sees the earlier blocks already solved. Empty: one group (memory allowing).
        ridge: ``lambda`` relative to the mean diagonal of ``X_p^T X_p`` (keeps rows well posed).
        memory_budget: bytes a group's sums, and a batch of row systems, may take.

    Returns:
        ``{"solved": [names], "skipped": [names], "passes": int, "rows": int}``: skipped are
        weights that are not a Linear/Conv1d/Conv2d with the dense layer's outputs (the same shape,
        or fewer input channels after structured pruning; or are tied, or never ran on these inputs).
    """
    layers, skipped = _eligible_layers(plan, dense, pruned)
    if not layers or not batches:
        return {"solved": [], "skipped": skipped + [layer.entry.name for layer in layers], "passes": 0, "rows": 0}
    ordered = _execution_order(layers, pruned, batches[0][:1])
    reached = {id(layer) for layer in ordered}
    skipped += [layer.entry.name for layer in layers if id(layer) not in reached]
    groups = _group(ordered, blocks, memory_budget)
    solved, rows = [], 0
    for group in groups:
        _run_pass(group, dense, pruned, batches)
        for layer in group:
            if layer.gram is None:
                skipped.append(layer.entry.name)
                continue
            rows += _solve(layer, ridge, memory_budget)
            layer.gram = layer.cross = layer.total = None
            solved.append(layer.entry.name)
        plan.refresh()
    return {"solved": solved, "skipped": skipped, "passes": len(groups), "rows": rows}
