"""Attention attributes kept in step with Torch-Pruning's pruned shapes (timm ``Attention``,
torchvision ``VisionTransformer``, Hugging Face ``*Attention``: heads, head sizes, widths)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from torch import nn


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
SPLIT_PROJECTIONS = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"))
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
    for q_name, k_name, v_name in SPLIT_PROJECTIONS:
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
