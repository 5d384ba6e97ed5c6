"""Explaining a Torch-Pruning failure, or a pruned model that no longer runs, as a ``PrunerError``
that says how to set the pruner up."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from torch import nn

from starfish_plugin.adapters.tp_attention import SPLIT_PROJECTIONS
from starfish_plugin.adapters.tp_fixes import Misfit
from starfish_plugin.adapters.tp_kept import NORMS, KeptChannels, channel_count
from starfish_plugin.adapters.tp_trace import EvalMode, device_of, moved
from starfish_plugin.errors import (
    ModelMismatchError,
    PrunerError,
    StarfishError,
)

SETUP = (
    "ignored_layers=[...] for layers it must leave alone (a layer listed there keeps its output channels), "
    "num_heads={qkv_or_q_and_kv_linear: heads} for attention, unwrapped_parameters={param: dim} for bare "
    "nn.Parameters, in_channel_groups / out_channel_groups for grouped layers"
)


def failed_forward(model: nn.Module, args: tuple, kwargs: dict) -> tuple[str, Exception] | None:
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
    device = device_of(model)
    try:
        with torch.no_grad(), EvalMode(model):
            model(*moved(args, device), **moved(kwargs, device))
        return None
    except Exception as exc:  # noqa: BLE001 - reported to the user with the module that raised it
        return (stack[-1] if stack else ""), exc
    finally:
        for handle in handles:
            handle.remove()


def broken_model_error(model: nn.Module, where: str, exc: Exception, misfits: Sequence[Misfit] = ()) -> PrunerError:
    module = dict(model.named_modules()).get(where) if where else None
    if misfits:
        misfits = sorted(misfits, key=lambda m: m.module != where)  # the failing module's first
        named = "; ".join(str(m) for m in misfits[:4]) + (f"; and {len(misfits) - 4} more" if len(misfits) > 4 else "")
        return PrunerError(
            f"Torch-Pruning produced a {type(model).__name__} that cannot run its forward, and starfish could not "
            f"repair it: after pruner.step() it fails {_place(module, where)} ({type(exc).__name__}: {exc}). Not "
            f"repairable from the pruned shapes: {named}. Healing did not run; the model is left as the pruner "
            "left it (with the repairs that could be made). Build the model again from the dense copy and set the "
            f"pruner up as said; other options: {SETUP}."
        )
    place = _place(module, where)
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
            for names in SPLIT_PROJECTIONS
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


def _place(module: nn.Module | None, where: str) -> str:
    return f"in module {where!r} ({type(module).__name__})" if module is not None else "in the model's own forward"


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


class Diagnosed:
    """Turns an error Torch-Pruning raises into a ``PrunerError`` that says how to set it up."""

    def __init__(self, pruner: Any, record: KeptChannels) -> None:
        self.pruner, self.record = pruner, record
        self.shapes = {n: p.shape for n, p in pruner.model.named_parameters()}

    def __enter__(self) -> Diagnosed:
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


def check_dense(model: nn.Module, dense: nn.Module) -> None:
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
