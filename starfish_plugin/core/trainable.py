"""What a heal trains: the pruned tensors (or every parameter), less those the user froze."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from starfish_plugin.core.plan import SparsityPlan
from starfish_plugin.errors import NothingToTrainError


@contextmanager
def trainable_only(model: nn.Module, params: list[nn.Parameter]) -> Iterator[None]:
    """Freeze every parameter of ``model`` except ``params``; restore the flags on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    keep = {id(p) for p in params}
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in keep)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def trainable_parameters(
    model: nn.Module, plan: SparsityPlan, which: str, notes: list[str] | None = None
) -> list[nn.Parameter]:
    """The plan's tensors (``"pruned"``), or every floating parameter of ``model`` (``"all"``),
    less those the user froze (``requires_grad=False``): they stay as they are.

    Raises:
        NothingToTrainError: every pruned tensor is frozen, or has no surviving entry.
    """
    params = plan.parameters()
    if which == "all":
        seen = {id(p) for p in params}
        params += [p for p in model.parameters() if p.is_floating_point() and id(p) not in seen]
    frozen = [p for p in params if not p.requires_grad]
    if frozen and len(frozen) == len(params):
        raise NothingToTrainError(
            f"every tensor healing would train ({len(params)}) has requires_grad=False: nothing can be trained. "
            "If the pruned model is a copy of a frozen dense model, call pruned.requires_grad_(True) first; "
            "tensors you froze on purpose stay frozen"
        )
    if frozen:
        names = {id(p): n for n, p in model.named_parameters()}
        if notes is not None:
            notes.append(f"{len(frozen)} tensor(s) frozen by requires_grad=False stay as they are: "
                         f"{[names.get(id(p), '?') for p in frozen][:5]}")
        params = [p for p in params if p.requires_grad]
    in_plan = {id(e.parameter): e for e in plan}
    if all(id(p) in in_plan and not bool(in_plan[id(p)].mask.any()) for p in params):
        raise NothingToTrainError(
            f"every pruned tensor to train is pruned to nothing (no surviving entry in "
            f"{[e.name for e in plan][:5]}): there is no weight to heal. Prune less, or heal with trainable='all'"
        )
    return params
