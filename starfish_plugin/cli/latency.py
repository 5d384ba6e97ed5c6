"""``starfish bench``: the pruned model on its fastest sparse kernels against the dense model."""

from __future__ import annotations

import statistics
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from starfish_plugin.deploy.selection import sparsify_for_inference
from starfish_plugin.deploy.timing import interleaved_times


def bench_kernels(
    dense: nn.Module, pruned: nn.Module, batch_size: int, image_size: int, channels: int = 3,
    kernels: str = "auto", repeats: int = 30, device: str = "cpu", compile_baseline: bool = False,
    dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, Any], str]:
    """Per-layer kernel choice for ``pruned`` on one random batch, then, in one interleaved run, the
    dense model, the pruned model on dense kernels and on the chosen ones (and the dense model under
    ``torch.compile`` if asked). Returns the JSON figures and a printable table."""
    from starfish_plugin.deploy.fold import folded_copy

    target = torch.device(device)
    x = torch.randn(batch_size, channels, image_size, image_size)
    sparse, report = sparsify_for_inference(pruned, x, device=target, kernels=kernels, repeats=repeats, dtype=dtype)
    dense = dense.to(target, dtype).eval()
    folded = folded_copy(pruned).to(target, dtype).eval()
    x = x.to(target, dtype)
    models: dict[str, Any] = {"dense": dense, "pruned_dense_kernels": folded, "sparse": sparse}
    if compile_baseline:
        models["compiled_dense"] = torch.compile(dense)
    with torch.inference_mode():
        times = interleaved_times({k: partial(m, x) for k, m in models.items()}, repeats, target, warmup=2,
                                  abandon=False)
    ms = {k: 1e3 * statistics.median(t) for k, t in times.items()}
    result = {
        **report.to_dict(),
        "dense_ms": ms["dense"], "sparse_ms": ms["sparse"], "speedup": ms["dense"] / ms["sparse"],
        "pruned_dense_kernels_ms": ms["pruned_dense_kernels"], "image_size": image_size,
        "selection": {"dense_kernels_ms": report.dense_ms, "chosen_kernels_ms": report.sparse_ms},
        "nonzero_parameters": {"dense": _nonzero(dense), "pruned": _nonzero(folded)},  # packed 2:4 cannot compare
    }
    text = report.summary() + (
        f"\nsame run, interleaved: dense model (--dense) {ms['dense']:.3f} ms, pruned on dense kernels "
        f"{ms['pruned_dense_kernels']:.3f} ms, on the chosen kernels {ms['sparse']:.3f} ms: "
        f"{ms['dense'] / ms['sparse']:.2f}x end to end against the dense model"
    )
    if compile_baseline:
        result["compiled_dense_ms"] = ms["compiled_dense"]
        result["speedup_vs_compiled_dense"] = ms["compiled_dense"] / ms["sparse"]
        text += f"; the dense model under torch.compile {ms['compiled_dense']:.3f} ms"
    return result, text


def _nonzero(model: nn.Module) -> int:
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.layout == torch.strided:
            if tensor.is_floating_point():
                total += int((tensor != 0).sum())
        elif tensor.layout in (torch.sparse_csr, torch.sparse_bsr):
            total += int((tensor.values() != 0).sum())
    return total


def plot_layers(result: dict[str, Any], path: str | Path) -> None:
    """Per-layer speedup bars (kernel over dense) and the end-to-end figure, as a PNG."""
    from starfish_plugin.extras import need

    need("matplotlib", "starfish bench --plot").use("Agg")
    plt = need("matplotlib.pyplot", "starfish bench --plot")

    layers = result["layers"]
    names = [layer["name"] for layer in layers]
    speedups = [layer["dense_ms"] / layer["kernel_ms"] for layer in layers]
    colors = ["tab:green" if layer["kernel"] != "dense" else "tab:gray" for layer in layers]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(names) + 2), 4))
    ax.bar(range(len(names)), speedups, color=colors)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(result["speedup"], color="tab:blue", linestyle="--",
               label=f"end to end {result['speedup']:.2f}x (dense {result['dense_ms']:.2f} ms)")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    ax.set_ylabel("speedup over dense (x)")
    ax.set_title(f"{result['device']} ({result['hardware']}), batch {result['batch_size']}, kernels={result['kernels']}"
                 "\ngreen: swapped, gray: kept dense", fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
