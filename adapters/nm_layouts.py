"""Adapter for N:M semi-structured sparsity (2:4, 4:8) held as plain zeros, with no mask object.

This is what ``sparsifier.squash_mask()`` and torchao's ``apply_fake_sparsity`` leave behind.
A mask is inferred from the exact zeros only when that is safe:

* automatically, when every tensor that has zeros follows one N:M pattern (validated group by
  group: at most N non-zeros in every M consecutive weights of a row), or
* for any zero pattern, when the user opts in with ``infer_masks_from_zeros(model)``.

The report's notes say which applied. Masks read from parametrizations (a sparsifier still
attached) are handled by the ``torch_masks`` adapter; its masks are held fixed too, so N:M
patterns survive healing exactly either way. ``check_nm`` validates a tensor before packing.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from starfish_plugin.errors import StarfishError
from starfish_plugin.hookspecs import hookimpl
from starfish_plugin.masks import MaskedTensor, SparsityPlan

NAME = "nm_layouts"
PATTERNS = ((2, 4), (4, 8))
_OPTED_IN: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


class NMPatternError(StarfishError, ValueError):
    """A tensor that should be N:M sparse is not."""


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


def infer_masks_from_zeros(model: nn.Module) -> nn.Module:
    """Opt in: let ``heal`` treat the exact zeros of ``model``'s Linear/Conv weights as its mask."""
    _OPTED_IN.add(model)
    return model


def _zero_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            weight = getattr(module, "weight", None)  # a Parameter only when no hook/parametrization owns it
            if isinstance(weight, nn.Parameter) and type(weight.data) is torch.Tensor and bool((weight == 0).any()):
                if bool(weight.detach().any()):  # an all-zero tensor has nothing to heal
                    found[f"{name}.weight" if name else "weight"] = weight
    return found


def detect_pattern(weights: dict[str, torch.Tensor]) -> tuple[int, int] | None:
    """The single N:M pattern every tensor follows, or ``None``."""
    for n, m in PATTERNS:
        if weights and all(nm_violation(w, n, m) is None for w in weights.values()):
            return n, m
    return None


def _new_zeros(weights: dict[str, nn.Parameter], dense: nn.Module | None) -> dict[str, nn.Parameter]:
    """Keep the tensors whose zeros were made by pruning: some entry is zero here but not in dense.

    Without a dense model every tensor with zeros is kept. This stops a dense model that merely
    has structural zeros (identity or one-hot layers) from being taken for a pruned one.
    """
    if dense is None:
        return weights
    reference = dict(dense.named_parameters())
    kept = {}
    for name, w in weights.items():
        other = reference.get(name)
        if other is None or other.shape != w.shape or bool(((w == 0) & (other != 0)).any()):
            kept[name] = w
    return kept


@hookimpl(trylast=True)
def starfish_find_masks(model, dense):
    weights = _new_zeros(_zero_weights(model), dense)
    if not weights:
        return None
    pattern = detect_pattern(weights)
    if pattern is None and model not in _OPTED_IN:
        return None
    entries = [MaskedTensor(name, w, w.detach() != 0, "zeros", "zero") for name, w in weights.items()]
    if pattern is not None:
        note = f"mask inferred from exact zeros: {pattern[0]}:{pattern[1]} validated for all {len(entries)} tensors"
    else:
        note = f"mask inferred from exact zeros of {len(entries)} tensors (opted in with infer_masks_from_zeros)"
    return SparsityPlan(entries, NAME, notes=[note])


@hookimpl
def starfish_supported_forms() -> list[str]:
    return [
        "N:M zeros with no mask object (after squash_mask / apply_fake_sparsity): 2:4 or 4:8 validated "
        "for every tensor, or any zeros after nm_layouts.infer_masks_from_zeros(model)"
    ]


@hookimpl
def starfish_write_back(model, plan):
    if plan.adapter != NAME:
        return None
    for entry in plan:  # the zeros were re-applied after every step; check they are all there
        if bool(entry.parameter.detach()[~entry.mask].any()):
            raise NMPatternError(f"{entry.name} lost its zeros during healing")
    return True


class SemiStructuredError(StarfishError, ValueError):
    """A 2:4 sparse kernel cannot take this tensor, or this machine has no such kernel."""


def kernel_shape_constraint(dtype: torch.dtype, backend: str = "cutlass") -> tuple[int, int]:
    """(row multiple, column multiple) a weight must have for torch's 2:4 kernels in ``dtype``."""
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    cls = SparseSemiStructuredTensorCUTLASS if backend == "cutlass" else SparseSemiStructuredTensorCUSPARSELT
    constraints = cls._DTYPE_SHAPE_CONSTRAINTS
    if dtype not in constraints:
        raise SemiStructuredError(
            f"the {backend} 2:4 kernels take {sorted(str(d) for d in constraints)}, not {dtype}; "
            "convert the model with .half() or .bfloat16() first"
        )
    c = constraints[dtype]
    return c.sparse_min_rows, c.sparse_min_cols


def check_packable(weight: torch.Tensor, name: str, backend: str = "cutlass") -> None:
    """Raise unless ``weight`` is 2:4 and has a shape and dtype the 2:4 kernels accept."""
    check_nm(weight, name)
    rows, cols = kernel_shape_constraint(weight.dtype, backend)
    if weight.shape[0] % rows or weight.shape[1] % cols:
        raise SemiStructuredError(
            f"{name} has shape {tuple(weight.shape)}; {backend} 2:4 kernels in {weight.dtype} need the rows to be a "
            f"multiple of {rows} and the columns a multiple of {cols}. Leave this layer dense (filter it out)"
        )


def pack_semi_structured_(model: nn.Module, names: list[str], backend: str = "cusparselt") -> nn.Module:
    """Re-pack the named Linear layers into torchao's 2:4 semi-structured layout, in place.

    Every weight is validated first (2:4 pattern, kernel shape, CUDA present); on any failure
    nothing is modified.
    """
    if backend not in ("cusparselt", "cutlass"):
        raise SemiStructuredError(f"backend must be 'cusparselt' or 'cutlass', got {backend!r}")
    modules = dict(model.named_modules())
    missing = [n for n in names if not isinstance(modules.get(n), nn.Linear)]
    if missing:
        raise SemiStructuredError(f"{missing} are not Linear layers of {type(model).__name__}")
    for name in names:
        check_packable(modules[name].weight, f"{name}.weight", backend)
    if not torch.cuda.is_available() or any(modules[n].weight.device.type != "cuda" for n in names):
        raise SemiStructuredError(
            "2:4 semi-structured kernels run only on CUDA GPUs (Ampere or newer); this "
            + ("machine has no CUDA GPU" if not torch.cuda.is_available() else "model is not on the GPU: .cuda() it")
            + ". Keep the healed model in its masked dense form here"
        )
    if torch.cuda.get_device_capability() < (8, 0):
        raise SemiStructuredError(
            f"2:4 sparse tensor cores need compute capability 8.0 (Ampere) or newer; this GPU has "
            f"{torch.cuda.get_device_capability()}"
        )
    from torch.sparse import SparseSemiStructuredTensor
    from torchao.sparsity import semi_sparse_weight, sparsify_

    previous = SparseSemiStructuredTensor._FORCE_CUTLASS
    SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
    try:
        wanted = set(names)
        sparsify_(model, semi_sparse_weight(), filter_fn=lambda m, fqn: fqn in wanted)
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = previous
    return model
