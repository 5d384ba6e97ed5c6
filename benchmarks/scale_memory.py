"""Peak memory of a heal as models grow: Llama-style decoders from ~20 M to ~1 B parameters.

Each row is one heal in a fresh process (peak resident memory is a process's high-water mark):
the model is built from a ``LlamaConfig`` (fp32, random init, no hub), a copy is pruned by
magnitude (50 % of every decoder Linear, as exact zeros read with ``infer_masks_from_zeros``), and
it is healed on 32 sequences of 32 tokens of King James text (16 train, 16 judge), two epochs,
batch 4, the paper's recipe (no probe), with each strategy: ``joint``, ``joint`` with gradient
checkpointing, ``sequential`` (with and without ``offload="disk"``), and ``fsdp`` on two
processes (torchrun, gloo; each process holds the whole models as a user's script does, and its
shards; the cap is split between them). A row runs under a cap on its data memory
(``RLIMIT_DATA``: the memory available when the row starts, less 1 GiB), so a heal that does not fit
fails with an allocation error and is recorded as not fitting instead of pushing the machine into
its out-of-memory killer.

Rows: ``{size, strategy, params, peak_rss_bytes, models_rss_bytes, seconds, block_cosine_before,
block_cosine_after, mask_unchanged, fits}`` (``models_rss_bytes``: resident memory once both
models are built, before the heal; under torchrun the largest of the ranks, and
``peak_rss_bytes_all_processes`` their sum). ``sequential+offload`` is ``strategy="sequential"``
with ``offload="disk"`` (the dense model's blocks in files, one mapped in at a time).

    python -m benchmarks.scale_memory                  # every size x strategy (~40 min on 2 cores)
    python -m benchmarks.scale_memory --sizes 20M 100M --strategies joint sequential
    python -m benchmarks.scale_memory plot             # docs/scale_memory.png
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, hardware

RESULT_FILE = RESULTS / "scale_memory.json"
# size -> (hidden width, decoder layers): 12 * width^2 parameters per layer, + 2 * 2048 * width
SIZES: dict[str, tuple[int, int]] = {
    "20M": (512, 6), "100M": (1024, 8), "300M": (1536, 10), "600M": (2048, 12), "1B": (2048, 20),
}
STRATEGIES: dict[str, dict[str, Any]] = {
    "joint": {"strategy": "joint"},
    "joint+checkpointing": {"strategy": "joint", "gradient_checkpointing": True},
    "sequential": {"strategy": "sequential"},
    "sequential+offload": {"strategy": "sequential", "offload": "disk"},
    "fsdp x2": {"strategy": "fsdp"},  # two processes under torchrun (gloo), each under half the cap
}
WORLD = {"fsdp x2": 2}  # processes per row (1 unless named here)
VOCAB, N_SEQUENCES, LENGTH, BATCH, EPOCHS, LR = 2048, 32, 32, 4, 2, 6e-4
MARGIN_BYTES = 1024**3  # left to the rest of the machine under the cap
TIME_LIMIT_S = 1800  # per row


def _memory_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def build(size: str):
    """The dense model and its pruned copy (50 % magnitude zeros in every decoder Linear)."""
    import copy

    import torch
    import transformers
    from torch import nn

    from starfish_plugin.adapters.nm_layouts import infer_masks_from_zeros

    width, layers = SIZES[size]
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=width, intermediate_size=width * 8 // 3 // 64 * 64, num_hidden_layers=layers,
        num_attention_heads=width // 64, num_key_value_heads=width // 64, max_position_embeddings=LENGTH,
        tie_word_embeddings=False,
    )
    dense = transformers.LlamaForCausalLM(config).eval()
    pruned = copy.deepcopy(dense)
    with torch.no_grad():
        for module in pruned.model.layers.modules():
            if isinstance(module, nn.Linear):
                w = module.weight
                threshold = w.abs().flatten().kthvalue(w.numel() // 2).values
                w.mul_(w.abs() > threshold)
    return dense, infer_masks_from_zeros(pruned)


def calibration():
    """``N_SEQUENCES`` sequences of King James text (the shipped tokenizer, vocabulary 2,048)."""
    import torch

    from starfish_plugin.demo.text import kjv_splits, load_text_checkpoint, token_sequences

    _, tokenizer, _ = load_text_checkpoint()
    sequences = token_sequences(tokenizer, kjv_splits()["train"], LENGTH)
    return sequences[torch.randperm(len(sequences), generator=torch.Generator().manual_seed(0))[:N_SEQUENCES]]


def one(size: str, strategy: str) -> dict[str, Any]:
    """Heal one size with one strategy in this process (under the memory cap) and return its row;
    under torchrun (``fsdp x2``) each rank takes its share of the cap and rank 0's row holds the
    largest peak of the ranks."""
    world = WORLD.get(strategy, 1)
    cap = (_memory_available() - MARGIN_BYTES) // world
    resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")
    row = _heal_row(size, strategy, cap)
    row["processes"] = world
    if world > 1 and not row.get("fits"):  # the other ranks wait in a collective: end the job now
        print(json.dumps(row), flush=True)
        os._exit(3)
    if world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, {k: row.get(k) for k in ("peak_rss_bytes", "models_rss_bytes", "fits")})
        row.update(peak_rss_bytes=max(g["peak_rss_bytes"] for g in gathered),
                   models_rss_bytes=max(g["models_rss_bytes"] or 0 for g in gathered),
                   peak_rss_bytes_all_processes=sum(g["peak_rss_bytes"] for g in gathered),
                   fits=all(g["fits"] for g in gathered))
        dist.destroy_process_group()
    return row


def _heal_row(size: str, strategy: str, cap: int) -> dict[str, Any]:
    import starfish_plugin as starfish

    row: dict[str, Any] = {"size": size, "strategy": strategy, "memory_cap_bytes": cap}
    began = time.perf_counter()
    try:
        dense, pruned = build(size)
        row["params"] = sum(p.numel() for p in dense.parameters())
        row["models_rss_bytes"] = _rss()
        ids = calibration()
        start = time.perf_counter()
        report = starfish.heal(pruned, dense, ids, epochs=EPOCHS, lr=LR, batch_size=BATCH, recipe="paper",
                               quiet=True, **STRATEGIES[strategy])
        row.update(
            fits=True, seconds=round(time.perf_counter() - start, 1),
            block_cosine_before=round(report.mean_cosine_before, 5),
            block_cosine_after=round(report.mean_cosine_after, 5),
            held_out_before=report.held_out_before, held_out_after=report.held_out_after,
            returned_state=report.returned_state, mask_unchanged=report.mask_unchanged,
        )
    except (MemoryError, RuntimeError) as exc:
        if not isinstance(exc, MemoryError) and "alloc" not in str(exc).lower() and "memory" not in str(exc).lower():
            raise
        row.update(fits=False, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
                   seconds=round(time.perf_counter() - began, 1))
    row["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return row


def run(sizes: list[str], strategies: list[str]) -> None:
    """Each (size, strategy) in its own process, in size order; rows merged into the JSON."""
    record = json.loads(RESULT_FILE.read_text()) if RESULT_FILE.exists() else {"rows": []}
    for size in sizes:
        for strategy in strategies:
            world = WORLD.get(strategy, 1)
            launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"] if world > 1 else []
            try:  # a rank that runs out of memory leaves the other waiting in a collective: a time limit
                out = subprocess.run(
                    [sys.executable, *launcher, "-m", "benchmarks.scale_memory", "one", "--size", size,
                     "--strategy", strategy],
                    capture_output=True, text=True, timeout=TIME_LIMIT_S,
                    env={**os.environ, "PYTHONPATH": "."} | ({"OMP_NUM_THREADS": "1"} if world > 1 else {}),
                )
            except subprocess.TimeoutExpired:
                out = subprocess.CompletedProcess([], -1, "", f"stopped after {TIME_LIMIT_S} s")
            lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
            if out.returncode != 0 and lines and not json.loads(lines[-1]).get("fits", True):
                row = json.loads(lines[-1])  # the rank that ran out of memory says so itself
            elif out.returncode != 0 or not lines:
                said = out.stderr.strip().splitlines() or [""]
                memory = [line for line in said if "alloc" in line.lower() or "memory" in line.lower()]
                row = {"size": size, "strategy": strategy, "fits": False,
                       "error": f"exit {out.returncode}: {(memory or said)[-1].strip()[:200]}"}
            else:
                row = json.loads(lines[-1])
            print(json.dumps(row), flush=True)
            record["rows"] = [r for r in record["rows"] if (r["size"], r["strategy"]) != (size, strategy)] + [row]
            record["rows"].sort(key=lambda r: (list(SIZES).index(r["size"]), list(STRATEGIES).index(r["strategy"])))
            record.update(
                hardware=hardware(), model="Llama-style decoder (transformers LlamaConfig, fp32, random init)",
                pruning="magnitude 50 % of every decoder Linear, exact zeros (infer_masks_from_zeros)",
                calibration=f"{N_SEQUENCES} King James sequences x {LENGTH} tokens (16 train, 16 judge), "
                            f"batch {BATCH}, {EPOCHS} epochs, lr {LR:g}, recipe='paper'",
                command="python -m benchmarks.scale_memory",
            )
            RESULTS.mkdir(exist_ok=True)
            RESULT_FILE.write_text(json.dumps(record, indent=2) + "\n")


def plot(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    record = json.loads(RESULT_FILE.read_text())
    fig, ax = plt.subplots(figsize=(6, 4))
    for strategy in STRATEGIES:
        rows = [r for r in record["rows"] if r["strategy"] == strategy and r.get("fits")]
        ax.plot([r["params"] / 1e6 for r in rows], [r["peak_rss_bytes"] / 1024**3 for r in rows], "o-", label=strategy)
    cap = next((r["memory_cap_bytes"] for r in record["rows"] if "memory_cap_bytes" in r), None)
    if cap:
        ax.axhline(cap / 1024**3, color="black", linestyle="--", linewidth=1, label="memory cap")
    ax.set_xlabel("parameters (millions)")
    ax.set_ylabel("peak resident memory (GiB)")
    ax.set_title("healing one Llama-style model, fp32, CPU", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    single = sub.add_parser("one", help="one size and strategy in this process (prints its row)")
    single.add_argument("--size", choices=list(SIZES), required=True)
    single.add_argument("--strategy", choices=list(STRATEGIES), required=True)
    figure = sub.add_parser("plot", help="peak memory against parameters")
    figure.add_argument("--out", type=Path, default=Path("docs/scale_memory.png"))
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--strategies", nargs="+", choices=list(STRATEGIES), default=list(STRATEGIES))
    args = parser.parse_args(argv)
    if args.command == "one":
        row = one(args.size, args.strategy)
        if os.environ.get("RANK", "0") == "0":
            print(json.dumps(row), flush=True)
    elif args.command == "plot":
        plot(args.out)
    else:
        run(args.sizes, args.strategies)


if __name__ == "__main__":
    main()
