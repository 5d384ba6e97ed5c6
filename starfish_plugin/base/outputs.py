"""What a model's blocks output: recording it on every forward, and indexing dense outputs by the
channels a structurally pruned block kept."""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from starfish_plugin.base.model_io import main_output
from starfish_plugin.errors import BlockError

OUTPUT_BLOCK = "(output)"  # the model's final output, aligned like a block
# block name -> (channel dimension, original indices of the surviving channels)
ChannelIndex = dict[str, tuple[int, torch.Tensor]]


def _first_tensor(output: object, name: str) -> torch.Tensor:
    tensor = main_output(output)
    if isinstance(tensor, torch.Tensor):
        return tensor
    raise BlockError(f"block {name!r} returned {type(output).__name__}, not a tensor; choose another block")


def require_outputs(outputs: dict[str, torch.Tensor], names: Sequence[str], label: str) -> None:
    """Raise ``BlockError`` if a block produced no output in the last forward."""
    missing = [n for n in names if n not in outputs]
    if missing:
        raise BlockError(
            f"block(s) {missing} of the {label} model exist but are not called in its forward; choose blocks "
            "that run (blocks=[...])"
        )


def _detached(output: object) -> object:
    """``output`` with its first tensor detached (what the rest of the model sees)."""
    if isinstance(output, torch.Tensor):
        return output.detach()
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (output[0].detach(), *output[1:])
    return None  # other containers pass through unchanged


@contextmanager
def capture_outputs(
    model: nn.Module, names: Sequence[str], detach: str | Collection[str] | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """Record each named block's output (its first tensor) on every forward, keyed by name.

    With ``detach`` (a name or several), that block's output goes on to the rest of the model detached: losses on
    later outputs (the model's final output) then train only the weights after it. The
    dictionary is refilled by each forward; hooks are removed on exit.
    """
    outputs: dict[str, torch.Tensor] = {}
    detached = {detach} if isinstance(detach, str) else set(detach or ())
    handles = []
    try:
        for name in names:
            module = model if name == OUTPUT_BLOCK else model.get_submodule(name)

            def hook(_module, _args, output, name=name):
                outputs[name] = _first_tensor(output, name)
                if name in detached:
                    return _detached(output)
                return None

            handles.append(module.register_forward_hook(hook))
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def select_channels(outputs: dict[str, torch.Tensor], index: ChannelIndex) -> dict[str, torch.Tensor]:
    """Index dense outputs by the kept channels (in place of the dict; tensors are new)."""
    for block, (dim, kept) in index.items():
        if block in outputs:
            outputs[block] = outputs[block].index_select(dim, kept.to(outputs[block].device))
    return outputs
