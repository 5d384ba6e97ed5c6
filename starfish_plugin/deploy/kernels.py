"""Inference implementations of a pruned ``nn.Linear``: CSR, BSR, 2:4 semi-structured and compact.

Each takes the layer's folded weight (the mask already applied) and computes the same output as
``F.linear`` within the dtype's tolerance. Each also writes and reads its own state dict entries
(a CSR weight of any number of non-zeros, a re-packed 2:4 weight), so a swapped model can be saved
and loaded weights-only (``deploy.files``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from starfish_plugin.errors import KernelError, SemiStructuredError

#: the candidate names ``sparsify_for_inference`` and ``starfish bench --kernels`` accept
KERNEL_NAMES = ("csr", "bsr", "compact", "semi-structured-cusparselt", "semi-structured-cutlass")
BSR_BLOCKS = (32, 16, 8)
#: a layer is a BSR candidate when at least this share of its blocks is entirely zero
BSR_MIN_ZERO_BLOCKS = 0.5
#: a layer is a compact candidate when at least this share of its rows or columns is entirely zero
COMPACT_MIN_ZERO_LINES = 0.1


class KernelLinear(nn.Module):
    """Base of the swapped layers: a Linear's shape, its bias, and state dict entries of any size."""

    kernel: ClassVar[str]
    weight: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def spec(self) -> dict[str, Any]:
        """What ``from_spec`` needs to rebuild an empty layer of this kind (JSON-able)."""
        return {"kernel": self.kernel, "in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> KernelLinear:
        """An empty layer of this kind, filled by ``load_state_dict``."""
        weight = torch.zeros(spec["out_features"], spec["in_features"])
        bias = torch.zeros(spec["out_features"]) if spec["bias"] else None
        return cls.from_weight(weight, bias, **{k: v for k, v in spec.items() if k not in _SHAPE_KEYS})

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, **options: Any) -> KernelLinear:
        raise NotImplementedError

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # a sparse weight's number of non-zeros differs from the placeholder's: take the tensors as they are
        for name in self._buffers:
            key = prefix + name
            if key in state_dict:
                self._buffers[name] = state_dict[key]
            elif self._buffers[name] is not None:
                missing_keys.append(key)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"


_SHAPE_KEYS = ("kernel", "in_features", "out_features", "bias")


class _LeftSparseLinear(KernelLinear):
    """``W @ x^T`` with ``W`` a sparse matrix on the left: torch's fast sparse-dense product order
    (``F.linear`` with a sparse weight is several times slower)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out = torch.sparse.mm(self.weight, flat.t()).t()
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


class CSRLinear(_LeftSparseLinear):
    """The weight in compressed sparse row form (CPU and CUDA)."""

    kernel = "csr"

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, **options: Any) -> CSRLinear:
        layer = cls(weight.shape[1], weight.shape[0], bias)
        layer.register_buffer("weight", weight.detach().to_sparse_csr())
        return layer


class BSRLinear(_LeftSparseLinear):
    """The weight in block sparse row form: for masks that zero whole square blocks."""

    kernel = "bsr"

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None, blocksize: int) -> None:
        super().__init__(in_features, out_features, bias)
        self.blocksize = blocksize

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "blocksize": self.blocksize}

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, **options: Any) -> BSRLinear:
        blocksize = int(options.get("blocksize") or bsr_blocksize(weight) or 0)
        if not blocksize or weight.shape[0] % blocksize or weight.shape[1] % blocksize:
            raise KernelError(f"a weight of shape {tuple(weight.shape)} has no zero-block structure BSR can use "
                              f"(blocks {BSR_BLOCKS}); leave the layer dense or use CSR")
        layer = cls(weight.shape[1], weight.shape[0], bias, blocksize)
        layer.register_buffer("weight", weight.detach().to_sparse_bsr((blocksize, blocksize)))
        return layer


def bsr_blocksize(weight: torch.Tensor) -> int | None:
    """The largest block size in ``BSR_BLOCKS`` whose all-zero blocks are at least
    ``BSR_MIN_ZERO_BLOCKS`` of the weight's blocks, or None."""
    rows, cols = weight.shape
    for b in BSR_BLOCKS:
        if rows % b or cols % b:
            continue
        blocks = (weight != 0).reshape(rows // b, b, cols // b, b).any(dim=3).any(dim=1)
        if 1 - blocks.float().mean().item() >= BSR_MIN_ZERO_BLOCKS:
            return b
    return None


class CompactLinear(KernelLinear):
    """Only the rows (outputs) and columns (inputs) that hold a non-zero: a physically smaller
    matmul; the outputs of all-zero rows are the bias."""

    kernel = "compact"
    rows: torch.Tensor
    columns: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if self.columns.numel() < self.in_features:
            flat = flat.index_select(1, self.columns)
        small = F.linear(flat, self.weight)
        if self.rows.numel() == self.out_features:
            out = small
        else:
            out = flat.new_zeros(flat.shape[0], self.out_features).index_copy_(1, self.rows, small)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, **options: Any) -> CompactLinear:
        layer = cls(weight.shape[1], weight.shape[0], bias)
        nonzero = weight.detach() != 0
        rows = nonzero.any(dim=1).nonzero().flatten()
        columns = nonzero.any(dim=0).nonzero().flatten()
        layer.register_buffer("rows", rows)
        layer.register_buffer("columns", columns)
        layer.register_buffer("weight", weight.detach()[rows][:, columns].contiguous())
        return layer


def zero_line_share(weight: torch.Tensor) -> float:
    """The larger of the shares of all-zero rows and all-zero columns."""
    nonzero = weight != 0
    return max(1 - nonzero.any(dim=1).float().mean().item(), 1 - nonzero.any(dim=0).float().mean().item())


class SemiStructuredLinear(KernelLinear):
    """The weight packed for NVIDIA's 2:4 sparse tensor cores (CUDA, fp16/bf16, Ampere or newer),
    through cuSPARSELt or CUTLASS. Saved as the dense 2:4 weight and re-packed when loaded."""

    kernel = "semi-structured"

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None, backend: str) -> None:
        super().__init__(in_features, out_features, bias)
        self.backend = backend

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "kernel": f"semi-structured-{self.backend}", "backend": self.backend}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> KernelLinear:
        return _PendingSemiStructured(spec["in_features"], spec["out_features"], None, spec["backend"])

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, **options: Any) -> SemiStructuredLinear:
        backend = options.get("backend", "cusparselt")
        layer = cls(weight.shape[1], weight.shape[0], bias, backend)
        layer.weight = pack_24(weight, backend)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        return F.linear(flat, self.weight, self.bias).reshape(*x.shape[:-1], self.out_features)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        destination[prefix + "weight"] = self.weight.to_dense()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias


class _PendingSemiStructured(SemiStructuredLinear):
    """A 2:4 layer rebuilt from a file: packs the weight when ``load_state_dict`` brings it."""

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        if prefix + "weight" not in state_dict:
            missing_keys.append(prefix + "weight")
            return
        self.weight = pack_24(state_dict[prefix + "weight"], self.backend)
        self._buffers["bias"] = state_dict.get(prefix + "bias")
        self.__class__ = SemiStructuredLinear  # type: ignore[assignment]


def pack_24(weight: torch.Tensor, backend: str) -> torch.Tensor:
    """``weight`` packed by torch's 2:4 kernels of ``backend``; checked first (pattern, shape, device)."""
    from starfish_plugin.deploy.semi_structured import check_packable

    if backend not in ("cusparselt", "cutlass"):
        raise SemiStructuredError(f"backend must be 'cusparselt' or 'cutlass', got {backend!r}")
    if weight.device.type != "cuda":
        raise SemiStructuredError("2:4 semi-structured kernels run only on CUDA GPUs (Ampere or newer); "
                                  "keep this layer dense or use CSR on CPU")
    check_packable(weight, "weight", backend)
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    cls = SparseSemiStructuredTensorCUTLASS if backend == "cutlass" else SparseSemiStructuredTensorCUSPARSELT
    return nn.Parameter(cls.from_dense(weight.detach().contiguous()), requires_grad=False)


KERNEL_CLASSES: dict[str, type[KernelLinear]] = {
    "csr": CSRLinear,
    "bsr": BSRLinear,
    "compact": CompactLinear,
    "semi-structured-cusparselt": SemiStructuredLinear,
    "semi-structured-cutlass": SemiStructuredLinear,
}


def build_kernel(name: str, linear: nn.Linear) -> KernelLinear:
    """``linear`` (its weight already folded with its mask) as the kernel ``name``."""
    if name not in KERNEL_CLASSES:
        raise KernelError(f"unknown kernel {name!r}; choose from {', '.join(KERNEL_NAMES)}")
    options = {"backend": name.rsplit("-", 1)[1]} if name.startswith("semi-structured") else {}
    return KERNEL_CLASSES[name].from_weight(linear.weight, linear.bias, **options)


def why_not(name: str, linear: nn.Linear) -> str | None:
    """Why kernel ``name`` cannot serve ``linear`` on its device and dtype, or None if it can."""
    weight = linear.weight
    if name == "csr":
        return None if weight.dtype in (torch.float32, torch.float64) or weight.is_cuda else \
            f"CPU CSR matmul takes float32/float64, not {weight.dtype}"
    if name == "bsr":
        if bsr_blocksize(weight) is None:
            return f"fewer than {BSR_MIN_ZERO_BLOCKS:.0%} all-zero blocks at {BSR_BLOCKS}"
        return None if weight.dtype in (torch.float32, torch.float64) or weight.is_cuda else \
            f"CPU BSR matmul takes float32/float64, not {weight.dtype}"
    if name == "compact":
        share = zero_line_share(weight)
        return None if share >= COMPACT_MIN_ZERO_LINES else \
            f"{share:.0%} all-zero rows/columns (needs {COMPACT_MIN_ZERO_LINES:.0%})"
    if name.startswith("semi-structured"):
        if not weight.is_cuda:
            return "2:4 kernels run only on CUDA"
        if torch.cuda.get_device_capability(weight.device) < (8, 0):
            return "2:4 sparse tensor cores need compute capability 8.0 or newer"
        from starfish_plugin.deploy.semi_structured import check_packable

        try:
            check_packable(weight, "weight", name.rsplit("-", 1)[1])
        except (SemiStructuredError, ValueError) as exc:
            return str(exc).split(";")[0]
        return None
    return f"unknown kernel {name!r}"
