"""Reproduce the shipped checkpoints in starfish_plugin/checkpoints/ (deterministic for a seed).

    python benchmarks/train_checkpoints.py vit_fmnist   # ~ several CPU minutes, needs dataset-fashion-mnist
    python benchmarks/train_checkpoints.py vit_digits   # ~ seconds

Weights are stored as fp16 state dicts (loadable with weights_only=True); a JSON file beside each
records its accuracy on the held-out split and the training settings.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from starfish_plugin.evaluate import evaluate
from starfish_plugin.data import load_digits_split, load_fashion_mnist
from starfish_plugin.zoo import CHECKPOINT_DIR, SPECS, load_checkpoint, tiny_vit, train_classifier

SETTINGS = {
    "vit_fmnist": {"epochs": 5, "batch_size": 128, "lr": 2e-3, "weight_decay": 0.05, "seed": 0},
    "vit_digits": {"epochs": 60, "batch_size": 64, "lr": 2e-3, "weight_decay": 0.05, "seed": 0},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("name", choices=sorted(SPECS))
    args = parser.parse_args()
    settings = SETTINGS[args.name]
    if args.name == "vit_fmnist":
        train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    else:
        split = load_digits_split()
        train, test = split["train"], split["test"]
    torch.manual_seed(settings["seed"])
    model = tiny_vit(SPECS[args.name])
    start = time.perf_counter()
    train_classifier(model, *train, **settings)
    seconds = time.perf_counter() - start
    CHECKPOINT_DIR.mkdir(exist_ok=True)
    torch.save({k: v.half() for k, v in model.state_dict().items()}, CHECKPOINT_DIR / f"{args.name}.pt")
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
    (CHECKPOINT_DIR / f"{args.name}.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
