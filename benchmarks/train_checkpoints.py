"""Reproduce the shipped checkpoints in starfish_plugin/demo/checkpoints/ (deterministic for a seed).

    python -m benchmarks.train_checkpoints vit_fmnist   # ~ several CPU minutes, needs dataset-fashion-mnist
    python -m benchmarks.train_checkpoints vit_digits   # ~ seconds
    python -m benchmarks.train_checkpoints resnet_fmnist  # ~ 5 min on 2 idle cores, needs dataset-fashion-mnist

Weights are stored as fp16 state dicts (floating-point tensors in fp16, BatchNorm's batch counters
as they are; loadable with weights_only=True); a JSON file beside each records its accuracy on the
held-out split, the training settings, the inputs it expects and the command that made it.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

from benchmarks.common import save_record
from starfish_plugin.core.evaluate import evaluate
from starfish_plugin.demo.datasets import FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_digits_split, load_fashion_mnist
from starfish_plugin.demo.zoo import CHECKPOINT_DIR, SPECS, build, load_checkpoint, train_classifier

SETTINGS = {
    "vit_fmnist": {"epochs": 5, "batch_size": 128, "lr": 2e-3, "weight_decay": 0.05, "seed": 0},
    "vit_digits": {"epochs": 60, "batch_size": 64, "lr": 2e-3, "weight_decay": 0.05, "seed": 0},
    "resnet_fmnist": {"epochs": 3, "batch_size": 128, "lr": 2e-3, "weight_decay": 0.05, "seed": 0},
}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# What each model expects: images as load_fashion_mnist / load_digits_split return them.
INPUTS = {
    "fmnist": {"input_size": [1, 28, 28], "in_chans": 1, "mean": [FASHION_MNIST_MEAN], "std": [FASHION_MNIST_STD],
               "pixel_scale": "x / 255, then (x - mean) / std", "classes": list(FASHION_MNIST_CLASSES),
               "data": "Fashion-MNIST (train 60,000 / test 10,000), starfish_plugin.demo.datasets.load_fashion_mnist"},
    "digits": {"input_size": [1, 8, 8], "in_chans": 1, "mean": [0.0], "std": [1.0],
               "pixel_scale": "x / 16, no normalisation", "classes": [str(d) for d in range(10)],
               "data": "scikit-learn digits, starfish_plugin.demo.datasets.load_digits_split(seed=0)"},
}


def _fp16_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with floating-point tensors in fp16 (integer buffers kept as they are)."""
    return {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("name", choices=sorted(SPECS))
    args = parser.parse_args()
    settings = SETTINGS[args.name]
    dataset = args.name.rsplit("_", 1)[-1]
    if dataset == "fmnist":
        train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    else:
        split = load_digits_split()
        train, test = split["train"], split["test"]
    torch.manual_seed(settings["seed"])
    model = build(SPECS[args.name])
    start, cpu_start = time.perf_counter(), time.process_time()
    train_classifier(model, *train, **settings)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    CHECKPOINT_DIR.mkdir(exist_ok=True)
    torch.save(_fp16_state(model), CHECKPOINT_DIR / f"{args.name}.pt")
    shipped = load_checkpoint(args.name)  # evaluate the fp16 weights that ship, not the fp32 ones
    accuracy = evaluate(shipped, zip(test[0].split(1000), test[1].split(1000)))
    meta = {
        "name": args.name,
        "test_top1": round(accuracy, 2),
        "test_images": len(test[1]),
        "train_seconds": round(seconds, 1),
        "settings": settings,
        "torch": torch.__version__,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
    }
    meta.update({  # the shipped ViT files predate these fields; they gain them when retrained
        "architecture": f"{type(shipped).__module__}.{type(shipped).__name__}",
        "spec": repr(SPECS[args.name]),
        "parameters": sum(p.numel() for p in shipped.parameters()),
        "file_bytes": (CHECKPOINT_DIR / f"{args.name}.pt").stat().st_size,
        "storage": "fp16 floating-point tensors; integer buffers (BatchNorm batch counters) as they are",
        # train_seconds is wall time: on a shared machine it grows with the other jobs' load
        "train_cpu_seconds": round(cpu_seconds, 1),
        "load_average_1_5_15_min_at_end": [round(x, 2) for x in os.getloadavg()],
        **INPUTS[dataset],
        "command": "python -m benchmarks.train_checkpoints " + " ".join(sys.argv[1:]),
    })
    save_record(CHECKPOINT_DIR / f"{args.name}.json", meta)


if __name__ == "__main__":
    main()
