"""Matching pruned block outputs to dense ones when structural pruning narrowed a block's width."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from starfish_plugin.base.outputs import ChannelIndex
from starfish_plugin.core.plan import SparsityPlan
from starfish_plugin.errors import BlockError


def _differing_dim(dense: torch.Tensor, pruned: torch.Tensor, block: str) -> int:
    if dense.dim() != pruned.dim():
        raise BlockError(f"block {block!r} outputs {dense.dim()}-D tensors in the dense model but "
                         f"{pruned.dim()}-D in the pruned one; choose other blocks")
    dims = [d for d in range(1, dense.dim()) if dense.shape[d] != pruned.shape[d]]
    if len(dims) != 1:
        raise BlockError(
            f"block {block!r} output changed shape from {tuple(dense.shape[1:])} to {tuple(pruned.shape[1:])} "
            "in more than one dimension; only channel pruning can be aligned"
        )
    return dims[0]


def channel_index(
    plan: SparsityPlan,
    pruned: nn.Module,
    blocks: Sequence[str],
    dense_out: Mapping[str, torch.Tensor],
    pruned_out: Mapping[str, torch.Tensor],
    order: Sequence[str] | None = None,
) -> tuple[ChannelIndex, dict[str, str], dict[str, str]]:
    """For each block, how to compare its pruned output with the dense target.

    A block whose output shape is unchanged is compared directly. A block whose channel width
    shrank (the residual stream was pruned) is compared with the dense target indexed by the kept
    channels of the last module to finish inside the block (in ``order``, the forward order;
    registration order if not given) that has a record of that width and of the dense width.

    A block whose width changed with no such record (or whose shape changed otherwise) cannot be
    compared: it is returned apart, with the reason, to be left out of the loss.

    Returns:
        the indices to apply to dense targets, a description per comparable block for the report,
        and {block left out: why}.
    """
    index: ChannelIndex = {}
    described: dict[str, str] = {}
    left_out: dict[str, str] = {}
    order = list(order) if order is not None else [name for name, _ in pruned.named_modules()]
    for block in blocks:
        d, p = dense_out[block], pruned_out[block]
        if d.shape[1:] == p.shape[1:]:
            described[block] = "direct"
            continue
        try:
            dim = _differing_dim(d, p, block)
        except BlockError as exc:
            left_out[block] = str(exc).split(";")[0]
            continue
        width, original = p.shape[dim], d.shape[dim]
        inside = [n for n in order if (n == block or n.startswith(block + ".")) and n in plan.kept_out_channels]
        match = next(
            (
                n
                for n in reversed(inside)
                if len(plan.kept_out_channels[n]) == width
                and plan.original_out_channels.get(n, original) == original
            ),
            None,
        )
        if match is None:
            left_out[block] = (f"outputs {width} channels where the dense block has {original} (the residual stream "
                               "was pruned) and no record says which were kept")
            continue
        kept = plan.kept_out_channels[match].to(torch.long)
        if int(kept.max()) >= original:
            raise BlockError(
                f"kept channels recorded for {match!r} exceed the dense width {original} of block {block!r}"
            )
        index[block] = (dim, kept)
        described[block] = f"kept channels of {match} ({width} of {original}, dim {dim})"
    return index, described, left_out


