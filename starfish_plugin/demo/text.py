"""Offline English text for language-model healing: the King James Bible from Debian's
``bible-kjv-text`` package (read through its ``bible`` program), a byte-level BPE tokenizer trained
on it, token sequences, a small Llama-style decoder, and perplexity."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from starfish_plugin.errors import DemoError

KJV_RANGE = "Gen1:1-Rev22:21"
#: the held-out evaluation text: the last 10 % of verses (from Hebrews on); training never sees it
HELD_OUT_SHARE = 0.1
_REFERENCE = re.compile(r"^\S+\d+:\d+ ")


def kjv_verses() -> list[str]:
    """Every verse of the King James Bible, in order, without references."""
    if shutil.which("bible") is None:
        raise DemoError("the King James text is not installed: run `apt-get install -y bible-kjv-text` (Debian's "
                        "package; `make data` does it as root)")
    out = subprocess.run(["bible", "-f", KJV_RANGE], capture_output=True, text=True, timeout=300, check=True).stdout
    verses = [_REFERENCE.sub("", line).strip() for line in out.splitlines()]
    return [v for v in verses if v]


def kjv_splits() -> dict[str, str]:
    """``{"train": ..., "test": ...}``: the first 90 % of verses and the held-out rest, one per line."""
    verses = kjv_verses()
    cut = int(len(verses) * (1 - HELD_OUT_SHARE))
    return {"train": "\n".join(verses[:cut]), "test": "\n".join(verses[cut:])}


def train_tokenizer(text: str, vocab_size: int = 2048) -> Any:
    """A byte-level BPE tokenizer (Hugging Face ``tokenizers``) trained on ``text``."""
    from tokenizers import ByteLevelBPETokenizer

    tokenizer = ByteLevelBPETokenizer()
    tokenizer.train_from_iterator(text.splitlines(), vocab_size=vocab_size, min_frequency=2, show_progress=False)
    return tokenizer


def load_tokenizer(path: str | Path) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def token_sequences(tokenizer: Any, text: str, length: int) -> torch.Tensor:
    """``text`` tokenized as one stream and cut into ``[N, length]`` consecutive sequences."""
    ids = torch.tensor(tokenizer.encode(text).ids, dtype=torch.long)
    n = len(ids) // length
    return ids[: n * length].reshape(n, length)


def build_decoder(
    vocab_size: int, hidden: int = 256, layers: int = 4, heads: int = 4, max_length: int = 256,
) -> nn.Module:
    """A Llama-style decoder LM (``transformers.LlamaForCausalLM``) with tied embeddings, untrained."""
    from starfish_plugin.extras import need

    transformers = need("transformers", "the shipped language model")

    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3 // 16 * 16),
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=max_length, tie_word_embeddings=True,
    )
    return transformers.LlamaForCausalLM(config)


@torch.no_grad()
def perplexity(model: nn.Module, sequences: torch.Tensor, batch_size: int = 32) -> float:
    """exp of the mean next-token cross-entropy over every position of ``sequences``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for start in range(0, len(sequences), batch_size):
            ids = sequences[start: start + batch_size].to(device)
            logits = model(input_ids=ids).logits[:, :-1].float()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
            total += float(loss)
            count += ids[:, 1:].numel()
    finally:
        model.train(was_training)
    return math.exp(total / count)


TEXT_CHECKPOINT = "kjv_llama"


def load_text_checkpoint(name: str = TEXT_CHECKPOINT) -> tuple[nn.Module, Any, dict[str, Any]]:
    """The shipped decoder LM, its tokenizer and its record (``python -m benchmarks.train_lm``)."""
    import json

    from starfish_plugin.demo.zoo import CHECKPOINT_DIR

    weights, record = CHECKPOINT_DIR / f"{name}.pt", CHECKPOINT_DIR / f"{name}.json"
    if not weights.exists() or not record.exists():
        raise DemoError(f"{weights} is missing; recreate it with `python -m benchmarks.train_lm`")
    meta = json.loads(record.read_text())
    model = build_decoder(**meta["architecture"])
    state = torch.load(weights, map_location="cpu", weights_only=True)
    result = model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()},
                                   strict=False)
    if set(result.missing_keys) - {"lm_head.weight"} or result.unexpected_keys:  # lm_head is tied to the embedding
        raise DemoError(f"{weights} does not fit the recorded architecture (missing {result.missing_keys}, "
                        f"unexpected {result.unexpected_keys}); recreate it with `python -m benchmarks.train_lm`")
    model.tie_weights()  # type: ignore[operator]
    return model.eval(), load_tokenizer(CHECKPOINT_DIR / f"{name}.tokenizer.json"), meta

