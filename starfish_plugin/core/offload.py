"""``offload="disk"``: the dense model's blocks wait in files while they do not run.

Under ``strategy="sequential"`` only one block trains at a time, yet the whole dense model sits in
memory. ``DiskBlocks`` writes each dense block's tensors to a file and releases their memory;
a block's tensors are mapped back from its file (``torch.load(mmap=True)``) while it runs (a
forward pre-hook, and a forward hook that runs even when the forward raises) or while a heal
``hold``s it, and released again after. On exit every tensor gets its values back in memory (the
same ``Parameter`` objects, bit-identical values) and the files are removed.
"""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from starfish_plugin.errors import CheckpointError


def _empty(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(0, dtype=t.dtype, device=t.device)


class DiskBlocks:
    """``model``'s ``blocks`` (module names) kept in files in ``directory`` (a temporary one when
    ``None``) inside the ``with``; tensors a block shares with anything outside it stay in memory."""

    def __init__(self, model: nn.Module, blocks: list[str], directory: str | None = None) -> None:
        self.model, self.blocks, self._parent = model, list(blocks), directory
        self._dir: Path | None = None
        self._tensors: dict[str, dict[str, torch.Tensor]] = {}  # block -> name -> the model's tensor
        self._loads: Counter[str] = Counter()
        self._handles: list[Any] = []
        self.bytes_offloaded = 0

    def _owned(self) -> dict[str, dict[str, torch.Tensor]]:
        """Each block's tensors that appear nowhere else in the model (by identity)."""
        counts: Counter[int] = Counter()
        model = self.model
        for _, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
            counts[id(t)] += 1
        owned: dict[str, dict[str, torch.Tensor]] = {}
        for name in self.blocks:
            block = self.model.get_submodule(name)
            inside = [*block.named_parameters(remove_duplicate=False), *block.named_buffers(remove_duplicate=False)]
            here = Counter(id(t) for _, t in inside)
            owned[name] = {n: t for n, t in inside if counts[id(t)] == here[id(t)] == 1 and t.numel() > 0}
        return owned

    def _file(self, block: str) -> Path:
        assert self._dir is not None
        return self._dir / f"block{self.blocks.index(block):04d}.pt"

    def __enter__(self) -> DiskBlocks:
        parent = self._parent if self._parent is not None else tempfile.gettempdir()
        try:
            Path(parent).mkdir(parents=True, exist_ok=True)
            self._dir = Path(tempfile.mkdtemp(prefix="starfish-offload-", dir=parent))
            for block, tensors in self._owned().items():
                torch.save({n: t.detach() for n, t in tensors.items()}, self._file(block))
                self._tensors[block] = tensors
        except OSError as exc:
            self._remove_dir()
            raise CheckpointError(
                f"writing the dense model's blocks to {parent} failed ({exc.strerror or exc}): nothing was changed. "
                "Free space there, pass another HealConfig.cache_dir, or heal with offload='none'"
            ) from exc
        for block, tensors in self._tensors.items():  # every file written: now release the memory
            self.bytes_offloaded += sum(t.numel() * t.element_size() for t in tensors.values())
            self._release(block)
            module = self.model.get_submodule(block)
            self._handles.append(module.register_forward_pre_hook(lambda *_a, b=block: self._load(b)))
            self._handles.append(module.register_forward_hook(lambda *_a, b=block: self._unload(b), always_call=True))
        return self

    def _release(self, block: str) -> None:
        for t in self._tensors[block].values():
            t.data = _empty(t)

    def _load(self, block: str) -> None:
        if block in self._tensors and self._loads[block] == 0:
            mapped = torch.load(self._file(block), mmap=True, weights_only=True)  # file pages, read on use
            for n, t in self._tensors[block].items():
                t.data = mapped[n]
        self._loads[block] += 1

    def _unload(self, block: str) -> None:
        self._loads[block] -= 1
        if block in self._tensors and self._loads[block] == 0:
            self._release(block)

    @contextmanager
    def hold(self, block: str) -> Iterator[None]:
        """Keep ``block``'s tensors mapped in for the whole ``with`` (a block's own heal)."""
        self._load(block)
        try:
            yield
        finally:
            self._unload(block)

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        try:
            for block, tensors in self._tensors.items():  # back in memory, not mapped from a file
                saved = torch.load(self._file(block), weights_only=True)
                for n, t in tensors.items():
                    t.data = saved[n]
        except (OSError, RuntimeError) as exc:  # the files stay: they hold the dense model's only copy
            raise CheckpointError(
                f"reading the dense model's blocks back from {self._dir} failed ({exc}): its blocks "
                f"{list(self._tensors)[:3]}... are empty in memory; their tensors are in the files there "
                "(torch.load each block*.pt and copy them into the model), which were left in place"
            ) from exc
        self._remove_dir()

    def _remove_dir(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
