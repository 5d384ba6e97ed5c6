"""Healing speed on one GPU (issue 6): ``starfish.heal`` (fp32, bf16 autocast, and bf16 with
``torch.compile``) against a plain fp32 loop doing the same work, on DeiT-S and DeiT-B at 224x224
(``pretrained=False``, random weights and random images: speed and the alignment loss need no accuracy).

Per model: the pruned copy (L1 unstructured 0.5 of qkv/proj/fc1/fc2), 256 images x 2 epochs,
batch 32, interleaved runs, median of 3; and the accuracy-free check that ``heal`` in fp32 ends at
the same alignment loss as the plain loop (the bf16 and compiled losses are reported next to it;
the compiled run's time includes compiling, so the last epoch's throughput is reported too). Finishes in a
few minutes on one H100. On a machine without CUDA it says so and exits 0.

    python -m benchmarks.gpu_heal
    python -m benchmarks.gpu_heal --dry-run    # the same code on CPU, DeiT-Tiny at 32x32: a check
                                               # that the script runs, not a measurement (not saved)
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import starfish_plugin as starfish
from benchmarks.common import hardware, heal_with_epoch_times, median, save
from benchmarks.heal_speed import manual_heal
from starfish_plugin.demo.run import prune_vit_

MODELS = ("deit_small_patch16_224", "deit_base_patch16_224")
N, EPOCHS, REPEATS = 256, 2, 3


def timed(fn):
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def bench(name: str, dry_run: bool = False) -> dict:
    import timm

    n, epochs, repeats, size, device = (64, 1, 1, 32, "cpu") if dry_run else (N, EPOCHS, REPEATS, 224, "cuda")
    torch.manual_seed(0)
    dense = timm.create_model(name, pretrained=False, img_size=size).to(device).eval()
    base = prune_vit_(copy.deepcopy(dense), 0.5)
    images = torch.randn(n, 3, size, size, device=device)
    blocks = starfish.find_blocks(dense)
    cfg = starfish.HealConfig(recipe="paper", epochs=epochs, quiet=True, diagnostic_samples=0, targets="memory")
    runs = {"plain_fp32": [], "heal_fp32": [], "heal_bf16": [], "heal_bf16_compiled": []}
    compiled = {"compile": "default"} | ({"compile_backend": "aot_eager"} if dry_run else {})
    settings = {
        "heal_fp32": {"precision": "fp32"},
        "heal_bf16": {"precision": "bf16"},
        "heal_bf16_compiled": {"precision": "bf16"} | compiled,
    }
    losses = {}
    last_epoch: dict[str, list[float]] = {k: [] for k in runs}  # steady state: compiling is done by then
    for r in range(repeats):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))
        for which in order:
            model = copy.deepcopy(base)
            if which == "plain_fp32":
                epoch_s: list[float] = []
                seconds, loss = timed(lambda: manual_heal(model, dense, images, blocks, epochs, epoch_seconds=epoch_s))
            else:
                seconds, (report, epoch_s) = timed(
                    lambda: heal_with_epoch_times(model, dense, images, cfg, **settings[which])
                )
                loss = report.epoch_losses[-1]
            runs[which].append(seconds)
            last_epoch[which].append(epoch_s[-1])
            losses[which] = loss
    sps = {k: n * epochs / median(v) for k, v in runs.items()}
    last_sps = {k: n / median(v) for k, v in last_epoch.items()}
    return {
        "model": name,
        "images": n,
        "image_size": size,
        "epochs": epochs,
        "seconds": runs,
        "samples_per_second": sps,
        "last_epoch_seconds": last_epoch,
        "last_epoch_samples_per_second": last_sps,
        "heal_fp32_over_plain": sps["heal_fp32"] / sps["plain_fp32"],
        "heal_bf16_over_plain": sps["heal_bf16"] / sps["plain_fp32"],
        "heal_bf16_compiled_over_plain": sps["heal_bf16_compiled"] / sps["plain_fp32"],
        "final_loss": losses,
        "fp32_loss_relative_difference": abs(losses["heal_fp32"] - losses["plain_fp32"]) / losses["plain_fp32"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="run the code on CPU with a tiny model; save nothing")
    args = parser.parse_args()
    if args.dry_run:
        rows = [bench("deit_tiny_patch16_224", dry_run=True)]
    elif not torch.cuda.is_available():
        print("gpu_heal: skipped, no CUDA GPU on this machine")
        return
    else:
        rows = [bench(name) for name in MODELS]
    for row in rows:
        print(
            f"{row['model']}: plain fp32 {row['samples_per_second']['plain_fp32']:.0f}/s, heal fp32 "
            f"{row['samples_per_second']['heal_fp32']:.0f}/s, "
            f"heal bf16 {row['samples_per_second']['heal_bf16']:.0f}/s, "
            f"bf16 compiled {row['samples_per_second']['heal_bf16_compiled']:.0f}/s; "
            f"final loss {row['final_loss']}; last epoch only: "
            + ", ".join(f"{k} {v:.0f}/s" for k, v in row["last_epoch_samples_per_second"].items())
        )
    if args.dry_run:
        print("dry run on CPU: the script works; these are not GPU figures and nothing was saved")
        return
    print("saved", save("gpu_heal", {"benchmark": "gpu_heal", "rows": rows, "hardware": hardware()}))


if __name__ == "__main__":
    main()
