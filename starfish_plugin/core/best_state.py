"""The best weights a heal has seen: kept in memory, or in a file when they outgrow the budget."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from starfish_plugin.errors import CheckpointError


class BestState:
    """A copy of the trained tensors (and buffers, healing in train mode) at the best state so far
    (none until a state beats the start: the start's own copy is the heal's backup). On the CPU when the tensors fit
    ``memory_budget`` bytes, else in a file in ``directory`` (a temporary one if ``None``)."""

    def __init__(self, params: list[torch.Tensor], memory_budget: int, directory: str | None = None) -> None:
        self.params = params
        size = sum(p.numel() * p.element_size() for p in params)
        self.on_disk = size > memory_budget
        self.stage: str | None = None
        self._copy: list[torch.Tensor] | None = None
        self._dir: Path | None = None
        self._parent = directory

    @property
    def held(self) -> bool:
        return self.stage is not None

    @property
    def path(self) -> Path:
        if self._dir is None:
            parent = self._parent if self._parent is not None else tempfile.gettempdir()
            os.makedirs(parent, exist_ok=True)
            self._dir = Path(tempfile.mkdtemp(prefix="starfish-best-", dir=parent))
        return self._dir / "best_state.pt"

    @torch.no_grad()
    def keep(self, stage: str) -> None:
        """Copy the tensors as they are now, as the best state (reached at ``stage``)."""
        if self.on_disk:  # written from the tensors themselves: no second copy of them in memory
            try:
                torch.save([p.detach().cpu() for p in self.params], self.path)
            except OSError as exc:
                raise CheckpointError(
                    f"keeping the best weights in {self.path} failed ({exc.strerror or exc}); free space there, "
                    "pass another HealConfig.cache_dir, or raise target_memory_budget to keep them in memory"
                ) from exc
        else:
            self._copy = [p.detach().to("cpu", copy=True) for p in self.params]
        self.stage = stage

    def tensors(self) -> list[torch.Tensor]:
        """The kept tensors (on the CPU)."""
        if self.stage is None:
            raise RuntimeError("no best state is held")
        if self.on_disk:
            return torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        assert self._copy is not None
        return self._copy

    def load(self, stage: str, tensors: list[torch.Tensor]) -> None:
        """Hold ``tensors`` (e.g. from a checkpoint) as the best state reached at ``stage``."""
        if self.on_disk:
            torch.save([t.cpu() for t in tensors], self.path)
        else:
            self._copy = [t.cpu() for t in tensors]
        self.stage = stage

    @torch.no_grad()
    def put_back(self) -> None:
        """Copy the best state into the trained tensors."""
        for p, saved in zip(self.params, self.tensors(), strict=True):
            p.copy_(saved)

    def close(self) -> None:
        """Forget the copy and remove its file."""
        self._copy = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
