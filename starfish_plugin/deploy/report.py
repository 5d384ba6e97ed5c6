"""What ``sparsify_for_inference`` measured and chose, per layer and end to end."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class LayerChoice:
    """One pruned layer: its candidates' median milliseconds, the kernel chosen, why others were not tried."""

    name: str
    sparsity: float
    kernel: str
    dense_ms: float
    kernel_ms: float
    candidates: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.kernel_ms if self.kernel_ms else float("nan")


@dataclass
class InferenceReport:
    """End-to-end medians of the model with dense kernels and with the chosen ones, on one input."""

    device: str
    hardware: str
    batch_size: int
    dtype: str
    kernels: str
    repeats: int
    dense_ms: float
    sparse_ms: float
    layers: list[LayerChoice]
    max_abs_error: float
    outputs_match: bool
    compiled_dense_ms: float | None = None
    reverted: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.sparse_ms

    @property
    def swapped(self) -> dict[str, str]:
        """Layer name -> kernel, for every layer that was swapped."""
        return {layer.name: layer.kernel for layer in self.layers if layer.kernel != "dense"}

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: ``device``, ``batch_size``, ``dense_ms``, ``sparse_ms``, ``speedup`` and
        ``layers`` (``{name, sparsity, kernel, dense_ms, kernel_ms, ...}``), and the rest."""
        data = asdict(self)
        data["speedup"] = self.speedup
        if self.compiled_dense_ms is not None:
            data["speedup_vs_compiled_dense"] = self.compiled_dense_ms / self.sparse_ms
        return data

    def summary(self) -> str:
        lines = [f"{'layer':<40} {'sparsity':>8} {'kernel':<28} {'dense ms':>9} {'kernel ms':>9} {'speedup':>7}"]
        for layer in self.layers:
            lines.append(f"{layer.name:<40} {layer.sparsity:>8.1%} {layer.kernel:<28} {layer.dense_ms:>9.3f} "
                         f"{layer.kernel_ms:>9.3f} {layer.speedup:>6.2f}x")
        lines.append(
            f"end to end on {self.device} ({self.hardware}), batch {self.batch_size}, {self.dtype}, medians of "
            f"{self.repeats}: dense kernels {self.dense_ms:.3f} ms -> chosen kernels {self.sparse_ms:.3f} ms, "
            f"{self.speedup:.2f}x"
        )
        if self.compiled_dense_ms is not None:
            lines.append(f"dense model under torch.compile: {self.compiled_dense_ms:.3f} ms "
                         f"({self.compiled_dense_ms / self.sparse_ms:.2f}x of it)")
        lines.append(f"outputs against the dense-kernel model: max abs error {self.max_abs_error:.2e} "
                     f"({'within' if self.outputs_match else 'BEYOND'} tolerance)")
        lines += self.notes
        return "\n".join(lines)
