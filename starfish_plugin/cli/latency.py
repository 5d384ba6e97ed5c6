"""``starfish bench``: the pruned model on its fastest sparse kernels against the dense model."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torch
from torch import nn

from starfish_plugin.deploy.selection import sparsify_for_inference
from starfish_plugin.deploy.timing import interleaved_times


def bench_kernels(
    dense: nn.Module, pruned: nn.Module, batch_size: int, image_size: int, channels: int = 3,
    kernels: str = "auto", repeats: int = 30, device: str = "cpu", compile_baseline: bool = False,
) -> tuple[dict[str, Any], str]:
    """Per-layer kernel choice for ``pruned`` on one random batch, then the dense model, the pruned
    model on dense kernels and on the chosen ones timed end to end, interleaved. Returns the JSON
    figures and a printable table."""
    target = torch.device(device)
    x = torch.randn(batch_size, channels, image_size, image_size)
    sparse, report = sparsify_for_inference(pruned, x, device=target, kernels=kernels, repeats=repeats,
                                            compile_baseline=compile_baseline)
    dense = dense.to(target).eval()
    x = x.to(target)
    with torch.inference_mode():
        times = interleaved_times({"dense": lambda: dense(x), "sparse": lambda: sparse(x)}, repeats, target,
                                  warmup=3, abandon_after=repeats + 1)
    dense_ms, sparse_ms = (1e3 * statistics.median(times[k]) for k in ("dense", "sparse"))
    result = {
        **report.to_dict(),
        "dense_ms": dense_ms, "sparse_ms": sparse_ms, "speedup": dense_ms / sparse_ms,
        "pruned_dense_kernels_ms": report.dense_ms, "pruned_chosen_kernels_ms": report.sparse_ms,
        "image_size": image_size,
        "nonzero_parameters": {"dense": _nonzero(dense), "pruned": _nonzero(sparse)},
    }
    if report.compiled_dense_ms is not None:
        result["speedup_vs_compiled_dense"] = report.compiled_dense_ms / report.sparse_ms
    text = report.summary() + (
        f"\nagainst the dense model (--dense), same run: {dense_ms:.3f} ms -> {sparse_ms:.3f} ms, "
        f"{dense_ms / sparse_ms:.2f}x end to end"
    )
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
