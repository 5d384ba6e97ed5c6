"""What one block receives, captured for every calibration sample, and a module that replays it.

Block-sequential healing trains one block at a time from the inputs that reach it: the hidden state
(the block's first positional argument) and whatever else the model passes it (Hugging Face
decoder layers get an attention mask, rotary position embeddings, position ids). Those extras are
split by what they are: a tensor whose first dimension is the batch is kept per sample (a padding
mask), anything else is kept once (rotary tables, flags). ``BlockCall`` then calls the block on
any batch of samples, so a block heals like a small model of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from starfish_plugin.base.model_io import Inputs, call_model, main_output
from starfish_plugin.data.calibration import CalibrationData
from starfish_plugin.errors import BlockError


class _Reached(Exception):
    """Raised by the capture hook: the forward has reached the block, the rest need not run."""


@dataclass
class CapturedInputs:
    """A block's inputs for ``N`` samples.

    Attributes:
        hidden: ``[N, ...]`` the first positional argument (the hidden state), on the CPU.
        spec: the structure of the other arguments ``(args[1:], kwargs)``.
        shared: their leaves, the same for every sample (``None`` at per-sample positions).
        per_sample: leaf position -> ``[N, ...]`` values that differ per sample, on the CPU.
    """

    hidden: torch.Tensor
    spec: pytree.TreeSpec
    shared: list[Any]
    per_sample: dict[int, torch.Tensor]

    def __len__(self) -> int:
        return len(self.hidden)

    def with_hidden(self, hidden: torch.Tensor) -> CapturedInputs:
        """The same extras with another hidden state (the previous block's output)."""
        return CapturedInputs(hidden, self.spec, self.shared, self.per_sample)

    def fields(self, prefix: str) -> dict[str, torch.Tensor]:
        """Per-sample tensors by name (``<prefix>hidden``, ``<prefix><position>``)."""
        return {f"{prefix}hidden": self.hidden, **{f"{prefix}{j}": v for j, v in self.per_sample.items()}}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.fields("").values())


def _batch_sizes_match(values: list[Any], sizes: list[int]) -> bool:
    return (all(isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == n for v, n in zip(values, sizes))
            and max(sizes) > 1)


def _from_records(block: str, records: list[tuple[tuple[Any, ...], dict[str, Any]]]) -> CapturedInputs:
    hidden, flat, spec = [], [], None
    for args, kwargs in records:
        if not args or not isinstance(args[0], torch.Tensor):
            raise BlockError(
                f"block {block!r} is not called with its hidden state as the first positional argument, which "
                "strategy='sequential' replays; heal it with strategy='joint' or choose other blocks"
            )
        hidden.append(args[0].detach().cpu())
        leaves, this_spec = pytree.tree_flatten((tuple(args[1:]), dict(kwargs)))
        if spec is not None and this_spec != spec:
            raise BlockError(
                f"block {block!r} receives differently structured arguments from batch to batch; "
                "strategy='sequential' cannot replay them: heal with strategy='joint'"
            )
        spec = this_spec
        flat.append(leaves)
    assert spec is not None
    sizes = [len(h) for h in hidden]
    shared: list[Any] = []
    per_sample: dict[int, torch.Tensor] = {}
    for j in range(len(flat[0])):
        values = [leaves[j] for leaves in flat]
        if _batch_sizes_match(values, sizes):
            per_sample[j] = torch.cat([v.detach().cpu() for v in values])
            shared.append(None)
            continue
        first = values[0]
        for v in values[1:]:
            same = (torch.equal(v.cpu(), first.cpu()) if isinstance(v, torch.Tensor) and isinstance(first, torch.Tensor)
                    and v.shape == first.shape else v is first or v == first)
            if not same:
                raise BlockError(
                    f"an argument of block {block!r} changes between batches without being per sample; "
                    "strategy='sequential' cannot replay it: heal with strategy='joint'"
                )
        shared.append(first.detach() if isinstance(first, torch.Tensor) else first)
    return CapturedInputs(torch.cat(hidden), spec, shared, per_sample)


@torch.no_grad()
def capture_inputs(model: nn.Module, block: str, data: CalibrationData, batch_size: int,
                   device: torch.device) -> CapturedInputs:
    """``block``'s inputs for every sample of ``data`` (in order): the model runs up to the block,
    no further."""
    records: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def reached(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        records.append((args, kwargs))
        raise _Reached

    handle = model.get_submodule(block).register_forward_pre_hook(reached, with_kwargs=True)
    try:
        for _, x, _ in data.batches(batch_size):
            try:
                call_model(model, x.to(device))
            except _Reached:
                continue
            raise BlockError(f"block {block!r} is not called in the model's forward; choose blocks that run")
    finally:
        handle.remove()
    return _from_records(block, records)


@torch.no_grad()
def chained(model: nn.Module, blocks: list[str], x: Inputs) -> list[bool]:
    """For each block, whether its hidden input is exactly the previous block's output (nothing
    runs between them, so healing can carry the outputs on); the first block never is."""
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    handles = []
    for name in blocks:
        module = model.get_submodule(name)

        def pre(_m: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            if args and isinstance(args[0], torch.Tensor):
                inputs.setdefault(name, args[0])

        def post(_m: nn.Module, _args: Any, out: Any, name: str = name) -> None:
            value = main_output(out)
            if isinstance(value, torch.Tensor):
                outputs.setdefault(name, value)

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        call_model(model, x)
    finally:
        for handle in handles:
            handle.remove()
    result = [False]
    for before, name in zip(blocks, blocks[1:]):
        a, b = outputs.get(before), inputs.get(name)
        result.append(a is not None and b is not None and a.shape == b.shape and bool(torch.equal(a, b)))
    return result


class BlockCall(nn.Module):
    """Calls ``block`` on captured inputs: ``forward(**fields)`` takes the per-sample tensors named
    ``<prefix>hidden`` and ``<prefix><position>`` (other fields are ignored, so a pruned and a dense
    block can share one batch) and returns the block's main output."""

    def __init__(self, block: nn.Module, captured: CapturedInputs, prefix: str, device: torch.device) -> None:
        super().__init__()
        self.block = block
        self._spec, self._prefix = captured.spec, prefix
        self._per_sample = set(captured.per_sample)
        self._shared = [v.to(device) if isinstance(v, torch.Tensor) else v for v in captured.shared]

    def forward(self, **fields: torch.Tensor) -> torch.Tensor:
        p = self._prefix
        leaves = [fields[f"{p}{j}"] if j in self._per_sample else v for j, v in enumerate(self._shared)]
        args, kwargs = pytree.tree_unflatten(leaves, self._spec)
        return main_output(self.block(fields[f"{p}hidden"], *args, **kwargs))


@torch.no_grad()
def run_block(call: BlockCall, fields: dict[str, torch.Tensor], batch_size: int,
              device: torch.device) -> torch.Tensor:
    """``call``'s output for every sample of ``fields`` (batched; on the CPU)."""
    n = len(next(iter(fields.values())))
    out = []
    for start in range(0, n, batch_size):
        batch = {k: v[start: start + batch_size].to(device) for k, v in fields.items()}
        out.append(call(**batch).detach().cpu())
    return torch.cat(out)
