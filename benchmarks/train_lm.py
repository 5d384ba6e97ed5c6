"""Train the shipped decoder LM on the King James Bible (Debian's ``bible-kjv-text``), offline.

    apt-get install -y bible-kjv-text
    python -m benchmarks.train_lm            # ~20 min on 2 CPU cores

A byte-level BPE tokenizer (2,048 tokens) is trained on the first 90 % of verses; a Llama-style
decoder (4 layers, width 256, 4 heads, tied embeddings) is trained on 128-token sequences of the
same text (AdamW, lr 3e-3 with 100 warm-up steps and a cosine decay, batch 32, weight decay 0.1,
seed 0). Perplexity is measured on the held-out last 10 % of verses (Hebrews to Revelation).
Writes ``starfish_plugin/demo/checkpoints/kjv_llama.{pt,tokenizer.json,json}`` (fp16 weights).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

from benchmarks.common import save_record
from starfish_plugin.demo.text import (
    HELD_OUT_SHARE,
    TEXT_CHECKPOINT,
    build_decoder,
    kjv_splits,
    load_text_checkpoint,
    perplexity,
    token_sequences,
    train_tokenizer,
)
from starfish_plugin.demo.zoo import CHECKPOINT_DIR

ARCHITECTURE = {"vocab_size": 2048, "hidden": 256, "layers": 4, "heads": 4, "max_length": 256}
SETTINGS = {"sequence_length": 128, "batch_size": 32, "steps": 1200, "lr": 3e-3, "min_lr": 3e-4,
            "warmup_steps": 100, "weight_decay": 0.1, "seed": 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=SETTINGS["steps"])
    args = parser.parse_args()
    settings = {**SETTINGS, "steps": args.steps}
    torch.manual_seed(settings["seed"])
    splits = kjv_splits()
    tokenizer = train_tokenizer(splits["train"], ARCHITECTURE["vocab_size"])
    CHECKPOINT_DIR.mkdir(exist_ok=True)
    tokenizer_path = CHECKPOINT_DIR / f"{TEXT_CHECKPOINT}.tokenizer.json"
    tokenizer.save(str(tokenizer_path))
    length = settings["sequence_length"]
    train = token_sequences(tokenizer, splits["train"], length)
    test = token_sequences(tokenizer, splits["test"], length)
    model = build_decoder(**ARCHITECTURE).train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": settings["weight_decay"]},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=settings["lr"], betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < settings["warmup_steps"]:
            return settings["lr"] * (step + 1) / settings["warmup_steps"]
        progress = (step - settings["warmup_steps"]) / max(1, settings["steps"] - settings["warmup_steps"])
        return settings["min_lr"] + 0.5 * (settings["lr"] - settings["min_lr"]) * (1 + math.cos(math.pi * progress))

    generator = torch.Generator().manual_seed(settings["seed"])
    start, cpu_start = time.perf_counter(), time.process_time()
    order = torch.randperm(len(train), generator=generator)
    cursor = 0
    for step in range(settings["steps"]):
        if cursor + settings["batch_size"] > len(order):
            order, cursor = torch.randperm(len(train), generator=generator), 0
        ids = train[order[cursor: cursor + settings["batch_size"]]]
        cursor += settings["batch_size"]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        logits = model(input_ids=ids).logits[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 100 == 0 or step == settings["steps"] - 1:
            print(f"step {step} loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    state = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()
             if k != "lm_head.weight"}  # tied to the embedding
    torch.save(state, CHECKPOINT_DIR / f"{TEXT_CHECKPOINT}.pt")
    meta = {"name": TEXT_CHECKPOINT, "architecture": ARCHITECTURE, "settings": settings,
            "corpus": "King James Bible, Debian bible-kjv-text (`bible -f Gen1:1-Rev22:21`), verse references removed",
            "split": f"train: first {1 - HELD_OUT_SHARE:.0%} of verses; test: the last {HELD_OUT_SHARE:.0%} "
                     "(Hebrews to Revelation)",
            "train_sequences": len(train), "test_sequences": len(test), "train_tokens_seen":
            settings["steps"] * settings["batch_size"] * length}
    (CHECKPOINT_DIR / f"{TEXT_CHECKPOINT}.json").write_text(json.dumps(meta, indent=2) + "\n")
    shipped, _, _ = load_text_checkpoint()  # the fp16 weights that ship
    meta.update({
        "test_perplexity": round(perplexity(shipped, test), 2),
        "train_perplexity_first_256_sequences": round(perplexity(shipped, train[:256]), 2),
        "parameters": sum(p.numel() for p in shipped.parameters()),
        "file_bytes": (CHECKPOINT_DIR / f"{TEXT_CHECKPOINT}.pt").stat().st_size,
        "train_seconds": round(seconds, 1), "train_cpu_seconds": round(cpu_seconds, 1),
        "torch": torch.__version__,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "load_average_1_5_15_min_at_end": [round(x, 2) for x in os.getloadavg()],
        "command": "python -m benchmarks.train_lm " + " ".join(sys.argv[1:]),
    })
    save_record(CHECKPOINT_DIR / f"{TEXT_CHECKPOINT}.json", meta)


if __name__ == "__main__":
    main()
