"""Latency where users serve: the exported pruned (healed) model against the exported dense one in
ONNX Runtime on the CPU, interleaved rounds, medians. ONNX Runtime runs sparse initializers as
dense ones, so a speed-up here comes from smaller shapes (structured pruning), not from zeros."""

from __future__ import annotations

import platform
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from starfish_plugin.deploy.timing import interleaved_times
from starfish_plugin.extras import need
from starfish_plugin.serve.card import layer_sparsity
from starfish_plugin.serve.export import export
from starfish_plugin.serve.onnx_file import ONNX_FILE


def bench_onnxruntime(
    dense: nn.Module, pruned: nn.Module, batch_size: int, image_size: int, channels: int = 3, repeats: int = 30,
    threads: int | None = None,
) -> tuple[dict[str, Any], str]:
    """Export both models to ONNX (checked against PyTorch), time them in one interleaved run, and
    return the figures (``bench``'s JSON contract with ``runtime`` added) and a line to print."""
    ort = need("onnxruntime", "starfish bench --runtime onnxruntime")
    x = torch.randn(batch_size, channels, image_size, image_size, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory(prefix="starfish-ort-") as tmp:
        paths = {name: export(model, Path(tmp) / name, "onnx", example_inputs=x) / ONNX_FILE
                 for name, model in (("dense", dense), ("sparse", pruned))}
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        sessions = {k: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
                    for k, p in paths.items()}
        sizes = {k: p.stat().st_size for k, p in paths.items()}
        feed = x.numpy()
        calls = {k: _runner(s, feed) for k, s in sessions.items()}
        times = interleaved_times(calls, repeats, torch.device("cpu"), warmup=3, abandon=False)
    ms = {k: 1e3 * statistics.median(t) for k, t in times.items()}
    layers = [{"name": name, "sparsity": info["zeros"], "kernel": "onnxruntime", "dense_ms": None, "kernel_ms": None}
              for name, info in layer_sparsity(pruned).items()]
    cpu = platform.processor() or platform.machine()
    result = {
        "runtime": "onnxruntime", "runtime_version": ort.__version__, "device": f"cpu ({cpu})",
        "threads": threads or "onnxruntime default", "batch_size": batch_size, "image_size": image_size,
        "dense_ms": ms["dense"], "sparse_ms": ms["sparse"], "speedup": ms["dense"] / ms["sparse"],
        "repeats": repeats, "onnx_bytes": sizes, "layers": layers,
    }
    text = (f"onnxruntime {ort.__version__}, CPU, batch {batch_size}: dense {ms['dense']:.3f} ms, pruned "
            f"{ms['sparse']:.3f} ms ({ms['dense'] / ms['sparse']:.2f}x; medians of {repeats} interleaved rounds); "
            f"ONNX files {sizes['dense'] / 2**20:.2f} MiB dense, {sizes['sparse'] / 2**20:.2f} MiB pruned")
    return result, text


def _runner(session: Any, feed: Any) -> Callable[[], object]:
    """One call of ``session`` on ``feed``."""
    name = session.get_inputs()[0].name
    return lambda: session.run(None, {name: feed})
