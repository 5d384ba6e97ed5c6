"""Recovery beyond ViTs: the shipped CNN (``starfish:resnet_fmnist``) pruned three ways and healed.

The dense model is ``starfish_plugin.demo.zoo.load_checkpoint("resnet_fmnist")`` (a ResNet-style CNN,
stem + 3 stages x 2 residual blocks, trained on Fashion-MNIST by
``benchmarks/train_checkpoints.py resnet_fmnist``). Pruning variants, all deterministic:

* ``l1_0.8`` / ``l1_0.9``: ``torch.nn.utils.prune.global_unstructured`` (L1) at 0.8 / 0.9 over the
  weights of every ``Conv2d`` (stem, residual blocks, 1x1 shortcuts); the Linear classifier is left
  dense;
* ``tp_0.5``: Torch-Pruning channel pruning, ``tp.pruner.MetaPruner`` with
  ``MagnitudeImportance(p=2)`` at ``pruning_ratio=0.5`` (classifier ignored), kept channels
  recorded with ``starfish_plugin.adapters.tp_graph.track`` before the step.

Each pruned model is healed with ``starfish.heal`` under the default budget (1,000 unlabeled images
from the training split, 10 epochs, AdamW lr 6e-4 -> 1e-6, batch 32) for seeds 0, 1, 2; the seed
draws the calibration subset and is the heal's seed. ``--blocks explicit`` (default) passes the six
residual blocks ``stages.<i>.<j>``; ``--blocks auto`` passes ``blocks=None`` (the library's block
discovery). Top-1 is measured on the full 10,000-image test set.

    python -m benchmarks.cnn_recovery run --variant l1_0.8      # ~2 min on 2 idle CPU cores
    python -m benchmarks.cnn_recovery run --variant all         # all three, ~8 min on 2 idle cores
    python -m benchmarks.cnn_recovery run --variant tp_0.5 --blocks auto
    python -m benchmarks.cnn_recovery table

Rows accumulate in ``benchmarks/results/cnn_recovery.json``: a run replaces the rows of the same
variant, blocks mode and seed and keeps the others.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
import warnings

import torch
from torch import nn

import starfish_plugin as starfish
from benchmarks.common import RESULTS, hardware
from benchmarks.recipes import prune_l1_global_, prune_tp_
from starfish_plugin.demo.datasets import load_fashion_mnist
from starfish_plugin.demo.zoo import CHECKPOINT_DIR, load_checkpoint

MODEL = "resnet_fmnist"
VARIANTS = {
    "l1_0.8": {"method": "torch.nn.utils.prune.global_unstructured, L1Unstructured", "sparsity": 0.8},
    "l1_0.9": {"method": "torch.nn.utils.prune.global_unstructured, L1Unstructured", "sparsity": 0.9},
    "tp_0.5": {"method": "torch_pruning MetaPruner, MagnitudeImportance(p=2), channel pruning", "sparsity": 0.5},
}
SEEDS = (0, 1, 2)
BUDGET = {"calibration_images": 1000, "epochs": 10, "lr": 6e-4, "batch_size": 32}
OUT = RESULTS / "cnn_recovery.json"
NOTES = {
    "pruned_layers": "every Conv2d weight (stem, residual-block convs, 1x1 shortcut convs); the final Linear "
                     "classifier (head) is not pruned in any variant (excluded from global_unstructured, "
                     "in Torch-Pruning's ignored_layers)",
    "sparsity": "l1_*: fraction of all Conv2d weights zeroed (global threshold); tp_0.5: Torch-Pruning's "
                "pruning_ratio (channels removed per group), parameter fraction removed is reported per row",
    "seeds": "seed s draws the calibration images (randperm of the training split with generator seed 1000 + s) "
             "and is heal's seed; pruning is deterministic and the same for every seed",
    "evaluation": "top-1 %, full Fashion-MNIST test set (10,000 images)",
    "blocks": "explicit: blocks=[the six residual blocks stages.<i>.<j>]; auto: blocks=None (library discovery)",
}


def pruned_copy(dense: nn.Module, variant: str, example: torch.Tensor) -> nn.Module:
    model = copy.deepcopy(dense)
    if variant.startswith("l1_"):
        return prune_l1_global_(model, VARIANTS[variant]["sparsity"])
    return prune_tp_(model, VARIANTS[variant]["sparsity"], example)


def conv_sparsity(model: nn.Module) -> float:
    """Fraction of zeros over every Conv2d's effective weight."""
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, nn.Conv2d)]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run(variant: str, blocks_mode: str, seeds: tuple[int, ...], recipe: str = "paper") -> list[dict]:
    torch.manual_seed(0)
    train_x, _ = load_fashion_mnist("train")
    test = list(zip(*(t.split(1000) for t in load_fashion_mnist("test"))))
    dense = load_checkpoint(MODEL)
    dense_top1 = starfish.evaluate(dense, test)
    blocks = None if blocks_mode == "auto" else dense.block_names()
    rows = []
    for seed in seeds:
        model = pruned_copy(dense, variant, train_x[:1])
        pruned_top1 = starfish.evaluate(model, test)
        sparsity = conv_sparsity(model)
        pick = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(1000 + seed))
        images = train_x[pick[: BUDGET["calibration_images"]]]
        start = time.perf_counter()
        report = starfish.heal(model, dense, images, recipe=recipe, blocks=blocks, epochs=BUDGET["epochs"],
                               lr=BUDGET["lr"], batch_size=BUDGET["batch_size"], seed=seed, quiet=True)
        seconds = time.perf_counter() - start
        rows.append({
            "variant": variant, "method": VARIANTS[variant]["method"], "sparsity": VARIANTS[variant]["sparsity"],
            "blocks_mode": blocks_mode, "blocks": report.blocks, "seed": seed, "recipe": recipe,
            "effective_lr": report.config["lr"], "warm_start": report.config["warm_start"],
            "dense_top1": dense_top1, "pruned_top1": pruned_top1, "healed_top1": starfish.evaluate(model, test),
            "heal_seconds": round(seconds, 2), "train_seconds": round(report.train_seconds, 2),
            "conv_weight_sparsity": round(sparsity, 4),
            "parameters": n_params(model), "dense_parameters": n_params(dense),
            "mean_block_cosine_before": report.mean_cosine_before, "mean_block_cosine_after": report.mean_cosine_after,
            "mask_unchanged": report.mask_unchanged, "masked_weights_zero": report.masked_weights_zero,
            "adapter": report.adapter, "trainable_parameters": report.trainable_parameters,
            # heal_seconds is wall time: on a shared machine it grows with the other jobs' load
            "load_average_1min": round(os.getloadavg()[0], 2),
        })
        r = rows[-1]
        print(f"{variant} blocks={blocks_mode} seed {seed}: dense {dense_top1:.2f} pruned {pruned_top1:.2f} "
              f"healed {r['healed_top1']:.2f} ({seconds:.1f} s, cosine {r['mean_block_cosine_before']:.3f} -> "
              f"{r['mean_block_cosine_after']:.3f})", flush=True)
    return rows


def save_rows(rows: list[dict]) -> None:
    data = json.loads(OUT.read_text()) if OUT.exists() else {"rows": []}
    def key(r: dict) -> tuple:
        return r["variant"], r["blocks_mode"], r["seed"], r.get("recipe", "paper")

    replaced = {key(r) for r in rows}
    kept = [r for r in data["rows"] if key(r) not in replaced]
    meta = json.loads((CHECKPOINT_DIR / f"{MODEL}.json").read_text())
    data.update({
        "benchmark": "cnn_recovery",
        "model": f"starfish:{MODEL}",
        "model_test_top1_metadata": meta["test_top1"],
        "budget": {**BUDGET, "min_lr": 1e-6, "source": "training split, unlabeled", "loss": "cosine"},
        "notes": NOTES,
        "platform_processor": platform.processor(),
        "torch": torch.__version__,
        "hardware": hardware(),
        "rows": kept + rows,
    })
    RESULTS.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(data, indent=2) + "\n")
    print("saved", OUT)


def _cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def table() -> str:
    data = json.loads(OUT.read_text())
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in data["rows"]:
        mode = r["blocks_mode"] + ("" if r.get("recipe", "paper") == "paper" else f", recipe {r['recipe']}")
        groups.setdefault((r["variant"], mode), []).append(r)
    lines = ["| variant | sparsity | blocks | seeds | params | dense | pruned | healed | recovered "
             "| heal s, median (min-max) |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    order = list(VARIANTS)
    for (variant, mode), rows in sorted(groups.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1])):
        dense, pruned = rows[0]["dense_top1"], statistics.mean(r["pruned_top1"] for r in rows)
        healed = [r["healed_top1"] for r in rows]
        share = 100 * (statistics.mean(healed) - pruned) / (dense - pruned) if dense != pruned else float("nan")
        seconds = [r["heal_seconds"] for r in rows]
        lines.append(
            f"| {variant} | {rows[0]['sparsity']} | {mode} | {len(rows)} | {rows[0]['parameters']:,} | {dense:.2f} | "
            f"{_cell([r['pruned_top1'] for r in rows])} | {_cell(healed)} | {share:.0f} % | "
            f"{statistics.median(seconds):.0f} ({min(seconds):.0f}-{max(seconds):.0f}) |"
        )
    head = (f"{data['model']}, {data['budget']['calibration_images']} calibration images x "
            f"{data['budget']['epochs']} epochs; top-1 % on 10,000 test images, mean ± std over seeds; "
            f"'recovered' = (healed - pruned) / (dense - pruned). {data['hardware']['cpu']}, "
            f"{data['hardware']['torch_threads']} threads, torch {data['torch']}; heal seconds are wall time "
            f"(1-min load average at the end of each heal: "
            f"{min(r['load_average_1min'] for r in data['rows']):.1f}-"
            f"{max(r['load_average_1min'] for r in data['rows']):.1f}).")
    return head + "\n\n" + "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--variant", choices=[*VARIANTS, "all"], required=True)
    r.add_argument("--blocks", choices=("explicit", "auto"), default="explicit",
                   help="explicit: the six residual blocks; auto: blocks=None (library discovery)")
    r.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="comma-separated, default 0,1,2")
    r.add_argument("--recipe", choices=("paper", "auto"), default="paper",
                   help="paper: the budget's lr 6e-4, no warm start; auto: the library default's rule")
    sub.add_parser("table")
    args = parser.parse_args()
    if args.command == "table":
        print(table())
        return
    warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
    seeds = tuple(int(s) for s in args.seeds.split(","))
    for variant in VARIANTS if args.variant == "all" else [args.variant]:
        save_rows(run(variant, args.blocks, seeds, args.recipe))


if __name__ == "__main__":
    main()
