"""Structured (CORP-like) panel: Torch-Pruning removes MLP units, or MLP units and attention heads,
of the Fashion-MNIST ViT; heal with cosine (STARFISH), KL and CE under one budget; 3 seeds.

    python -m benchmarks.structured heal --panel mlp --ratio 0.5     # ~3 min on 2 CPU cores
    python -m benchmarks.structured latency                          # CPU latency, dense vs pruned
    python -m benchmarks.results_page                                # the docs' tables from the JSON

Budget (same for every loss): 1,000 calibration images from the training split x 10 epochs,
AdamW 6e-4 -> 1e-6 cosine, batch 32. Seeds change which calibration images are drawn and their
order; the pruning itself is deterministic (L2 magnitude). Accuracy: the full 10,000-image test set.
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch

import starfish_plugin as starfish
from benchmarks.common import hardware, median, save
from benchmarks.recipes import make_vit_pruner
from starfish_plugin.demo.datasets import load_fashion_mnist
from starfish_plugin.demo.zoo import load_checkpoint

PANELS = ("mlp", "mlp_heads")
RATIOS = (0.3, 0.5, 0.7)
LOSSES = ("cosine", "kl", "ce")
SEEDS = (0, 1, 2)
warnings.filterwarnings("ignore", message="Unwrapped parameters detected")


def pruned_model(dense: torch.nn.Module, panel: str, ratio: float) -> torch.nn.Module:
    model = copy.deepcopy(dense)
    pruner = make_vit_pruner(model, panel, ratio)
    from starfish_plugin.adapters import tp_graph

    tp_graph.track(pruner)
    pruner.step()
    return model


def heal_panel(panel: str, ratio: float) -> dict:
    torch.manual_seed(0)
    train_x, train_y = load_fashion_mnist("train")
    test = list(zip(*(t.split(1000) for t in load_fashion_mnist("test"))))
    dense = load_checkpoint("vit_fmnist")
    base = pruned_model(dense, panel, ratio)
    kept = sum(p.numel() for p in base.parameters()) / sum(p.numel() for p in dense.parameters())
    runs = []
    for seed in SEEDS:
        pick = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(1000 + seed))[:1000]
        calibration = list(zip(train_x[pick].split(32), train_y[pick].split(32)))
        for loss in LOSSES:
            model = pruned_model(dense, panel, ratio)  # deterministic: the same structure every time
            start = time.perf_counter()
            report = starfish.heal(model, dense, calibration, recipe="paper", loss=loss, seed=seed, quiet=True,
                                   diagnostic_samples=0)
            runs.append({"seed": seed, "loss": loss, "top1": starfish.evaluate(model, test),
                         "heal_seconds": time.perf_counter() - start, "final_loss": report.epoch_losses[-1]})
            print(f"{panel} {ratio} seed {seed} {loss}: {runs[-1]['top1']:.2f}", flush=True)
    return {
        "benchmark": "structured",
        "panel": panel,
        "ratio": ratio,
        "parameters_kept": kept,
        "heads_kept": base.blocks[0].attn.num_heads,
        "mlp_units_kept": base.blocks[0].mlp.fc1.out_features,
        "dense_top1": starfish.evaluate(dense, test),
        "pruned_top1": starfish.evaluate(base, test),
        "budget": {"calibration_images": 1000, "epochs": 10, "batch_size": 32, "lr": 6e-4, "min_lr": 1e-6},
        "runs": runs,
        "hardware": hardware(),
    }


def _time(model, x, repeats):
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return times


def latency(repeats: int = 30) -> dict:
    torch.manual_seed(0)
    dense = load_checkpoint("vit_fmnist").eval()
    rows = []
    for panel in PANELS:
        for ratio in RATIOS:
            pruned = pruned_model(dense, panel, ratio).eval()
            for batch in (1, 32):
                x = torch.randn(batch, 1, 28, 28)
                for m in (dense, pruned):
                    _time(m, x, 5)  # warm-up
                d_times, p_times = [], []
                for _ in range(repeats):  # interleaved, so drift hits both alike
                    d_times += _time(dense, x, 1)
                    p_times += _time(pruned, x, 1)
                with torch.inference_mode():
                    torch.testing.assert_close(pruned(x).shape, dense(x).shape)
                rows.append({
                    "panel": panel, "ratio": ratio, "batch": batch,
                    "dense_ms": 1e3 * median(d_times), "pruned_ms": 1e3 * median(p_times),
                    "speedup": median(d_times) / median(p_times),
                    "parameters_kept": sum(p.numel() for p in pruned.parameters())
                    / sum(p.numel() for p in dense.parameters()),
                })
                print(rows[-1], flush=True)
    return {"benchmark": "structured_latency", "dtype": "float32", "repeats": repeats, "rows": rows,
            "hardware": hardware()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    heal = sub.add_parser("heal")
    heal.add_argument("--panel", choices=PANELS, required=True)
    heal.add_argument("--ratio", type=float, choices=RATIOS, required=True)
    lat = sub.add_parser("latency")
    lat.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    if args.command == "heal":
        print("saved", save(f"structured_{args.panel}_{args.ratio}", heal_panel(args.panel, args.ratio)))
    else:
        print("saved", save("structured_latency", latency(args.repeats)))


if __name__ == "__main__":
    main()
