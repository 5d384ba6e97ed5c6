"""Run by ``test_distributed.py`` under torchrun: heal the tiny ViT on 2 CPU ranks (gloo) and
write what each rank ended with to ``<out>/rank<r>.json``."""

from __future__ import annotations

import copy
import json
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from helpers import l1_prune_, tiny_vit  # noqa: E402

import starfish_plugin as starfish  # noqa: E402
from starfish_plugin.errors import StarfishError  # noqa: E402
from starfish_plugin.runtime.fingerprint import model_fingerprint  # noqa: E402


class Crash:
    """Kills this process outright (no cleanup, like a lost machine) after step ``at``."""

    def __init__(self, at: int) -> None:
        self.at = at

    @starfish.hookimpl
    def starfish_step_ended(self, step, total_steps, config):
        if step == self.at:
            os._exit(3)


def _heal(out: Path, checkpoint_dir: str | None = None, crash_rank: int = -1, crash_step: int = 0) -> None:
    rank = dist.get_rank()
    if rank == crash_rank:
        starfish.plugin_manager().register(Crash(crash_step))
    dense = tiny_vit()
    pruned = l1_prune_(copy.deepcopy(dense))
    images = torch.randn(128, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    extra = json.loads(os.environ.get("DDP_WORKER_HEAL_SETTINGS", "{}"))  # e.g. compile, inputs
    # settings for one rank only (e.g. {"1": {"lr": 1e-3}}): ranks that disagree must be refused
    extra |= json.loads(os.environ.get("DDP_WORKER_RANK_SETTINGS", "{}")).get(str(rank), {})
    images = images[: extra.pop("images", len(images))]
    calibration: object = images
    if extra.pop("dict_batches", False):  # keyword inputs: model(x=...)
        calibration = [{"x": images[i : i + 16]} for i in range(0, len(images), 16)]
    settings = dict(epochs=3, lr=3e-3, batch_size=16, quiet=True, diagnostic_samples=64, targets="disk",
                    cache_dir=str(out / "cache"), checkpoint_dir=checkpoint_dir) | extra
    report = starfish.heal(pruned, dense, calibration, **settings)
    (out / f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "weights": model_fingerprint(pruned), "epoch_losses": report.epoch_losses,
        "cosine_before": report.block_cosine_before, "cosine_after": report.block_cosine_after,
        "notes": report.notes, "steps": report.steps, "n_samples": report.n_samples,
        "world_size": report.world_size, "compiled": report.compiled, "resumed_after_epoch": report.resumed_after_epoch,
        "calibration_source": report.calibration_source, "held_out_samples": report.held_out_samples,
        "held_out_history": report.held_out_history,
        "mask_unchanged": report.mask_unchanged, "masked_weights_zero": report.masked_weights_zero,
    }))


def run_in_group(heal: Callable[..., None], *args: Any) -> None:
    """``heal(*args)`` in a process group that is torn down however it ends. A refused heal exits at once
    after printing its error: interpreter teardown in a torchrun worker intermittently aborts inside
    PyTorch's C++ destructors ("terminate called without an active exception", about 1 run in 20-40
    with no collective pending, before this package's changes too), which is not what the refusal
    tests look for (a collective left waiting on one rank)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        heal(*args)
    except StarfishError:
        traceback.print_exc()
        dist.destroy_process_group()
        sys.stderr.flush()
        os._exit(1)
    dist.destroy_process_group()


def main(*args: Any) -> None:
    run_in_group(_heal, *args)

if __name__ == "__main__":
    # ddp_worker.py OUT [CHECKPOINT_DIR CRASH_RANK CRASH_STEP]
    main(Path(sys.argv[1]), *(sys.argv[2:3]), *(int(a) for a in sys.argv[3:5]))
