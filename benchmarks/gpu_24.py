"""CUDA 2:4 semi-structured latency: dense against torchao ``sparsify_(..., semi_sparse_weight())``
with the cuSPARSELt and CUTLASS backends, fp16 and bf16, per ViT-B-sized layer and for a whole
DeiT-B, batch 1 and 32. One script, a few minutes on one GPU; on a CPU-only machine it says it
skipped and writes that to the JSON.

    python -m benchmarks.gpu_24                 # writes benchmarks/results/gpu_24.json

Every sparse output is checked against the same model run densely with its 2:4 zeros.
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F

from benchmarks.common import hardware, median, save

LAYERS = {"qkv 768x2304": (768, 2304), "fc1 768x3072": (768, 3072), "fc2 3072x768": (3072, 768)}
TOKENS = 197


def cuda_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return median(times)


def two_four(weight: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest of every 4 consecutive weights of each row."""
    groups = weight.reshape(weight.shape[0], -1, 4)
    keep = groups.abs().topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return (groups * mask).reshape_as(weight)


def set_backend(cutlass: bool) -> None:
    from torch.sparse import SparseSemiStructuredTensor

    SparseSemiStructuredTensor._FORCE_CUTLASS = cutlass


@torch.inference_mode()
def per_layer(repeats: int) -> list[dict]:
    from torch.sparse import to_sparse_semi_structured

    rows = []
    for dtype in (torch.float16, torch.bfloat16):
        for layer, (fan_in, fan_out) in LAYERS.items():
            w = two_four(torch.randn(fan_out, fan_in, device="cuda", dtype=dtype))
            for images in (1, 32):
                x = torch.randn(images * TOKENS + 3, fan_in, device="cuda", dtype=dtype)  # 200 / 6307 rows
                dense = cuda_ms(lambda: F.linear(x, w), repeats)
                for backend in ("cusparselt", "cutlass"):
                    set_backend(backend == "cutlass")
                    try:
                        sw = to_sparse_semi_structured(w)
                        out = F.linear(x, sw)
                    except (RuntimeError, NotImplementedError) as exc:
                        rows.append({"layer": layer, "dtype": str(dtype), "images": images, "backend": backend,
                                     "error": str(exc)[:200]})
                        continue
                    torch.testing.assert_close(out, F.linear(x, w), rtol=2e-2, atol=2e-2)
                    sparse = cuda_ms(lambda: F.linear(x, sw), repeats)
                    rows.append({"layer": layer, "dtype": str(dtype), "images": images, "backend": backend,
                                 "dense_ms": dense, "sparse_ms": sparse, "speedup": dense / sparse})
                    print(rows[-1], flush=True)
    set_backend(False)
    return rows


@torch.inference_mode()
def whole_model(repeats: int) -> list[dict]:
    import timm
    from torchao.sparsity import semi_sparse_weight, sparsify_

    rows = []
    for dtype in (torch.float16, torch.bfloat16):
        zeros = timm.create_model("deit_base_patch16_224", pretrained=False).eval().to("cuda", dtype)
        for name, module in zeros.named_modules():
            if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in ("qkv", "proj", "fc1", "fc2"):
                module.weight.copy_(two_four(module.weight))
        for backend in ("cusparselt", "cutlass"):
            set_backend(backend == "cutlass")
            sparse = copy.deepcopy(zeros)
            sparsify_(sparse, semi_sparse_weight(),
                      filter_fn=lambda m, n: isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in
                      ("qkv", "proj", "fc1", "fc2"))
            for images in (1, 32):
                x = torch.randn(images, 3, 224, 224, device="cuda", dtype=dtype)
                torch.testing.assert_close(sparse(x), zeros(x), rtol=5e-2, atol=5e-2)
                dense_ms, sparse_ms = cuda_ms(lambda: zeros(x), repeats), cuda_ms(lambda: sparse(x), repeats)
                rows.append({"model": "deit_base_patch16_224", "dtype": str(dtype), "images": images,
                             "backend": backend, "dense_ms": dense_ms, "sparse_ms": sparse_ms,
                             "speedup": dense_ms / sparse_ms})
                print(rows[-1], flush=True)
    set_backend(False)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("skipped: no CUDA GPU on this machine; the 2:4 kernels exist only on CUDA (Ampere or newer)")
        save("gpu_24", {"benchmark": "gpu_24", "skipped": "no CUDA GPU", "hardware": hardware()})
        return
    result = {"benchmark": "gpu_24", "hardware": hardware(), "per_layer": per_layer(args.repeats),
              "whole_model": whole_model(args.repeats // 2)}
    print("saved", save("gpu_24", result))


if __name__ == "__main__":
    main()
