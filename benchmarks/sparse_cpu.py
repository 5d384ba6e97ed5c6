"""CPU latency of unstructured sparsity with real sparse kernels: torch CSR matmul, sparse operand
on the left (``torch.sparse.mm(W_csr, x.T)``), against dense ``F.linear`` in the same run.

    python -m benchmarks.sparse_cpu            # writes benchmarks/results/sparse_cpu.json

Per layer: ViT-B-sized Linear weights (qkv 768->2304, fc1 768->3072, fc2 3072->768) on the
tokens of 1 and 32 images (197 tokens each), sparsity 50 % to 95 % (L1 magnitude).
End to end: the Fashion-MNIST ViT with its qkv/proj/fc1/fc2 pruned and every pruned Linear
swapped for a CSR kernel, against the same model run densely with its zeros.
Medians over interleaved repeats; every sparse output is checked against the dense one.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from benchmarks.common import hardware, median, save
from starfish_plugin.demo.run import prune_vit_
from starfish_plugin.demo.zoo import load_checkpoint
from starfish_plugin.deploy.kernels import build_kernel

SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95)
LAYERS = {"qkv 768x2304": (768, 2304), "fc1 768x3072": (768, 3072), "fc2 3072x768": (3072, 768)}
TOKENS = 197


def to_csr_(model: nn.Module, names: tuple[str, ...] = ("qkv", "proj", "fc1", "fc2")) -> nn.Module:
    """Swap every Linear called one of ``names`` for the product's ``CSRLinear``, in place."""
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child_name in names:
                setattr(parent, child_name, build_kernel("csr", child))
    return model


def _median_pair(fa, fb, repeats: int) -> tuple[float, float]:
    for _ in range(2):
        fa(), fb()
    ta, tb = [], []
    for _ in range(repeats):
        for fn, times in ((fa, ta), (fb, tb)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return median(ta), median(tb)


@torch.inference_mode()
def per_layer(repeats: int) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    for layer, (fan_in, fan_out) in LAYERS.items():
        weight = torch.randn(fan_out, fan_in, generator=gen) * fan_in**-0.5
        for images in (1, 32):
            x = torch.randn(images * TOKENS, fan_in, generator=gen)
            for s in SPARSITIES:
                threshold = weight.abs().flatten().kthvalue(int(s * weight.numel())).values
                w = torch.where(weight.abs() > threshold, weight, torch.zeros(()))
                csr = w.to_sparse_csr()
                dense_out, sparse_out = F.linear(x, w), torch.sparse.mm(csr, x.t()).t()
                torch.testing.assert_close(sparse_out, dense_out, rtol=1e-4, atol=1e-4)
                d, sp = _median_pair(lambda: F.linear(x, w), lambda: torch.sparse.mm(csr, x.t()).t(),
                                     repeats if images == 1 else max(5, repeats // 4))
                rows.append({"layer": layer, "images": images, "rows": images * TOKENS, "sparsity": s,
                             "dense_ms": 1e3 * d, "csr_ms": 1e3 * sp, "speedup": d / sp})
                print(rows[-1], flush=True)
    return rows


@torch.inference_mode()
def end_to_end(repeats: int) -> list[dict]:
    rows = []
    base = load_checkpoint("vit_fmnist").eval()
    for s in SPARSITIES:
        zeros = prune_vit_(copy.deepcopy(base), s)
        for module in zeros.modules():
            if prune.is_pruned(module) and hasattr(module, "weight_mask"):
                prune.remove(module, "weight")
        sparse = to_csr_(copy.deepcopy(zeros))
        for images in (1, 32):
            x = torch.randn(images, 1, 28, 28)
            torch.testing.assert_close(sparse(x), zeros(x), rtol=1e-4, atol=1e-4)
            d, sp = _median_pair(lambda: zeros(x), lambda: sparse(x), repeats)
            rows.append({"model": "vit_fmnist (dim 96)", "images": images, "sparsity": s,
                         "dense_ms": 1e3 * d, "csr_ms": 1e3 * sp, "speedup": d / sp})
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args()
    result = {"benchmark": "sparse_cpu", "dtype": "float32", "kernel": "torch.sparse.mm(CSR weight, x^T)",
              "hardware": hardware(), "per_layer": per_layer(args.repeats), "end_to_end": end_to_end(args.repeats)}
    print("saved", save("sparse_cpu", result))


if __name__ == "__main__":
    main()
