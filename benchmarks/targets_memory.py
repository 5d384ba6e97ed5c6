"""Dense-target storage at scale: peak RAM and heal throughput for memory, disk and online targets.

Each (mode, n) runs in a fresh process: load the shipped Fashion-MNIST ViT and n calibration
images, measure RSS, then run a whole ``heal`` (2 epochs, the pruned 0.8 model, diagnostics off)
and record the peak RSS growth over that baseline and samples per second. The calibration images
themselves are loaded before the baseline (they are the caller's), so the growth is what the heal
adds: the fp16 cache in memory mode, little in disk and online modes. The disk cache is built in a
fresh temporary directory, so its build time is included.

    python -m benchmarks.targets_memory            # ~6 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import subprocess
import sys
import tempfile

import torch

import starfish_plugin as starfish
from benchmarks.common import hardware, median, reset_peak_rss, rss_bytes, save, trim_heap
from starfish_plugin.demo.run import load_demo_data, prune_vit_
from starfish_plugin.demo.zoo import load_checkpoint

SIZES = (1000, 2000, 4000, 8000)
MODES = ("memory", "disk", "online")
EPOCHS = 2


def probe(mode: str, n: int) -> dict:
    data = load_demo_data("auto", n_calibration=n)
    dense = load_checkpoint(data.model)
    pruned = prune_vit_(copy.deepcopy(dense), 0.8)
    images = data.calibration[:n].clone()
    del data
    with torch.no_grad():  # warm the allocator and both models first
        dense(images[:32])
        pruned(images[:32])
    gc.collect()
    trim_heap()
    base = rss_bytes()
    measured = reset_peak_rss()
    with tempfile.TemporaryDirectory() as tmp:
        report = starfish.heal(
            pruned,
            dense,
            images,
            recipe="paper",
            epochs=EPOCHS,
            targets=mode,
            cache_dir=tmp if mode == "disk" else None,
            quiet=True,
            diagnostic_samples=0,
        )
    peak = rss_bytes("VmHWM") if measured else None
    return {
        "mode": mode,
        "images": n,
        "epochs": EPOCHS,
        "peak_rss_increase_bytes": None if peak is None else peak - base,
        "target_cache_ram_bytes": report.target_cache_bytes,
        "estimate_bytes": report.target_cache_estimate_bytes,
        "heal_seconds": report.seconds,
        "samples_per_second": report.samples_per_second,
        "input_bytes": images.numel() * images.element_size(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probe", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(probe(args.probe[0], int(args.probe[1]))))
        return
    rows = []
    for n in SIZES:
        for mode in MODES:
            runs = [
                json.loads(
                    subprocess.run(
                        [sys.executable, "-m", __spec__.name, "--probe", mode, str(n)],
                        check=True, capture_output=True, text=True,
                    )
                    .stdout.strip()
                    .splitlines()[-1]
                )
                for _ in range(args.repeats)
            ]
            row = dict(runs[0])
            row["samples_per_second"] = median([r["samples_per_second"] for r in runs])
            row["peak_rss_increase_bytes"] = median([r["peak_rss_increase_bytes"] for r in runs])
            rows.append(row)
            print(
                f"{mode:7s} n={n}: peak RSS +{row['peak_rss_increase_bytes'] / 2**20:.1f} MiB, "
                f"{row['samples_per_second']:.0f} samples/s",
                flush=True,
            )
    print(
        "saved",
        save(
            "targets_memory",
            {"benchmark": "targets_memory", "model": "vit_fmnist pruned 0.8", "rows": rows, "hardware": hardware()},
        ),
    )


if __name__ == "__main__":
    main()
