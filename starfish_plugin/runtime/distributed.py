"""Healing across processes with ``torch.distributed`` (launched by ``torchrun``).

When a process group is initialized, ``heal`` gives rank ``r`` of ``w`` the calibration samples
``r, r + w, r + 2w, ...``; each rank caches the dense targets of its own shard only, takes
``ceil(batch_size / w)`` samples per step (so one optimizer step still sees about ``batch_size``
samples in all and the paper's schedule holds), and the gradients are averaged by
``DistributedDataParallel``. Every rank runs the same number of steps per epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as torch_dist
from torch import nn

from starfish_plugin.errors import ConfigError

if TYPE_CHECKING:  # only a type here: runtime sits below data
    from starfish_plugin.data.calibration import CalibrationData


@dataclass(frozen=True)
class DistContext:
    """This process's place in the process group (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1
    sharded: bool = False  # the model is already FSDP2-sharded (strategy="fsdp"): no DDP around it

    @property
    def active(self) -> bool:
        return self.world > 1

    def shard(self, data: CalibrationData) -> CalibrationData:
        """This rank's samples: every ``world``-th one, starting at ``rank``."""
        if not self.active:
            return data
        return data.shard(self.rank, self.world)

    def batch_size(self, global_batch: int) -> int:
        """Samples per rank per step."""
        return math.ceil(global_batch / self.world)

    def steps_per_epoch(self, n_total: int, global_batch: int) -> int:
        """The same count on every rank: the largest shard split into per-rank batches."""
        return math.ceil(math.ceil(n_total / self.world) / self.batch_size(global_batch))

    def agree(self, facts: dict[str, str]) -> None:
        """Check that every rank heals the same way (one all-gather); a difference is a
        ``ConfigError`` raised on every rank, before anything trains, instead of ranks that end
        with different weights or a collective that aborts."""
        if not self.active:
            return
        slots: list[object] = [None] * self.world
        torch_dist.all_gather_object(slots, facts)
        gathered = [g if isinstance(g, dict) else {} for g in slots]
        differ = sorted({k for g in gathered for k in facts if g.get(k) != gathered[0].get(k)})
        if differ:
            detail = "; ".join(
                f"{k}: " + ", ".join(f"rank {r} {str(g.get(k))[:80]}" for r, g in enumerate(gathered)) for k in differ
            )
            raise ConfigError(
                f"the {self.world} ranks do not heal the same way ({', '.join(differ)} differ): {detail}. Give "
                "every rank the same settings and the same calibration set (each rank takes its own share)"
            )

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum of ``value`` over ranks (``value`` itself when not distributed)."""
        if self.active:
            value = value.clone()
            torch_dist.all_reduce(value, op=torch_dist.ReduceOp.SUM)
        return value

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """``model`` under ``DistributedDataParallel`` when distributed and not sharded already, else
        ``model`` itself."""
        if not self.active or self.sharded:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [device.index] if device.type == "cuda" and device.index is not None else None
        return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)

    def describe(self, n_local: int, n_total: int, global_batch: int) -> str:
        return (f"distributed: rank {self.rank} of {self.world} ({torch_dist.get_backend()}), {n_local} of "
                f"{n_total} calibration samples, {self.batch_size(global_batch)} per step on this rank")


def dist_context() -> DistContext:
    """The current process group's rank and size, or a single-process context."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        return DistContext(torch_dist.get_rank(), torch_dist.get_world_size())
    return DistContext()
