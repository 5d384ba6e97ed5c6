"""``HealConfig.compile``: eager healing against ``torch.compile`` (inductor) of the pruned model's
training forward, on this machine's CPU (``benchmarks/gpu_heal.py`` does the same on a GPU).

The shipped ViT (Fashion-MNIST if installed, digits otherwise) pruned at 0.8 heals on 1,000
calibration images; eager and compiled runs alternate (A B B A ...). Reported per run: the first
epoch (which pays for compiling), the median of the later epochs (steady state), the whole heal,
and the final loss of each (the compiled heal must end where the eager one does). Inductor's
on-disk cache is pointed at a fresh directory so the first compiled run compiles cold; later
compiled runs may reuse it, and their first epochs show how much that saves.

    python -m benchmarks.compile_speed         # writes benchmarks/results/compile_speed.json
"""

from __future__ import annotations

import argparse
import atexit
import copy
import os
import shutil
import tempfile

if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:  # a cold cache of our own, removed at exit
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="starfish-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], True)

import torch  # noqa: E402

import starfish_plugin as starfish  # noqa: E402
from benchmarks.common import hardware, heal_with_epoch_times, median, save  # noqa: E402
from starfish_plugin.demo.run import load_demo_data, prune_vit_  # noqa: E402
from starfish_plugin.demo.zoo import load_checkpoint  # noqa: E402


def run(base, dense, images, config) -> dict:
    report, seconds = heal_with_epoch_times(copy.deepcopy(base), dense, images, config)
    return {"first_epoch_s": seconds[0], "later_epoch_median_s": median(seconds[1:]),
            "heal_s": report.seconds, "final_loss": report.epoch_losses[-1], "mask_unchanged": report.mask_unchanged}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    data = load_demo_data("auto", n_calibration=args.images)
    dense = load_checkpoint(data.model)
    base = prune_vit_(copy.deepcopy(dense), 0.8)
    config = starfish.HealConfig(recipe="paper", epochs=args.epochs, quiet=True, diagnostic_samples=0, targets="memory")
    modes = {"eager": config, "compiled": config.replace(compile="default")}
    runs: dict[str, list[dict]] = {k: [] for k in modes}
    for r in range(args.repeats):
        for which in (list(modes) if r % 2 == 0 else list(reversed(modes))):
            runs[which].append(run(base, dense, data.calibration, modes[which]))
            print(which, runs[which][-1], flush=True)
    summary = {
        k: {field: median([x[field] for x in v]) for field in ("first_epoch_s", "later_epoch_median_s", "heal_s")}
        for k, v in runs.items()
    }
    eager_loss, compiled_loss = runs["eager"][0]["final_loss"], runs["compiled"][0]["final_loss"]
    result = {
        "benchmark": "compile_speed",
        "model": data.model, "images": args.images, "epochs": args.epochs, "batch_size": 32, "sparsity": 0.8,
        "repeats": args.repeats, "backend": "inductor", "torch": torch.__version__,
        "runs": runs, "medians": summary,
        "steady_state_speedup": summary["eager"]["later_epoch_median_s"] / summary["compiled"]["later_epoch_median_s"],
        "whole_heal_speedup": summary["eager"]["heal_s"] / summary["compiled"]["heal_s"],
        "cold_compile_first_epoch_s": runs["compiled"][0]["first_epoch_s"],
        "final_loss_relative_difference": abs(compiled_loss - eager_loss) / eager_loss,
        "hardware": hardware(),
    }
    print(f"steady state {result['steady_state_speedup']:.2f}x, whole heal {result['whole_heal_speedup']:.2f}x, "
          f"cold first epoch {result['cold_compile_first_epoch_s']:.1f} s, "
          f"loss difference {result['final_loss_relative_difference']:.2e}")
    print("saved", save("compile_speed", result))


if __name__ == "__main__":
    main()
