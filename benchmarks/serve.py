"""Serving: ONNX Runtime latency and on-disk size of healed exports against their dense models.

Cases (fixed before any result was seen, issue 30): the shipped ``vit_fmnist`` and
``resnet_fmnist``, each pruned three ways and healed 1 epoch on 512 Fashion-MNIST training images
(scikit-learn's digits if Fashion-MNIST is missing, with the digits ViT):

- ``unstructured 90 %``: global magnitude over the blocks' Linear/Conv weights (torch.nn.utils.prune);
- ``Torch-Pruning 30 %`` and ``50 %``: ``MetaPruner`` (L2 group magnitude), healed through
  ``starfish.attach``: the ViT's MLP hidden units, the ResNet's channels (classifier kept).

Each healed model and its dense model are exported to ONNX (``starfish.export``, checked against
PyTorch in ONNX Runtime) and timed in one interleaved ONNX Runtime run on the CPU at batch 1 and
32 (medians over 50 / 20 rounds). ``sizes`` writes the on-disk size of every export form of each
case and of the shipped language model (``hf``: dense, 50 % unstructured, Torch-Pruning MLP 50 %).

    python -m benchmarks.serve latency     # -> results/serve_latency.json  (~5 min on 2 cores)
    python -m benchmarks.serve sizes       # -> results/export_sizes.json
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune

import starfish_plugin as starfish
from benchmarks.common import RESULTS, hardware
from starfish_plugin.demo.run import load_demo_data
from starfish_plugin.demo.zoo import load_checkpoint

PRUNINGS = ("unstructured 90 %", "Torch-Pruning 30 %", "Torch-Pruning 50 %")
BATCHES = {1: 50, 32: 20}  # batch -> timed rounds
HEAL = {"epochs": 1, "batch_size": 32, "quiet": True}


def _data() -> tuple[str, torch.Tensor]:
    data = load_demo_data("auto", n_calibration=512, seed=0)
    return data.name, data.calibration


def _models(dataset: str) -> dict[str, str]:
    vit = "vit_fmnist" if dataset == "fashion-mnist" else "vit_digits"
    return {"ViT": vit, "ResNet": "resnet_fmnist"} if dataset == "fashion-mnist" else {"ViT": vit}


def _tp_setup(model: nn.Module, kind: str) -> list[nn.Module]:
    if kind == "ViT":  # MLP hidden units only
        ignored: list[nn.Module] = [model.head, model.patch_embed.proj]
        for block in model.blocks:
            ignored += [block.attn.qkv, block.attn.proj, block.mlp.fc2]
        return ignored
    return [model.head]


def healed_case(kind: str, name: str, pruning: str, images: torch.Tensor) -> tuple[nn.Module, nn.Module, Any]:
    """The dense model and its pruned copy, healed; and the heal's report."""
    dense = load_checkpoint(name)
    pruned = copy.deepcopy(dense)
    if pruning.startswith("unstructured"):
        parts = pruned.blocks if kind == "ViT" else pruned.stages
        weights = [(m, "weight") for m in parts.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        prune.global_unstructured(weights, pruning_method=prune.L1Unstructured, amount=0.9)
        return dense, pruned, starfish.heal(pruned, dense, images, **HEAL)
    import torch_pruning as tp

    ratio = 0.3 if "30" in pruning else 0.5
    pruner = tp.pruner.MetaPruner(pruned, images[:2], importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=ratio, ignored_layers=_tp_setup(pruned, kind))
    attachment = starfish.attach(pruner, dense, images, **HEAL)
    pruner.step()
    return dense, pruned, attachment.reports[-1]


def latency() -> None:
    from starfish_plugin.serve.ort_latency import bench_onnxruntime

    dataset, images = _data()
    rows = []
    for kind, name in _models(dataset).items():
        for pruning in PRUNINGS:
            dense, pruned, report = healed_case(kind, name, pruning, images)
            size, channels = images.shape[-1], images.shape[1]
            for batch, repeats in BATCHES.items():
                result, text = bench_onnxruntime(dense, pruned, batch, size, channels, repeats)
                print(f"{kind} {pruning} batch {batch}: {text}", flush=True)
                rows.append({"model": name, "kind": kind, "pruning": pruning, "batch_size": batch,
                             "dense_ms": result["dense_ms"], "sparse_ms": result["sparse_ms"],
                             "speedup": result["speedup"], "onnx_bytes": result["onnx_bytes"],
                             "held_out_before": report.held_out_before, "held_out_after": report.held_out_after,
                             "runtime_version": result["runtime_version"], "repeats": repeats})
    _save("serve_latency.json", {"rows": rows, "dataset": dataset, "command": "python -m benchmarks.serve latency",
                                 "timing": "ONNX Runtime CPUExecutionProvider, default threads, interleaved rounds, "
                                           "medians"})


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def sizes() -> None:
    dataset, images = _data()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind, name in _models(dataset).items():
            for pruning in PRUNINGS:
                dense, pruned, report = healed_case(kind, name, pruning, images)
                for fmt in ("onnx", "torch"):
                    extra = {"example_inputs": images[:1]} if fmt == "onnx" else {"model_spec": f"starfish:{name}"}
                    d = starfish.export(dense, Path(tmp) / f"{name}-dense-{fmt}", fmt, overwrite=True, **extra)
                    p = starfish.export(pruned, Path(tmp) / f"{name}-{fmt}", fmt, overwrite=True, report=report,
                                        **extra)
                    rows.append({"model": name, "pruning": pruning, "format": fmt, "dense_bytes": _dir_bytes(d),
                                 "pruned_bytes": _dir_bytes(p)})
        rows += _language_sizes(Path(tmp))
    _save("export_sizes.json", {"rows": rows, "command": "python -m benchmarks.serve sizes",
                                "note": "whole export directory (model files, starfish.json, README.md)"})


def _language_sizes(tmp: Path) -> list[dict[str, Any]]:
    from starfish_plugin.adapters.recipes import prune_llama_mlp_width_
    from starfish_plugin.demo.text import load_text_checkpoint

    dense, _, _ = load_text_checkpoint()
    dense_dir = starfish.export(dense, tmp / "lm-dense", "hf")
    rows = []
    for pruning in ("unstructured 50 %", "Torch-Pruning MLP 50 %"):
        pruned = copy.deepcopy(dense)
        if pruning.startswith("unstructured"):
            linears = [(m, "weight") for m in pruned.model.layers.modules() if isinstance(m, nn.Linear)]
            prune.global_unstructured(linears, pruning_method=prune.L1Unstructured, amount=0.5)
        else:
            prune_llama_mlp_width_(pruned, torch.randint(0, 100, (1, 16)), 0.5)
        out = starfish.export(pruned, tmp / f"lm-{len(rows)}", "hf")
        rows.append({"model": "kjv_llama", "pruning": pruning, "format": "hf", "dense_bytes": _dir_bytes(dense_dir),
                     "pruned_bytes": _dir_bytes(out)})
    return rows


def _save(name: str, record: dict[str, Any]) -> None:
    record["hardware"] = hardware()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / name).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {RESULTS / name}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["latency", "sizes"])
    args = parser.parse_args(argv)
    latency() if args.command == "latency" else sizes()


if __name__ == "__main__":
    main()
