"""Healing speed: ``starfish.heal`` against a minimal hand-written loop doing the same work.

Both build the same fp16 cache of dense block outputs, then run the same AdamW steps (cosine
schedule, batch 32) over the same surviving weights of the same pruned ViT with the same
shuffled batches; runs are interleaved (A B B A ...) and the medians compared. ``heal``'s own
diagnostics (per-block cosine before/after) are switched off for the comparison and timed
separately. Also: peak memory of the target cache against ``heal``'s estimate.

    python -m benchmarks.heal_speed            # writes benchmarks/results/heal_speed.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import starfish_plugin as starfish
from benchmarks.common import hardware, median, reset_peak_rss, rss_bytes, save, trim_heap
from starfish_plugin.base.outputs import capture_outputs
from starfish_plugin.data.calibration import load_calibration
from starfish_plugin.data.targets import DenseTargets, dense_outputs, plan_targets
from starfish_plugin.demo.run import load_demo_data, prune_vit_
from starfish_plugin.demo.zoo import load_checkpoint


def manual_heal(pruned, dense, images, blocks, epochs, batch_size=32, lr=6e-4, min_lr=1e-6, seed=0,
                epoch_seconds: list[float] | None = None) -> float:
    """The same work as ``starfish.heal`` written by hand, as a user would without the plugin;
    returns the last epoch's mean loss (and appends each epoch's seconds to ``epoch_seconds``)."""
    dense.eval()
    pruned.eval()
    n = len(images)
    cache = {}
    with torch.no_grad(), capture_outputs(dense, blocks) as outs:
        for start in range(0, n, batch_size):
            dense(images[start : start + batch_size])
            for b in blocks:
                cache.setdefault(b, []).append(outs[b].half())
    cache = {b: torch.cat(v) for b, v in cache.items()}
    hooked = [m for m in pruned.modules() if hasattr(m, "weight_mask")]
    params = [m.weight_orig for m in hooked]
    masks = [m.weight_mask for m in hooked]
    for p in pruned.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, foreach=True)
    steps = epochs * math.ceil(n / batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=min_lr)
    generator = torch.Generator().manual_seed(seed)
    with capture_outputs(pruned, blocks) as outs:
        for _ in range(epochs):
            epoch_start = time.perf_counter()
            running = torch.zeros((), device=images.device)
            order = torch.randperm(n, generator=generator).to(images.device)
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                pruned(images[idx])
                loss = torch.stack(
                    [1 - F.cosine_similarity(outs[b], cache[b][idx].float(), dim=-1).mean() for b in blocks]
                ).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch._foreach_mul_([p.grad for p in params], masks)
                optimizer.step()
                schedule.step()
                running += loss.detach() * len(idx)
            if epoch_seconds is not None:
                running.item()  # wait for the device, as heal's per-epoch loss does
                epoch_seconds.append(time.perf_counter() - epoch_start)
    for p in pruned.parameters():
        p.requires_grad_(True)
    return running.item() / n


def timed(fn) -> float:
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def speed(dense, images, epochs, repeats):
    blocks = starfish.find_blocks(dense)
    base = prune_vit_(copy.deepcopy(dense), 0.8)
    n = len(images)
    heal_t, manual_t, diag_t = [], [], []
    config = starfish.HealConfig(recipe="paper", epochs=epochs, quiet=True, diagnostic_samples=0, targets="memory")
    for r in range(repeats):
        order = ("heal", "manual") if r % 2 == 0 else ("manual", "heal")
        for which in order:
            model = copy.deepcopy(base)
            if which == "heal":
                heal_t.append(timed(lambda: starfish.heal(model, dense, images, config)))
            else:
                manual_t.append(timed(lambda: manual_heal(model, dense, images, blocks, epochs)))
        model = copy.deepcopy(base)
        diag_t.append(timed(lambda: starfish.heal(model, dense, images, config.replace(diagnostic_samples=512))))
    heal_sps = n * epochs / median(heal_t)
    manual_sps = n * epochs / median(manual_t)
    return {
        "images": n,
        "epochs": epochs,
        "batch_size": 32,
        "repeats": repeats,
        "heal_seconds": heal_t,
        "manual_seconds": manual_t,
        "heal_with_diagnostics_seconds": diag_t,
        "heal_samples_per_second": heal_sps,
        "manual_samples_per_second": manual_sps,
        "heal_over_manual_throughput": heal_sps / manual_sps,
        "overhead_percent": 100.0 * (median(heal_t) / median(manual_t) - 1.0),
        "diagnostics_overhead_percent": 100.0 * (median(diag_t) / median(heal_t) - 1.0),
    }


def cache_probe(n: int) -> dict:
    """Build the fp16 target cache for ``n`` images in this (fresh) process; measure its peak RSS."""
    data_all = load_demo_data("auto", n_calibration=n)
    dense = load_checkpoint(data_all.model)
    blocks = starfish.find_blocks(dense)
    data = load_calibration(data_all.calibration)
    probe = dense_outputs(dense, blocks, data.inputs[:1], False)
    plan = plan_targets(probe, n, "auto", starfish.HealConfig().target_memory_budget)
    with torch.no_grad():  # warm the allocator and the model's own buffers first
        dense(data.inputs[:32])
    del data_all
    gc.collect()
    trim_heap()  # give freed heap back to the OS so that reuse cannot hide the cache's growth
    base = rss_bytes()
    measured = reset_peak_rss()
    targets = DenseTargets(dense, blocks, data, plan, torch.device("cpu"), False, 32)
    peak = rss_bytes("VmHWM") if measured else None
    return {
        "images": n,
        "mode": plan.mode,
        "estimate_bytes": plan.estimate_bytes,
        "cache_bytes": targets.cache_bytes,
        "peak_rss_increase_bytes": None if peak is None else peak - base,
    }


def cache_memory(sizes) -> list[dict]:
    """One fresh process per size, so freed memory of an earlier size cannot hide the growth."""
    rows = []
    for n in sizes:
        out = subprocess.run(
            [sys.executable, "-m", __spec__.name, "--cache-probe", str(n)], check=True, capture_output=True, text=True
        ).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--cache-probe", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cache_probe:
        print(json.dumps(cache_probe(args.cache_probe)))
        return
    torch.manual_seed(0)
    data = load_demo_data("auto", n_calibration=8000)
    dense = load_checkpoint(data.model)
    result = {
        "benchmark": "heal_speed",
        "model": data.model,
        "dataset": data.name,
        "dtype": "float32",
        "hardware": hardware(),
        "speed": speed(dense, data.calibration[: args.images], args.epochs, args.repeats),
        "target_cache": cache_memory([1000, 2000, 4000, 8000]),
    }
    path = save("heal_speed", result)
    s = result["speed"]
    print(f"heal {s['heal_samples_per_second']:.0f} samples/s, manual {s['manual_samples_per_second']:.0f} "
          f"samples/s: overhead {s['overhead_percent']:+.1f}% (median of {s['repeats']}); "
          f"diagnostics add {s['diagnostics_overhead_percent']:+.1f}%")
    for row in result["target_cache"]:
        print(row)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
