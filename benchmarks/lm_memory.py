"""Memory of a language-model heal on long sequences, with and without gradient checkpointing.

The shipped ``kjv_llama`` pruned 50 % (magnitude, every decoder Linear) heals 2 steps on 64
training sequences of 256 tokens at batch 32, targets on disk (so the cache is not what is
measured), once per setting, each in a fresh process: the peak resident memory above the
process's memory just before ``heal`` (``VmHWM`` reset first), the heal's seconds, and the
weights reached (which must be the same). CPU here; ratios within one run.

    python -m benchmarks.lm_memory        # ~2 min on 2 CPU cores
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time

import torch

from benchmarks.common import hardware, reset_peak_rss, rss_bytes, save, trim_heap

SEQUENCES, LENGTH, BATCH = 64, 256, 32


def one(checkpointing: bool) -> dict:
    import starfish_plugin as starfish
    from benchmarks.language import magnitude_
    from starfish_plugin.demo.text import kjv_splits, load_text_checkpoint, token_sequences

    dense, tokenizer, _ = load_text_checkpoint()
    ids = token_sequences(tokenizer, kjv_splits()["train"], LENGTH)[:SEQUENCES]
    pruned = copy.deepcopy(dense)
    magnitude_(pruned, 0.5)
    trim_heap()
    before = rss_bytes()
    reset_peak_rss()
    start = time.perf_counter()
    report = starfish.heal(pruned, dense, {"input_ids": ids}, epochs=1, batch_size=BATCH, targets="disk",
                           gradient_checkpointing=checkpointing, diagnostic_samples=0, quiet=True)
    seconds = time.perf_counter() - start
    checksum = float(sum(p.double().sum() for p in pruned.parameters()))
    return {"gradient_checkpointing": checkpointing, "peak_above_start_bytes": rss_bytes("VmHWM") - before,
            "seconds": round(seconds, 2), "loss": report.epoch_losses[0], "weights_checksum": checksum}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "one":
        print(json.dumps(one(sys.argv[2] == "1")))
        return
    rows = []
    for flag in ("0", "1"):
        out = subprocess.run([sys.executable, "-m", "benchmarks.lm_memory", "one", flag], check=True,
                             capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1])
    plain, recomputed = rows
    payload = {
        "model": "kjv_llama", "pruning": "magnitude 50 %", "sequences": SEQUENCES, "sequence_length": LENGTH,
        "batch_size": BATCH, "rows": rows,
        "memory_ratio": recomputed["peak_above_start_bytes"] / plain["peak_above_start_bytes"],
        "time_ratio": recomputed["seconds"] / plain["seconds"],
        "same_weights": plain["weights_checksum"] == recomputed["weights_checksum"],
        "hardware": hardware(), "torch_threads": torch.get_num_threads(), "command": "python -m benchmarks.lm_memory",
    }
    print(f"peak memory {payload['memory_ratio']:.2f}x, time {payload['time_ratio']:.2f}x, "
          f"same weights: {payload['same_weights']}")
    save("lm_memory", payload)


if __name__ == "__main__":
    main()
