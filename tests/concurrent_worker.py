"""Run by ``test_concurrency.py`` as one of several processes sharing a cache directory: heal the
tiny ViT ``rounds`` times on its own calibration set (seeded by ``data_seed``) with the dense
targets on disk, and write each round's losses, plus those of a heal with targets in memory (the
reference: a disk cache serves exactly the same targets), to ``<out>``."""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers import l1_prune_, tiny_vit  # noqa: E402

import starfish_plugin as starfish  # noqa: E402


def main(out: Path, cache_dir: str, data_seed: int, rounds: int, start_file: Path) -> None:
    torch.set_num_threads(1)
    dense = tiny_vit()
    images = torch.randn(96, 1, 8, 8, generator=torch.Generator().manual_seed(data_seed))
    settings = dict(epochs=2, lr=3e-3, batch_size=16, quiet=True, diagnostic_samples=32)
    reference = starfish.heal(l1_prune_(copy.deepcopy(dense)), dense, images, **settings, targets="memory")
    while not start_file.exists():  # start together, so that the heals overlap
        time.sleep(0.01)
    runs = []
    for _ in range(rounds):
        report = starfish.heal(l1_prune_(copy.deepcopy(dense)), dense, images, **settings,
                               targets="disk", cache_dir=cache_dir)
        runs.append({"losses": report.epoch_losses, "action": report.target_cache_action,
                     "reason": report.target_cache_reason})
    out.write_text(json.dumps({"reference": reference.epoch_losses, "runs": runs}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5]))
