"""Recovery quality: the paper's method comparison on Fashion-MNIST (issue 5, main table).

The shipped ViT (dense 88.14 % on the full test set) is pruned with torch.nn.utils.prune
(L1 unstructured, qkv/proj/fc1/fc2, per layer) and healed with cosine (STARFISH), mse, kl, ce and
cosine+kl under one budget: 1,000 calibration images from the training split x 10 epochs,
AdamW 6e-4 -> 1e-6 cosine, batch 32; 3 seeds (the seed draws the calibration images and their
order). Recorded per run: top-1 on the full 10k test set, per-block cosine before/after, the KL
diagnostics of ``starfish_plugin.evaluate.kl_diagnostics`` before/after on the calibration set,
and heal time.

    python benchmarks/recovery.py main --sparsity 0.8     # ~6 min on 2 CPU cores
    python benchmarks/recovery.py table
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

import starfish_plugin as starfish
from starfish_plugin.data import load_fashion_mnist
from starfish_plugin.demo import prune_vit_
from starfish_plugin.evaluate import kl_diagnostics
from starfish_plugin.zoo import load_checkpoint

from common import RESULTS, hardware, save

SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95)
LOSSES = ("cosine", "mse", "kl", "ce", "cosine+kl")
SEEDS = (0, 1, 2)


def run_main(sparsity: float, n_calibration: int = 1000, epochs: int = 10) -> dict:
    torch.manual_seed(0)
    train_x, train_y = load_fashion_mnist("train")
    test = list(zip(*(t.split(1000) for t in load_fashion_mnist("test"))))
    dense = load_checkpoint("vit_fmnist")
    pruned_base = prune_vit_(copy.deepcopy(dense), sparsity)
    runs = []
    for seed in SEEDS:
        pick = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(1000 + seed))[:n_calibration]
        images, labels = train_x[pick], train_y[pick]
        diag_before = kl_diagnostics(pruned_base, dense, images)
        for loss in LOSSES:
            model = copy.deepcopy(pruned_base)
            start = time.perf_counter()
            report = starfish.heal(model, dense, list(zip(images.split(32), labels.split(32))), loss=loss,
                                   epochs=epochs, seed=seed, quiet=True, diagnostic_samples=n_calibration)
            seconds = time.perf_counter() - start
            runs.append({
                "seed": seed, "loss": loss, "top1": starfish.evaluate(model, test), "heal_seconds": seconds,
                "block_cosine_before": report.block_cosine_before, "block_cosine_after": report.block_cosine_after,
                "kl_before": diag_before, "kl_after": kl_diagnostics(model, dense, images),
                "mask_unchanged": report.mask_unchanged,
            })
            print(f"{sparsity} seed {seed} {loss}: {runs[-1]['top1']:.2f} ({seconds:.0f} s)", flush=True)
    return {
        "benchmark": "recovery_main", "sparsity": sparsity, "dense_top1": starfish.evaluate(dense, test),
        "pruned_top1": starfish.evaluate(pruned_base, test),
        "budget": {"calibration_images": n_calibration, "epochs": epochs, "batch_size": 32, "lr": 6e-4,
                   "min_lr": 1e-6, "source": "training split"},
        "runs": runs, "hardware": hardware(),
    }


def table() -> str:
    head = "| sparsity | pruned | " + " | ".join(LOSSES) + " |"
    lines = [head, "|---" * (len(LOSSES) + 2) + "|"]
    dense = None
    for s in SPARSITIES:
        path = RESULTS / f"recovery_main_{s}.json"
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        dense = data["dense_top1"]
        means = {}
        cells = []
        for loss in LOSSES:
            accs = [r["top1"] for r in data["runs"] if r["loss"] == loss]
            means[loss] = statistics.mean(accs)
            cells.append((loss, f"{means[loss]:.2f} ± {statistics.stdev(accs):.2f}"))
        best = max(means, key=means.get)
        lines.append(f"| {s} | {data['pruned_top1']:.2f} | "
                     + " | ".join(f"**{c}**" if loss == best else c for loss, c in cells) + " |")
    return (f"dense: {dense:.2f}\n\n" if dense is not None else "") + "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("main")
    m.add_argument("--sparsity", type=float, choices=SPARSITIES, required=True)
    sub.add_parser("table")
    args = parser.parse_args()
    if args.command == "main":
        print("saved", save(f"recovery_main_{args.sparsity}", run_main(args.sparsity)))
    else:
        print(table())


if __name__ == "__main__":
    main()
