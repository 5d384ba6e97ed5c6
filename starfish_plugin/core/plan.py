"""``SparsityPlan``: which tensors are pruned, their fixed masks, and how to keep them fixed."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from starfish_plugin.errors import MaskShapeError


@dataclass
class MaskedTensor:
    """One pruned tensor.

    Attributes:
        name: canonical name as in the dense model, e.g. ``"blocks.0.mlp.fc1.weight"``.
        parameter: the tensor that trains (``weight_orig``, ``parametrizations.weight.original``
            or the weight itself).
        mask: boolean, ``True`` where the entry survives; the shape of ``parameter``.
        form: the toolkit form it was read from, e.g. ``"prune_hook"`` or ``"parametrization"``.
        masked_entries: ``"zero"`` if ``parameter`` itself must hold zeros where masked;
            ``"keep"`` if the toolkit multiplies by the mask in forward, so the masked entries of
            ``parameter`` hold stale values that are left exactly as they were.
        effective: returns the weight the model computes with (``parameter * mask`` or the like).
        refresh: recomputes the attribute the model reads (``module.weight`` of a prune hook),
            for models that read a child's weight without calling the child (torchvision Swin's
            attention reads ``qkv.weight``), where the hook never runs and the attribute goes stale.
        owner: the module whose forward recomputes that attribute anyway (its prune hook), if any:
            ``SparsityPlan.skip_refresh_of_called`` drops the refresh of owners the forward calls.
    """

    name: str
    parameter: nn.Parameter
    mask: torch.Tensor
    form: str
    masked_entries: Literal["zero", "keep"] = "keep"
    effective: Callable[[], torch.Tensor] | None = None
    refresh: Callable[[], None] | None = None
    owner: nn.Module | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if tuple(self.mask.shape) != tuple(self.parameter.shape):
            raise MaskShapeError(
                f"mask of {self.name} ({self.form}) has shape {tuple(self.mask.shape)} but the tensor has "
                f"shape {tuple(self.parameter.shape)}; re-create the mask with the tensor's shape"
            )
        if self.mask.dtype != torch.bool:
            self.mask = self.mask != 0

    def effective_weight(self) -> torch.Tensor:
        """The weight the model uses in forward, with masked entries applied."""
        if self.effective is not None:
            return self.effective()
        return self.parameter * self.mask


@dataclass
class SparsityPlan:
    """The pruned tensors of one model, as read by an adapter; the masks it holds stay fixed.

    Attributes:
        entries: one ``MaskedTensor`` per pruned tensor.
        adapter: name of the adapter that read the model.
        structural: ``True`` when pruning changed tensor shapes (e.g. Torch-Pruning).
        notes: what the adapter inferred or assumed, copied into the ``HealReport``.
        kept_out_channels: for structural plans, module name -> original indices of the output
            channels that survive; used to index dense targets when a block's width shrank.
        original_out_channels: module name -> its output width before pruning.
        hint: what the user should do when a record the heal needs is missing.
    """

    entries: list[MaskedTensor]
    adapter: str
    structural: bool = False
    notes: list[str] = field(default_factory=list)
    kept_out_channels: dict[str, torch.Tensor] = field(default_factory=dict)
    original_out_channels: dict[str, int] = field(default_factory=dict)
    hint: str = ""
    _stale: list[MaskedTensor] | None = field(default=None, init=False, repr=False, compare=False)

    def __iter__(self) -> Iterator[MaskedTensor]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    @property
    def sparsity(self) -> float:
        """Fraction of masked entries over all pruned tensors."""
        total = sum(e.mask.numel() for e in self.entries)
        kept = sum(int(e.mask.sum()) for e in self.entries)
        return 1.0 - kept / total if total else 0.0

    def parameters(self) -> list[nn.Parameter]:
        """The trainable tensors, one per entry (deduplicated, in order)."""
        seen: dict[int, nn.Parameter] = {}
        for entry in self.entries:
            seen.setdefault(id(entry.parameter), entry.parameter)
        return list(seen.values())

    def refresh(self) -> None:
        """Recompute every masked attribute the model reads without calling its owner (see
        ``MaskedTensor.refresh``): all of them, until ``skip_refresh_of_called`` narrows it."""
        if self._stale is None:  # once, not on every step
            self._stale = [e for e in self.entries if e.refresh is not None]
        for entry in self._stale:
            if entry.refresh is not None:
                entry.refresh()

    def skip_refresh_of_called(self, called: set[int]) -> int:
        """From now on refresh only entries whose owner is not among ``called`` (module ids a forward
        ran): the others are recomputed by their own prune hook. Returns how many still refresh."""
        self._stale = [
            e for e in self.entries if e.refresh is not None and (e.owner is None or id(e.owner) not in called)
        ]
        return len(self._stale)

    def snapshot(self) -> dict[str, str]:
        """A digest of every mask (shape and bits), to check later that the pattern is bit-identical;
        a digest rather than a copy, which for a large model would cost a byte per weight."""
        return {e.name: _mask_digest(e.mask) for e in self.entries}

    def same_pattern(self, snapshot: dict[str, str]) -> bool:
        """Whether this plan's masks equal ``snapshot`` exactly (same names, shapes and bits)."""
        if set(snapshot) != set(self.names):
            return False
        return all(snapshot[e.name] == _mask_digest(e.mask) for e in self.entries)

    @torch.no_grad()
    def masked_weights_are_zero(self) -> bool:
        """Whether every masked entry of every effective weight is exactly zero."""
        return all(
            not bool(e.effective_weight().detach()[~e.mask].any()) for e in self.entries
        )

    def describe(self) -> str:
        return f"{len(self.entries)} pruned tensors read by '{self.adapter}', {self.sparsity:.1%} sparsity"


def _mask_digest(mask: torch.Tensor) -> str:
    """BLAKE2b of a boolean mask's shape and bits, read in place on the CPU."""
    digest = hashlib.blake2b(str(tuple(mask.shape)).encode(), digest_size=32)
    digest.update(mask.detach().to("cpu", torch.bool).contiguous().numpy().data)
    return digest.hexdigest()
