"""Calibration inputs at scale: peak RAM of a whole heal whose calibration set is a lazy Dataset,
with the inputs gathered in memory (``inputs="memory"``) or spilled to a file (``inputs="disk"``).

Each (mode, n) runs in a fresh process: load the shipped Fashion-MNIST ViT, the pruned 0.8 copy
and the raw uint8 training images (the Dataset's source, like image files), measure RSS, then
run ``heal`` on a Dataset that decodes and normalizes one image per item (1 epoch, targets on
disk in both modes, diagnostics off). Reported: peak RSS growth over that baseline, the inputs'
size as fp32, and the heal's seconds.

    python -m benchmarks.inputs_memory         # writes benchmarks/results/inputs_memory.json
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
from torch.utils.data import Dataset

import starfish_plugin as starfish
from benchmarks.common import hardware, reset_peak_rss, rss_bytes, save, trim_heap
from starfish_plugin.demo.datasets import FASHION_MNIST_MEAN, FASHION_MNIST_STD, _read_idx, fashion_mnist_root
from starfish_plugin.demo.run import prune_vit_
from starfish_plugin.demo.zoo import load_checkpoint

SIZES = (2000, 8000, 16000, 32000)
MODES = ("memory", "disk")


class RawImages(Dataset):
    """Fashion-MNIST images decoded from uint8 and normalized one at a time."""

    def __init__(self, raw: torch.Tensor) -> None:
        self.raw = raw

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, i: int) -> torch.Tensor:
        return ((self.raw[i].float() / 255.0 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD).unsqueeze(0)


def probe(mode: str, n: int) -> dict:
    raw = torch.from_numpy(_read_idx(fashion_mnist_root() / "train-images-idx3-ubyte.gz").copy())[:n]
    dense = load_checkpoint("vit_fmnist")
    pruned = prune_vit_(copy.deepcopy(dense), 0.8)
    dataset = RawImages(raw)
    with torch.no_grad():  # warm the allocator and both models first
        batch = torch.stack([dataset[i] for i in range(32)])
        dense(batch)
        pruned(batch)
    del batch
    gc.collect()
    trim_heap()
    base = rss_bytes()
    measured = reset_peak_rss()
    with tempfile.TemporaryDirectory() as tmp:
        report = starfish.heal(pruned, dense, dataset, recipe="paper", epochs=1, inputs=mode, targets="disk",
                               cache_dir=tmp, quiet=True, diagnostic_samples=0)
    peak = rss_bytes("VmHWM") if measured else None
    return {"mode": mode, "images": n, "peak_rss_increase_bytes": None if peak is None else peak - base,
            "input_bytes_fp32": n * 28 * 28 * 4, "heal_seconds": report.seconds,
            "samples_per_second": report.samples_per_second, "source": report.notes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probe", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(probe(args.probe[0], int(args.probe[1]))))
        return
    if fashion_mnist_root() is None:
        print("inputs_memory: skipped, Fashion-MNIST is not installed (apt-get install -y dataset-fashion-mnist)")
        return
    rows = []
    for n in SIZES:
        for mode in MODES:
            out = subprocess.run([sys.executable, "-m", __spec__.name, "--probe", mode, str(n)], check=True,
                                 capture_output=True, text=True).stdout.strip().splitlines()[-1]
            row = json.loads(out)
            rows.append(row)
            print(f"inputs={mode:6s} n={n}: peak RSS +{row['peak_rss_increase_bytes'] / 2**20:.1f} MiB "
                  f"(inputs {row['input_bytes_fp32'] / 2**20:.1f} MiB fp32), heal {row['heal_seconds']:.1f} s",
                  flush=True)
    print("saved", save("inputs_memory", {"benchmark": "inputs_memory", "model": "vit_fmnist pruned 0.8",
                                          "epochs": 1, "targets": "disk", "rows": rows, "hardware": hardware()}))


if __name__ == "__main__":
    main()
