"""FSDP2 copies of a model for ``strategy="fsdp"``: ``fully_shard`` per block, then the root.

The user's models are never sharded themselves: ``sharded_copy`` builds the copy's structure on
the meta device (no weight is copied twice), shards it with PyTorch's ``fully_shard``, allocates
each rank's shards on the heal's device and fills them from the user's weights. At the end
``gather_into`` writes the healed full tensors back into the user's model, one tensor at a time.
"""

from __future__ import annotations

import copy
from typing import Any, cast

import torch
from torch import nn

from starfish_plugin.core.plan import MaskedTensor, SparsityPlan


def _meta_memo(model: nn.Module) -> dict[int, object]:
    """``copy.deepcopy`` memo mapping every tensor the modules hold (parameters, buffers, and plain
    tensor attributes such as a prune hook's ``module.weight``) to a meta tensor of its shape."""
    memo: dict[int, object] = {}
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None and id(p) not in memo:
                memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for b in module._buffers.values():
            if b is not None and id(b) not in memo:
                memo[id(b)] = torch.empty_like(b, device="meta")
        for value in vars(module).values():
            if isinstance(value, torch.Tensor) and id(value) not in memo:
                memo[id(value)] = torch.empty_like(value, device="meta")
    return memo


def sharded_copy(model: nn.Module, blocks: list[str], device: torch.device) -> nn.Module:
    """A copy of ``model`` whose ``blocks`` (module names) and root are each one FSDP2 unit,
    every parameter a ``DTensor`` sharded over all ranks on ``device``; buffers are replicated."""
    import torch.distributed as torch_dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    mesh = init_device_mesh(device.type, (torch_dist.get_world_size(),))
    shadow = copy.deepcopy(model, _meta_memo(model))  # structure, hooks and parametrizations; no weights
    for name in blocks:
        fully_shard(shadow.get_submodule(name), mesh=mesh)
    fully_shard(shadow, mesh=mesh)
    shadow.to_empty(device=device)
    weights = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    with torch.no_grad():
        for name, param in shadow.named_parameters():
            p = cast(Any, param)  # a DTensor parameter
            full = weights[name].detach().to(device)
            local = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()
            p.to_local().copy_(local)  # src_data_rank=None: each rank cuts its own shard, no message
        for name, b in shadow.named_buffers():
            b.copy_(buffers[name])
    return shadow


def sharded_plan(plan: SparsityPlan, model: nn.Module, shadow: nn.Module) -> SparsityPlan:
    """``plan`` (read on ``model``) for ``shadow``: each entry's tensor is the shadow's ``DTensor``
    of the same name and its mask is sharded like it, so masking gradients and weights stays a
    local multiply on every rank."""
    from torch.distributed.tensor import distribute_tensor

    entries = []
    for e, param in zip(plan, shadow_parameters([e.parameter for e in plan], model, shadow), strict=True):
        p = cast(Any, param)  # a DTensor parameter
        mask = distribute_tensor(e.mask.to(p.to_local().device), p.device_mesh, p.placements, src_data_rank=None)
        entries.append(MaskedTensor(e.name, p, mask, e.form, e.masked_entries))
    return SparsityPlan(entries, plan.adapter, plan.structural, [], plan.kept_out_channels,
                        plan.original_out_channels, plan.hint)


def shadow_parameters(params: list[nn.Parameter], model: nn.Module, shadow: nn.Module) -> list[nn.Parameter]:
    """The shadow's parameters with the names ``params`` have in ``model``, in that order."""
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    shadows = dict(shadow.named_parameters(remove_duplicate=False))
    return [shadows[names[id(p)]] for p in params]


@torch.no_grad()
def gather_into(shadow: nn.Module, model: nn.Module, params: list[nn.Parameter]) -> None:
    """Write the shadow's full tensors into ``params`` of ``model`` (every rank takes part in each
    all-gather; one full tensor is materialised at a time)."""
    for p, sharded in zip(params, shadow_parameters(params, model, shadow), strict=True):
        p.copy_(cast(Any, sharded).full_tensor())
