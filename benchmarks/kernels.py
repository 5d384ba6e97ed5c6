"""Sparse-kernel latency of pruned ViTs: ``starfish bench --kernels auto`` for every pruning kind.

    python -m benchmarks.kernels --model vit_fmnist                      # ~3 min on 2 CPU cores
    python -m benchmarks.kernels --model vit_b --batch 1                 # ViT-B/16 224 px, ~6 min
    python -m benchmarks.kernels --model vit_b --batch 32 --pruning unstructured_0.9 tp_0.5
    python -m benchmarks.kernels --model vit_b --device cuda --dtype float16   # the GPU rows, ~3 min on one H100

Models: the shipped Fashion-MNIST ViT (dim 96, 28 px) and a ViT-B/16-sized timm ViT (86 M
parameters, random weights: timing only). Pruning: L1-unstructured ``torch.nn.utils.prune`` of
every qkv/proj/fc1/fc2 at 50-95 %, torch.ao 2:4 on the same layers, and Torch-Pruning
``MetaPruner`` on MLP hidden units at 30/50 % (a physically smaller model). Each row: per-layer
kernel choice by ``sparsify_for_inference(kernels="auto")``, then the dense model, the pruned
model on dense kernels and on the chosen ones timed end to end, interleaved, medians; the dense
model under ``torch.compile`` in the same interleaved run as the strong baseline. Results:
``benchmarks/results/kernels_<model>_b<batch>.json`` (``gpu_kernels_...`` on CUDA, naming the GPU,
driver and torch version; rows accumulate per pruning).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import warnings

import timm
import torch
from torch import nn

from benchmarks.common import RESULTS, hardware
from benchmarks.recipes import make_vit_pruner, prune_24_
from starfish_plugin.cli.latency import bench_kernels
from starfish_plugin.demo.run import prune_vit_
from starfish_plugin.demo.zoo import load_checkpoint

PRUNINGS = ("unstructured_0.5", "unstructured_0.7", "unstructured_0.8", "unstructured_0.9", "unstructured_0.95",
            "2_4", "tp_0.3", "tp_0.5")
MODELS = {"vit_fmnist": (28, 1), "vit_b": (224, 3)}


def dense_model(name: str) -> nn.Module:
    if name == "vit_fmnist":
        return load_checkpoint("vit_fmnist").eval()
    torch.manual_seed(0)
    return timm.create_model("vit_base_patch16_224", pretrained=False).eval()


def pruned_model(dense: nn.Module, pruning: str, example: torch.Tensor) -> nn.Module:
    model = copy.deepcopy(dense)
    if pruning.startswith("unstructured_"):
        return prune_vit_(model, float(pruning.split("_")[1]))
    if pruning == "2_4":
        return prune_24_(model)
    pruner = make_vit_pruner(model, "mlp", float(pruning.split("_")[1]), example)
    pruner.step()
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, required=True)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--pruning", nargs="+", choices=PRUNINGS, default=list(PRUNINGS))
    parser.add_argument("--repeats", type=int, default=None, help="default 20 (vit_b batch 32: 5)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    size, channels = MODELS[args.model]
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    dense = dense_model(args.model).to(device, dtype)
    prefix = "gpu_kernels" if device.type == "cuda" else "kernels"
    for batch in args.batch:
        repeats = args.repeats or (5 if args.model == "vit_b" and batch > 1 and device.type == "cpu" else 20)
        path = RESULTS / f"{prefix}_{args.model}_b{batch}{'' if dtype == torch.float32 else '_' + args.dtype}.json"
        data = json.loads(path.read_text()) if path.exists() else {"rows": []}
        x = torch.randn(batch, channels, size, size, device=device, dtype=dtype)
        for pruning in args.pruning:
            start = time.perf_counter()
            pruned = pruned_model(dense, pruning, x[:1])
            result, text = bench_kernels(dense, pruned, batch, size, channels, "auto", repeats, args.device,
                                         compile_baseline=not args.no_compile, dtype=dtype)
            result.update(model=args.model, pruning=pruning, wall_seconds=time.perf_counter() - start)
            print(f"== {args.model} batch {batch} {pruning}\n{text}", flush=True)
            data["rows"] = [r for r in data["rows"] if r["pruning"] != pruning] + [result]
            data.update(benchmark="kernels", model=args.model, batch_size=batch, hardware=hardware())
            RESULTS.mkdir(exist_ok=True)
            path.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
