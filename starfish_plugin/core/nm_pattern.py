"""N:M patterns (2:4, 4:8): find the first group that breaks one, or raise naming it."""

from __future__ import annotations

import torch

from starfish_plugin.errors import NMPatternError


def nm_violation(weight: torch.Tensor, n: int = 2, m: int = 4) -> tuple[int, int, int] | None:
    """The first group breaking N:M as ``(row, first column, non-zeros)``, or ``None`` if it is N:M.

    Groups are ``m`` consecutive entries along the last dimension (the input features of a
    Linear weight), as the 2:4 sparse kernels read them.
    """
    if weight.dim() != 2 or weight.shape[-1] % m:
        return (-1, weight.shape[-1], -1)
    counts = (weight.detach() != 0).reshape(weight.shape[0], -1, m).sum(dim=-1)
    bad = (counts > n).nonzero()
    if len(bad) == 0:
        return None
    row, group = (int(v) for v in bad[0])
    return row, group * m, int(counts[row, group])


def check_nm(weight: torch.Tensor, name: str, n: int = 2, m: int = 4) -> None:
    """Raise ``NMPatternError`` naming ``name`` and its first bad group unless ``weight`` is N:M."""
    if weight.dim() != 2:
        raise NMPatternError(f"{name} has shape {tuple(weight.shape)}; {n}:{m} sparsity needs a 2-D weight")
    if weight.shape[-1] % m:
        raise NMPatternError(
            f"{name} has {weight.shape[-1]} input features, not a multiple of {m}; {n}:{m} groups cannot tile it"
        )
    bad = nm_violation(weight, n, m)
    if bad is not None:
        row, col, count = bad
        raise NMPatternError(
            f"{name} is not {n}:{m} sparse: row {row}, columns {col}..{col + m - 1} hold {count} non-zeros "
            f"(at most {n} allowed). Prune it to {n}:{m} first (e.g. WeightNormSparsifier with "
            f"sparse_block_shape=(1, {m}), zeros_per_block={m - n}, sparsity_level=1.0)"
        )
