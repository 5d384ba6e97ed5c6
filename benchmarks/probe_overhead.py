"""What ``recipe="auto"``'s probe costs: a default heal against the same heal given the probe's
choice as a fixed recipe (``recipe="paper"`` with that ``lr`` and ``warm_start``), interleaved,
medians over repeats, on the shipped Fashion-MNIST ViT and the shipped King James LM.

Both heals reach the same weights (the probe leaves no trace); the difference in wall time is the
probe: its warm starts that were not chosen, its learning-rate steps and its held-out scores.

    python -m benchmarks.probe_overhead            # ~15 min on 2 CPU cores -> results/probe_overhead.json
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

import torch

import starfish_plugin as starfish
from benchmarks.common import hardware, save
from starfish_plugin.demo.datasets import load_fashion_mnist
from starfish_plugin.demo.run import prune_vit_
from starfish_plugin.demo.zoo import load_checkpoint

REPEATS = 5


def _vision(sparsity: float) -> tuple[Any, Any, Any, dict[str, Any]]:
    images, _ = load_fashion_mnist("train")
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(1000))[:1000]
    dense = load_checkpoint("vit_fmnist")
    return dense, lambda: prune_vit_(copy.deepcopy(dense), sparsity), images[pick], {"epochs": 10}


def _language(amount: float) -> tuple[Any, Any, Any, dict[str, Any]]:
    from benchmarks.language import _data, magnitude_

    dense, calibration, _, _ = _data(0)

    def pruned() -> Any:
        model = copy.deepcopy(dense)
        magnitude_(model, amount)
        return model

    return dense, pruned, {"input_ids": calibration}, {"epochs": 5}


CASES = {
    "vit_fmnist unstructured 90 %, 1,000 images x 10 epochs": lambda: _vision(0.9),
    "vit_fmnist unstructured 50 %, 1,000 images x 10 epochs": lambda: _vision(0.5),
    "kjv_llama magnitude 70 %, 256 sequences x 5 epochs": lambda: _language(0.7),
}


def measure(name: str) -> dict[str, Any]:
    dense, prune, calibration, settings = CASES[name]()  # prune(): a freshly pruned copy of dense
    auto_seconds, fixed_seconds, probe_seconds = [], [], []
    first = None
    for _ in range(REPEATS):  # interleaved: auto, then the same heal with the choice given
        model = prune()
        start = time.perf_counter()
        report = starfish.heal(model, dense, calibration, quiet=True, **settings)
        auto_seconds.append(time.perf_counter() - start)
        probe_seconds.append(report.recipe_probe.get("seconds", 0.0))
        chosen = {"lr": report.config["lr"], "warm_start": report.config["warm_start"]}
        fixed = prune()
        start = time.perf_counter()
        again = starfish.heal(fixed, dense, calibration, quiet=True, recipe="paper", **settings, **chosen)
        fixed_seconds.append(time.perf_counter() - start)
        same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fixed.state_dict().values()))
        first = first or {"chosen": chosen, "probe": report.recipe_probe, "same_weights": same,
                          "held_out_after": (report.held_out_after, again.held_out_after)}
        print(f"{name}: auto {auto_seconds[-1]:.1f} s, fixed {fixed_seconds[-1]:.1f} s, probe "
              f"{probe_seconds[-1]:.1f} s, chose {chosen}, same weights {same}", flush=True)
    auto, fixed = statistics.median(auto_seconds), statistics.median(fixed_seconds)
    return {"case": name, "repeats": REPEATS, "auto_seconds": auto_seconds, "fixed_seconds": fixed_seconds,
            "probe_seconds": probe_seconds, "median_auto_seconds": auto, "median_fixed_seconds": fixed,
            "overhead": auto / fixed - 1, **(first or {})}


def main() -> None:
    torch.manual_seed(0)
    rows = [measure(name) for name in CASES]
    print("saved", save("probe_overhead", {"benchmark": "probe_overhead", "rows": rows, "hardware": hardware(),
                                           "command": "python -m benchmarks.probe_overhead"}))


if __name__ == "__main__":
    main()
