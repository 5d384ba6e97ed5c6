"""Content fingerprints: tell a disk cache or a checkpoint built for other models or data from ours."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch
from torch import nn


def _update(digest, chunk: torch.Tensor) -> None:
    t = chunk.detach().cpu().contiguous()
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def hash_tensors(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of ``(name, tensor)`` pairs, in order."""
    digest = hashlib.sha256()
    for name, tensor in tensors:
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        _update(digest, tensor)
    return digest.hexdigest()


def hash_chunks(name: str, dtype: torch.dtype | None, shape: tuple[int, ...], chunks: Iterable[torch.Tensor]) -> str:
    """``hash_tensors([(name, t)])`` of the tensor ``t`` whose rows ``chunks`` yields in order,
    without holding ``t`` whole."""
    digest = hashlib.sha256()
    digest.update(f"{name}|{dtype}|{tuple(shape)}|".encode())
    for chunk in chunks:
        _update(digest, chunk)
    return digest.hexdigest()


def model_fingerprint(model: nn.Module, skip: Iterable[nn.Parameter] = ()) -> str:
    """Hash of every parameter and buffer of ``model`` (those in ``skip`` by name and shape only)."""
    skipped = {id(p) for p in skip}
    items = []
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if id(tensor) in skipped:
            items.append((f"{name}{tuple(tensor.shape)}", torch.empty(0)))
        else:
            items.append((name, tensor))
    return hash_tensors(items)


def text_fingerprint(*parts: object) -> str:
    """Hash of the ``repr`` of ``parts`` (settings, block names)."""
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def weights_fingerprint(tensors: Iterable[torch.Tensor]) -> str:
    """Hash of the values of ``tensors`` in order (the trained weights of a heal)."""
    return hash_tensors((str(i), t) for i, t in enumerate(tensors))
