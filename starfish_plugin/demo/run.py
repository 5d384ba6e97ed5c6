"""The embedded default: prune a shipped ViT at 0.8 with torch.nn.utils.prune, heal it, show the table."""

from __future__ import annotations

import copy
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import prune

from starfish_plugin.api import heal
from starfish_plugin.core.evaluate import evaluate
from starfish_plugin.demo.datasets import fashion_mnist_root, load_digits_split, load_fashion_mnist
from starfish_plugin.demo.zoo import load_checkpoint
from starfish_plugin.errors import DemoError

PRUNABLE = ("qkv", "proj", "fc1", "fc2")


@dataclass
class DemoData:
    name: str
    model: str
    calibration: torch.Tensor
    test: tuple[torch.Tensor, torch.Tensor]


def load_demo_data(dataset: str = "auto", n_calibration: int = 1000, seed: int = 0) -> DemoData:
    """Fashion-MNIST when installed (or asked for), scikit-learn's digits otherwise.

    Calibration images come from the training split without their labels; accuracy is measured
    on the whole test split.
    """
    if dataset == "auto":
        dataset = "fashion-mnist" if fashion_mnist_root() is not None else "digits"
    generator = torch.Generator().manual_seed(seed)
    if dataset == "fashion-mnist":
        train_x, _ = load_fashion_mnist("train")
        test = load_fashion_mnist("test")
        model = "vit_fmnist"
    elif dataset == "digits":
        split = load_digits_split()
        train_x, test, model = split["train"][0], split["test"], "vit_digits"
    else:
        raise DemoError(f"dataset must be 'auto', 'fashion-mnist' or 'digits', got {dataset!r}")
    pick = torch.randperm(len(train_x), generator=generator)[: min(n_calibration, len(train_x))]
    return DemoData(dataset, model, train_x[pick], test)


def prune_vit_(model: nn.Module, sparsity: float, layers: tuple[str, ...] = PRUNABLE) -> nn.Module:
    """L1-unstructured ``torch.nn.utils.prune`` of every ``layers`` Linear weight, in place."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in layers:
            prune.l1_unstructured(module, "weight", amount=sparsity)
            # prune leaves `weight` as a non-leaf tensor, which blocks copy.deepcopy(model);
            # the forward pre-hook recomputes it on every call anyway.
            module.weight = module.weight.detach()
    return model


def run_demo(
    dataset: str = "auto",
    sparsity: float = 0.8,
    epochs: int = 10,
    n_calibration: int = 1000,
    seed: int = 0,
    quiet: bool = False,
) -> dict:
    """Prune, heal and evaluate; return the figures the table shows."""
    torch.manual_seed(seed)
    data = load_demo_data(dataset, n_calibration, seed)
    test = list(zip(data.test[0].split(1000), data.test[1].split(1000)))
    dense = load_checkpoint(data.model)
    pruned = prune_vit_(copy.deepcopy(dense), sparsity)
    dense_acc = evaluate(dense, test)
    pruned_acc = evaluate(pruned, test)
    start = time.perf_counter()
    report = heal(pruned, dense, data.calibration, epochs=epochs, seed=seed, quiet=quiet)
    heal_seconds = time.perf_counter() - start
    healed_acc = evaluate(pruned, test)
    return {
        "dataset": data.name,
        "model": data.model,
        "sparsity": sparsity,
        "calibration_images": len(data.calibration),
        "epochs": epochs,
        "test_images": len(data.test[1]),
        "dense_top1": dense_acc,
        "pruned_top1": pruned_acc,
        "healed_top1": healed_acc,
        "retention_pruned": pruned_acc / dense_acc,
        "retention_healed": healed_acc / dense_acc,
        "heal_seconds": heal_seconds,
        "mask_unchanged": report.mask_unchanged,
        "masked_weights_zero": report.masked_weights_zero,
        "mean_block_cosine_before": report.mean_cosine_before,
        "mean_block_cosine_after": report.mean_cosine_after,
        "recipe": report.recipe_applied or "as configured",
        "lr": report.config["lr"],
        "warm_start": report.config["warm_start"],
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
    }


def format_table(result: dict) -> str:
    """The demo's result as a small Markdown table."""
    rows = [
        ("dense", result["dense_top1"], 1.0, "", ""),
        ("pruned", result["pruned_top1"], result["retention_pruned"], f"{result['mean_block_cosine_before']:.4f}", ""),
        (
            "healed (STARFISH)",
            result["healed_top1"],
            result["retention_healed"],
            f"{result['mean_block_cosine_after']:.4f}",
            f"{result['heal_seconds']:.1f}",
        ),
    ]
    head = (
        f"{result['model']} on {result['dataset']} ({result['test_images']} test images), "
        f"{result['sparsity']:.0%} unstructured L1 sparsity (torch.nn.utils.prune), "
        f"{result['calibration_images']} unlabeled calibration images x {result['epochs']} epochs\n\n"
    )
    lines = [
        "| model | top-1 % | retention | mean block cosine | heal s |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {n} | {a:.2f} | {r:.1%} | {c} | {s} |" for n, a, r, c, s in rows]
    tail = (
        f"\n\nmask unchanged: {result['mask_unchanged']}; "
        f"masked weights exactly zero: {result['masked_weights_zero']}; "
        f"recipe: lr={result.get('lr')}, warm_start={result.get('warm_start')!r} (default recipe='auto')"
    )
    return head + "\n".join(lines) + tail


def save(result: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(result, indent=2) + "\n")
