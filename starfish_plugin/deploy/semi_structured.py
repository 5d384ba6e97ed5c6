"""2:4 semi-structured packing of healed Linear layers for PyTorch's / torchao's sparse kernels
(cuSPARSELt or CUTLASS, fp16/bf16, CUDA only). Every weight is validated before anything changes."""

from __future__ import annotations

import torch
from torch import nn

from starfish_plugin.core.nm_pattern import check_nm
from starfish_plugin.errors import SemiStructuredError


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

    from starfish_plugin.adapters.recipes import torchao_semi_sparse_

    previous = SparseSemiStructuredTensor._FORCE_CUTLASS
    SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
    try:
        torchao_semi_sparse_(model, set(names))
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = previous
    return model
