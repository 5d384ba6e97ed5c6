"""Repair after each Torch-Pruning step, before healing, by rule (never by model name).

Torch-Pruning removes channels from parameters; modules that keep a width, a shape or a head count
as a plain attribute, or that index a table by position, still expect the old numbers, and the
pruned model no longer runs. Its examples fix these by hand after ``pruner.step()``; inside
``starfish.attach`` the user has no such moment, so the adapter does it:

* **attention** (``tp_attention``): head counts and head sizes from the pruned projections;
* **mirrored sizes**: an attribute holding the old size of a dimension of the module's own
  parameter (timm ``Scale.shape``, a custom norm's ``num_channels`` / ``normalized_shape``) gets
  the new size;
* **position tables**: a parameter indexed by an integer buffer of the same module (relative
  position bias tables: Swin, BEiT) whose position rows Torch-Pruning removed (it prunes the last
  non-singleton dimension of a bare parameter) gets its rows back from before the step;
* **repeated channels** (``repeated_channels``, when the forward check fails): a layer fed ``k``
  copies of a pruned stream side by side is pruned again from the dense weights in every copy;

then the ``starfish_repair_pruned`` hook lets the user fix modules of their own. What cannot be
repaired is named in the ``PrunerError`` raised when the model still does not run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from starfish_plugin.adapters.tp_attention import ATTENTION_RULES
from starfish_plugin.adapters.tp_fixes import Fix, Misfit, set_attribute

#: plain attributes that may hold the size of one of a module's own parameter dimensions
SIZE_ATTRIBUTES = ("shape", "normalized_shape", "num_channels", "num_features", "channels", "dim", "hidden_size",
                   "embed_dim", "hidden_dim", "in_features", "out_features", "in_channels", "out_channels")


@dataclass
class Snapshot:
    """What the model looked like before a step: every parameter's shape, and the position tables
    (small) by value."""

    shapes: dict[str, torch.Size]
    tables: dict[str, torch.Tensor] = field(default_factory=dict)
    sizes: dict[tuple[str, str], Any] = field(default_factory=dict)  # (module, SIZE_ATTRIBUTES name) -> value


def _position_dims(module: nn.Module, param: torch.Tensor) -> list[int]:
    """The dimensions of ``param`` indexed by an integer buffer of ``module`` (size = largest index + 1)."""
    dims: list[int] = []
    for buffer in module.buffers(recurse=False):
        if buffer.is_floating_point() or buffer.is_complex() or buffer.numel() == 0 or buffer.dtype == torch.bool:
            continue
        top = int(buffer.max()) + 1
        dims += [d for d, size in enumerate(param.shape) if size == top and size > 1 and d not in dims]
    return dims


def snapshot(model: nn.Module) -> Snapshot:
    tables: dict[str, torch.Tensor] = {}
    sizes: dict[tuple[str, str], Any] = {}
    for name, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            if _position_dims(module, param):
                tables[f"{name}.{pname}" if name else pname] = param.detach().clone()
        if next(module.parameters(recurse=False), None) is not None:
            sizes |= {(name, a): module.__dict__[a] for a in SIZE_ATTRIBUTES if a in module.__dict__}
    return Snapshot({n: p.shape for n, p in model.named_parameters()}, tables, sizes)


def _split(full: str) -> tuple[str, str]:
    module, _, attr = full.rpartition(".")
    return module, attr


def restore_tables(model: nn.Module, before: Snapshot) -> tuple[list[Fix], list[Misfit]]:
    """Give position tables back the rows Torch-Pruning removed: their rows are positions, not
    channels. A table whose other dimensions (heads) shrank too cannot be restored."""
    fixes, misfits = [], []
    for full, saved in before.tables.items():
        module_name, pname = _split(full)
        module = model.get_submodule(module_name)
        param = getattr(module, pname)
        if param.shape == saved.shape:
            continue
        positions = _position_dims(module, saved)
        changed = [d for d in range(saved.dim()) if param.shape[d] != saved.shape[d]]
        if any(d not in positions for d in changed):
            misfits.append(Misfit(module_name, full, f"shape {tuple(saved.shape)} (a table indexed by position)",
                                  f"shape {tuple(param.shape)}",
                                  f"leave it alone: unwrapped_parameters={{{full}: <its channel dim>}} or keep the "
                                  "head count (prune_num_heads=False)"))
            continue
        pruned_shape = tuple(param.shape)
        with torch.no_grad():
            param.data = saved.to(param.device, param.dtype)
        fixes.append(Fix(module_name, pname, f"shape {pruned_shape}", f"shape {tuple(saved.shape)}",
                         "position table: the rows Torch-Pruning removed put back"))
    return fixes, misfits


#: layer types the pruner updates its own attributes of (their ``in_``/``out_`` sizes are per dimension)
PRUNER_LAYERS = (nn.Linear, nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm,
                 nn.Embedding, nn.MultiheadAttention, nn.PReLU)


def mirrored_sizes(model: nn.Module, before: Snapshot) -> list[Fix]:
    """Attributes that held the old size of a dimension of the module's own parameter and that the
    step left as they were, in modules of types the pruner does not know (it updates its own). A
    size that both shrank and stayed in another dimension is ambiguous and left alone."""
    fixes = []
    for name, module in model.named_modules():
        if isinstance(module, PRUNER_LAYERS):
            continue
        seen: dict[int, set[int]] = {}
        for pname, param in module.named_parameters(recurse=False):
            old = before.shapes.get(f"{name}.{pname}" if name else pname)
            if old is None or len(old) != param.dim():
                continue
            for o, n in zip(old, param.shape, strict=True):
                seen.setdefault(o, set()).add(n)
        resized = {o: next(iter(n)) for o, n in seen.items() if len(n) == 1 and o not in n}
        if not resized:
            continue
        for attr in SIZE_ATTRIBUTES:
            value = module.__dict__.get(attr)
            if (name, attr) not in before.sizes or before.sizes[name, attr] != value:
                continue  # new, or already updated by the pruner
            if isinstance(value, int) and not isinstance(value, bool) and value in resized:
                fixes += set_attribute(name, module, attr, resized[value], "size of its pruned parameter")
            elif isinstance(value, (tuple, list)) and value and all(isinstance(v, int) for v in value):
                new = type(value)(resized.get(v, v) for v in value)
                if new != value:
                    fixes += set_attribute(name, module, attr, new, "size of its pruned parameter")
    return fixes


def repair_pruned(model: nn.Module, pruner: Any, before: Snapshot) -> tuple[list[Fix], list[Misfit]]:
    """Every built-in rule on ``model`` after a step; returns (what changed, what could not be)."""
    fixes, misfits = restore_tables(model, before)
    fixes += mirrored_sizes(model, before)
    heads = getattr(pruner, "num_heads", None) or {}
    for name, module in model.named_modules():
        misfits += _inner_width(name, module, before)
        for rule in ATTENTION_RULES:
            done, missed = rule(name, module, heads)
            fixes += done
            misfits += missed
    return fixes, misfits


def _inner_width(name: str, module: nn.Module, before: Snapshot) -> list[Misfit]:
    """An attention whose query kept its input's width before the step and no longer does: some
    (PVT-v2, Twins) reshape their output to their input's width, which the pruner does not couple."""
    q = getattr(module, "q", None)
    old = before.shapes.get(f"{name}.q.weight" if name else "q.weight")
    if not isinstance(q, nn.Linear) or old is None or old[0] != old[1] or q.in_features == q.out_features:
        return []
    return [Misfit(name, f"{name}.q.out_features", f"{q.in_features}, the attention's input width (they were equal "
                   "before the step, and an attention that reshapes its output to its input's width needs them "
                   "equal)", q.out_features,
                   f"prune the residual stream and {name}'s inner width together, which Torch-Pruning cannot couple "
                   f"here: put {name} in ignored_layers and leave the residual stream alone (ignore the patch "
                   "embeddings and every layer writing into it), so that only MLP hidden units are pruned")]


def _in_width(module: nn.Module) -> int | None:
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        return int(module.normalized_shape[0])
    if isinstance(module, nn.Linear):
        return module.in_features
    return None


def _kept_key(module: nn.Module, name: str) -> tuple[str, str]:
    return (name, "out") if isinstance(module, nn.LayerNorm) else (name, "in")


def repeated_channels(model: nn.Module, dense: nn.Module, record: Any, where: str, width: int) -> list[Fix]:
    """Channels repeated by a reshape or concatenation, pruned again from the dense weights.

    A space-to-depth step (Swin's ``PatchMerging``: ``k = 4`` copies of the ``C`` channels side by
    side) or a concatenation of pooled copies (DINOv2's classifier: class token and mean token)
    feeds a layer ``k x C`` channels, and Torch-Pruning does not map the stream's pruned channels
    into each copy. When the module ``where`` receives ``width = k x C_new`` channels, and exactly
    one record of kept channels of a ``C_old``-wide stream keeps ``C_new`` of them (or, of several,
    exactly one whose pruned channels hold those the pruner removed from ``where``), ``where`` (and
    every layer pruned along with it) is pruned again from the dense model's weights to keep those
    channels in every copy. Needs the dense weights to be the ones the pruner started from (the
    first step of an attached pruner)."""
    modules, references = dict(model.named_modules()), dict(dense.named_modules())
    module, reference = modules.get(where), references.get(where)
    now = _in_width(module) if module is not None else None
    old = _in_width(reference) if reference is not None else None
    key = _kept_key(module, where) if module is not None else None
    if now is None or old is None or key not in record.kept or width == now:
        return []
    for k in (2, 3, 4, 8, 9, 16):
        if old % k or width % k:
            continue
        stream, kept_width = old // k, width // k
        streams = {tuple(v) for (n, d), v in record.kept.items()
                   if d == "out" and record.original.get((n, d)) == stream and len(v) == kept_width}
        if len(streams) > 1:  # several: the one whose pruned channels hold what the pruner removed here
            removed = {r % stream for r in set(range(old)) - set(record.kept[key])}
            streams = {v for v in streams if removed <= set(range(stream)) - set(v)}
        if len(streams) != 1:
            continue  # none, or several that disagree: not known which one is repeated
        kept_stream = streams.pop()
        kept = [g * stream + c for g in range(k) for c in kept_stream]
        same = [n for n, kept_n in record.kept.items() if kept_n == record.kept[key]
                and record.original.get(n) == old and n[0] in modules]
        fixes = []
        for name, dim in same:
            resliced = _reslice(name, modules[name], references[name], dim, kept, record)
            if resliced:
                record.kept[name, dim] = list(kept)
            fixes += resliced
        return fixes
    return []


def _reslice(name: str, module: nn.Module, reference: nn.Module, dim: str, kept: list[int], record: Any) -> list[Fix]:
    """``module``'s weights again from ``reference`` with ``kept`` input (norm: its) channels."""
    index = torch.tensor(kept, dtype=torch.long)
    before = _in_width(module)
    with torch.no_grad():
        if isinstance(module, nn.LayerNorm):
            for pname in ("weight", "bias"):
                param = getattr(module, pname)
                if param is not None:
                    param.data = getattr(reference, pname).detach()[index].to(param.device, param.dtype).clone()
            module.normalized_shape = (len(kept),)
        elif isinstance(module, nn.Linear) and dim == "in":
            rows = record.kept.get((name, "out"))
            weight = cast(torch.Tensor, reference.weight).detach()
            weight = weight[torch.tensor(rows, dtype=torch.long)] if rows is not None else weight
            module.weight.data = weight[:, index].to(module.weight.device, module.weight.dtype).clone()
            module.in_features = len(kept)
        else:
            return []
    return [Fix(name, "in channels", before, len(kept),
                "channels repeated by a reshape: the pruned channels removed from every copy")]


def input_width(model: nn.Module, where: str, example: tuple[tuple, dict]) -> int | None:
    """The last dimension of the first input module ``where`` receives on ``example`` (it may fail)."""
    from starfish_plugin.adapters.tp_errors import failed_forward

    seen: list[int] = []

    def grab(_module: nn.Module, args: tuple) -> None:
        if not seen and args and isinstance(args[0], torch.Tensor) and args[0].dim() > 0:
            seen.append(int(args[0].shape[-1]))

    handle = model.get_submodule(where).register_forward_pre_hook(grab)
    try:
        failed_forward(model, *example)
    finally:
        handle.remove()
    return seen[0] if seen else None
