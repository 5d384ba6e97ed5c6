"""Attention bookkeeping kept in step with Torch-Pruning's pruned shapes, by the module's structure
(not its class name): a fused ``qkv`` Linear (timm ``Attention``, Swin ``WindowAttention``), a
query Linear and a fused key/value one (``q`` + ``kv``: PVT-v2, Twins, SegFormer), separate
query/key/value Linears (Hugging Face ``*Attention`` / ``*SelfAttention``), torchvision's
``VisionTransformer.hidden_dim``. Each rule returns what it changed, or what it could not."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from starfish_plugin.adapters.tp_fixes import Fix, Misfit, set_attribute

# Hugging Face attention: separate projections, the head size kept as an attribute, the head count
# found by the forward's ``view(..., -1, head_size)``: pruning head dimensions without updating the
# head size silently merges heads.
SPLIT_PROJECTIONS = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"))
_HEAD_SIZE_NAMES = ("head_dim", "attention_head_size", "head_size")
_HEAD_COUNT_NAMES = ("num_heads", "num_attention_heads", "n_heads")


def _int_attr(owner: Any, names: tuple[str, ...]) -> str | None:
    return next((n for n in names if isinstance(getattr(owner, n, None), int) and
                 not isinstance(getattr(owner, n), bool)), None)


def _heads(module: nn.Module, proj: nn.Module, heads: Mapping[nn.Module, int], kv: bool = False) -> int | None:
    """The head count of ``proj``: the pruner's (it lowers it when it prunes whole heads), else the
    module's or its config's own."""
    if proj in heads:
        return int(heads[proj])
    names = ("num_key_value_heads", *_HEAD_COUNT_NAMES) if kv else _HEAD_COUNT_NAMES
    for owner in (module, getattr(module, "config", None)):
        name = _int_attr(owner, names) if owner is not None else None
        if name is not None and getattr(owner, name) > 0:
            return int(getattr(owner, name))
    return None


def fused_qkv(name: str, module: nn.Module, heads: Mapping[nn.Module, int]) -> tuple[list[Fix], list[Misfit]]:
    """``qkv`` Linear of 3 x heads x head size, with ``num_heads`` (and ``head_dim`` / ``attn_dim``)."""
    qkv = getattr(module, "qkv", None)
    count = _int_attr(module, ("num_heads",))
    if not isinstance(qkv, nn.Linear) or count is None:
        return [], []
    n = _heads(module, qkv, heads)
    assert n is not None
    if qkv.out_features % (3 * n):
        return [], [Misfit(name, f"{name}.qkv.out_features", f"a multiple of 3 x num_heads = {3 * n}",
                           qkv.out_features, "the pruner removed query/key/value dimensions unevenly across heads: "
                           f"give it num_heads={{{name}.qkv: {n}}}")]
    head = qkv.out_features // (3 * n)
    fixes = set_attribute(name, module, "num_heads", n, "attention heads")
    if isinstance(getattr(module, "head_dim", None), int):
        fixes += set_attribute(name, module, "head_dim", head, "attention heads")
    if isinstance(getattr(module, "attn_dim", None), int):
        fixes += set_attribute(name, module, "attn_dim", n * head, "attention heads")
    return fixes, []


def query_and_kv(name: str, module: nn.Module, heads: Mapping[nn.Module, int]) -> tuple[list[Fix], list[Misfit]]:
    """A query Linear ``q`` and a fused key/value Linear ``kv`` (PVT-v2, Twins, SegFormer)."""
    q, kv = getattr(module, "q", None), getattr(module, "kv", None)
    count = _int_attr(module, ("num_heads",))
    if not (isinstance(q, nn.Linear) and isinstance(kv, nn.Linear)) or count is None:
        return [], []
    n = _heads(module, q, heads)
    assert n is not None
    misfits = []
    if q.out_features % n:
        misfits.append(Misfit(name, f"{name}.q.out_features", f"a multiple of num_heads = {n}", q.out_features,
                              f"give the pruner num_heads={{{name}.q: {n}}}"))
    elif kv.out_features != 2 * q.out_features:
        misfits.append(Misfit(name, f"{name}.kv.out_features", f"2 x q.out_features = {2 * q.out_features}",
                              kv.out_features, "Torch-Pruning did not prune the query and the fused key/value "
                              f"projections alike: put {name} in ignored_layers (and, for an attention that "
                              "reshapes its output to its input's width, as PVT-v2's does, leave the residual stream "
                              "alone too: ignore the patch embeddings and every layer writing into it)"))
    if misfits:
        return [], misfits
    fixes = set_attribute(name, module, "num_heads", n, "attention heads")
    if isinstance(getattr(module, "head_dim", None), int):
        fixes += set_attribute(name, module, "head_dim", q.out_features // n, "attention heads")
    return fixes, []


def split_qkv(name: str, module: nn.Module, heads: Mapping[nn.Module, int]) -> tuple[list[Fix], list[Misfit]]:
    """Separate query/key/value Linears with the head size as an attribute (Hugging Face): head
    size, head count, ``all_head_size`` and the grouped-query ratio. The softmax scale is left as
    the dense model's: healing aligns the pruned attention with the dense one."""
    for q_name, k_name, v_name in SPLIT_PROJECTIONS:
        q, k, v = (getattr(module, n, None) for n in (q_name, k_name, v_name))
        if not (isinstance(q, nn.Linear) and isinstance(k, nn.Linear) and isinstance(v, nn.Linear)):
            continue
        size_name = _int_attr(module, _HEAD_SIZE_NAMES)
        q_heads, kv_heads = _heads(module, q, heads), _heads(module, k, heads, kv=True)
        if size_name is None or not q_heads or not kv_heads:
            return [], []
        misfits = []
        if q.out_features % q_heads:
            misfits.append(Misfit(name, f"{name}.{q_name}.out_features", f"a multiple of {q_heads} heads",
                                  q.out_features, f"give the pruner num_heads={{{name}.{q_name}: {q_heads}, "
                                  f"{name}.{k_name}: {kv_heads}, {name}.{v_name}: {kv_heads}}} so that it removes "
                                  "the same dimensions in every head"))
        elif k.out_features * q_heads != q.out_features * kv_heads or v.out_features != k.out_features:
            misfits.append(Misfit(name, f"{name}.{k_name}.out_features / {v_name}.out_features",
                                  f"{q.out_features * kv_heads // q_heads} each (the query's head size x {kv_heads})",
                                  f"{k.out_features} / {v.out_features}",
                                  "queries, keys and values must keep one head size: give the pruner num_heads for "
                                  "all three projections"))
        if misfits:
            return [], misfits
        fixes = set_attribute(name, module, size_name, q.out_features // q_heads, "attention heads")
        for attr, value in (("num_attention_heads", q_heads), ("num_heads", q_heads),
                            ("all_head_size", q.out_features), ("num_key_value_heads", kv_heads)):
            if isinstance(getattr(module, attr, None), int):
                fixes += set_attribute(name, module, attr, value, "attention heads")
        if isinstance(getattr(module, "num_key_value_groups", None), int) and q_heads % kv_heads == 0:
            fixes += set_attribute(name, module, "num_key_value_groups", q_heads // kv_heads, "attention heads")
        return fixes, []
    return [], []


def torchvision_hidden_dim(name: str, module: nn.Module, heads: Mapping[nn.Module, int]) -> tuple[list[Fix], list]:
    """torchvision ``VisionTransformer`` checks its input against ``hidden_dim``."""
    conv_proj = getattr(module, "conv_proj", None)
    if isinstance(conv_proj, nn.Conv2d) and isinstance(getattr(module, "hidden_dim", None), int):
        return set_attribute(name, module, "hidden_dim", conv_proj.out_channels, "embedding width"), []
    return [], []


ATTENTION_RULES = (fused_qkv, query_and_kv, split_qkv, torchvision_hidden_dim)


def sync_attention(model: nn.Module, pruner: Any | None = None) -> list[Fix]:
    """Bring every attention module's head count and sizes in line with its pruned projections, as
    Torch-Pruning's examples do by hand after ``step()``; returns what changed."""
    heads = getattr(pruner, "num_heads", None) or {}
    fixes: list[Fix] = []
    for name, module in model.named_modules():
        for rule in ATTENTION_RULES:
            fixes += rule(name, module, heads)[0]
    return fixes


def attention_projections(model: nn.Module) -> dict[nn.Module, tuple[str, int]]:
    """{projection Linear: (its name, head count)} for every attention module found by structure,
    as Torch-Pruning's ``num_heads`` wants them. A query ``q`` with a fused key/value ``kv`` gets
    its heads on ``q`` only: Torch-Pruning's group of ``q`` already holds both halves of ``kv``."""
    found: dict[nn.Module, tuple[str, int]] = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        n = _int_attr(module, ("num_heads",))
        if n is not None and isinstance(getattr(module, "qkv", None), nn.Linear):
            found[module.qkv] = (f"{prefix}qkv", module.num_heads)
        elif n is not None and isinstance(getattr(module, "q", None), nn.Linear) and isinstance(
                getattr(module, "kv", None), nn.Linear):
            found[module.q] = (f"{prefix}q", module.num_heads)  # its group holds kv's matching channels
        for names in SPLIT_PROJECTIONS:
            found_projections = [getattr(module, p, None) for p in names]
            projections = [p for p in found_projections if isinstance(p, nn.Linear)]
            if len(projections) != 3 or _int_attr(module, _HEAD_SIZE_NAMES) is None:
                continue
            q_heads, kv_heads = _heads(module, projections[0], {}), _heads(module, projections[1], {}, kv=True)
            if q_heads and kv_heads:
                for p_name, proj, count in zip(names, projections, (q_heads, kv_heads, kv_heads), strict=True):
                    found[proj] = (f"{prefix}{p_name}", count)
    return found


def complete_num_heads(pruner: Any) -> list[str]:
    """Give a Torch-Pruning pruner, before its first step, the head counts of the attention
    projections it was not told about (``num_heads``, as its examples pass for every attention),
    so that it removes the same dimensions in every head instead of leaving a model whose heads no
    longer split. Returns the projections added."""
    ignored = {id(m) for layer in getattr(pruner, "ignored_layers", []) or [] for m in layer.modules()}
    graph = getattr(getattr(pruner, "DG", None), "module2node", {})
    missing = {proj: named for proj, named in attention_projections(pruner.model).items()
               if proj not in pruner.num_heads and id(proj) not in ignored and proj in graph}
    if not missing:
        return []
    # Torch-Pruning's defaults for these are shared dict objects: never add to those
    pruner.num_heads = dict(pruner.num_heads)
    pruner.out_channel_groups = dict(pruner.out_channel_groups)
    for proj, (_name, count) in missing.items():
        pruner.num_heads[proj] = count
        pruner.out_channel_groups[proj] = count
        if isinstance(getattr(pruner, "init_num_heads", None), dict):
            pruner.init_num_heads[proj] = count
    return [f"{name}: {count}" for name, count in missing.values()]
