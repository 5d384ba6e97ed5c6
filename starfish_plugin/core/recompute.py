"""Gradient checkpointing of the pruned model's blocks: activations inside a block are not kept for
the backward pass but recomputed from the block's input, trading one more forward for memory that
no longer grows with every intermediate of every block (long token sequences, big images)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from torch import nn
from torch.utils.checkpoint import checkpoint

from starfish_plugin.base.model_io import kv_cache_off


@contextmanager
def recompute_blocks(model: nn.Module, names: Sequence[str]) -> Iterator[None]:
    """Run each named block of ``model`` under ``torch.utils.checkpoint`` (non-reentrant) inside
    the context; the blocks' forwards, and a Hugging Face ``config.use_cache``, are put back on exit.

    A key/value cache (``config.use_cache`` of any submodule's Hugging Face config) is switched
    off meanwhile: a recomputed attention layer would append to it a second time.
    """
    patched: list[tuple[nn.Module, Any]] = []
    try:
        seen: set[int] = set()
        for name in names:
            module = model.get_submodule(name)
            if id(module) in seen:  # listed twice, or one module under two names: wrap it once
                continue
            seen.add(id(module))
            own = module.__dict__.get("forward")  # an instance-level forward, if someone set one
            inner = own if own is not None else module.forward

            def forward(*args: Any, _inner: Any = inner, **kwargs: Any) -> Any:
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

            module.forward = forward
            patched.append((module, own))
        with kv_cache_off(model):  # a wrapped LM: every config, not only the top one
            yield
    finally:
        for module, own in reversed(patched):
            if own is None:
                del module.forward
            else:
                module.forward = own
