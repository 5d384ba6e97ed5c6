"""The text demo: the shipped King James decoder LM pruned 2:4 with torchao's Wanda, healed with
STARFISH on unlabeled token sequences, perplexity before and after on held-out verses."""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
from torch import nn

from starfish_plugin.adapters import recipes
from starfish_plugin.core.nm_pattern import check_nm
from starfish_plugin.demo.text import kjv_splits, load_text_checkpoint, perplexity, token_sequences


def decoder_layers(model: nn.Module) -> nn.Module:
    """The ``ModuleList`` of a Llama-style causal LM's decoder layers."""
    return model.get_submodule("model.layers")


def wanda_24_(model: nn.Module, calibration: torch.Tensor) -> Any:
    """torchao's ``WandaSparsifier`` 2:4 on every Linear of the decoder layers, masks as parametrizations."""
    return wanda_(model, calibration, block_size=4)


def wanda_(model: nn.Module, calibration: torch.Tensor, block_size: int | None = None) -> Any:
    """torchao's ``WandaSparsifier`` at 50 % on every Linear of the decoder layers (per output row,
    or N:M within blocks of ``block_size``: 4 gives 2:4); masks as parametrizations."""
    names = [f"model.layers.{n}.weight" for n, m in decoder_layers(model).named_modules() if isinstance(m, nn.Linear)]
    return recipes.wanda_(model, calibration, names, block_size)


def run_text_demo(epochs: int = 5, n_calibration: int = 256, n_test: int = 128, seed: int = 0,
                  quiet: bool = False) -> dict[str, Any]:
    """Prune, heal and measure; the figures as a dict."""
    import starfish_plugin as starfish

    dense, tokenizer, meta = load_text_checkpoint()
    length = meta["settings"]["sequence_length"]
    splits = kjv_splits()
    train = token_sequences(tokenizer, splits["train"], length)
    calibration = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n_calibration]]
    test = token_sequences(tokenizer, splits["test"], length)[:n_test]
    pruned = copy.deepcopy(dense)
    sparsifier = wanda_24_(pruned, calibration)
    result: dict[str, Any] = {"model": meta["name"], "pruning": "torchao WandaSparsifier 2:4, every decoder Linear",
                              "calibration_sequences": n_calibration, "sequence_length": length, "epochs": epochs,
                              "test_sequences": len(test), "dense_perplexity": perplexity(dense, test),
                              "pruned_perplexity": perplexity(pruned, test)}
    start = time.perf_counter()
    report = starfish.heal(pruned, dense, {"input_ids": calibration}, epochs=epochs, seed=seed, quiet=quiet)
    result["heal_seconds"] = time.perf_counter() - start
    result["healed_perplexity"] = perplexity(pruned, test)
    sparsifier.squash_mask()
    for name, module in decoder_layers(pruned).named_modules():
        if isinstance(module, nn.Linear):
            check_nm(module.weight, name, 2, 4)
    result.update(still_2_4=True, mask_unchanged=report.mask_unchanged, recipe=report.recipe_applied,
                  mean_block_cosine_before=_mean(report.block_cosine_before),
                  mean_block_cosine_after=_mean(report.block_cosine_after))
    return result


def _mean(values: dict[str, float]) -> float:
    return sum(values.values()) / max(1, len(values))


def format_text_table(result: dict[str, Any]) -> str:
    rows = [("dense", result["dense_perplexity"], ""),
            ("pruned (Wanda 2:4)", result["pruned_perplexity"], ""),
            ("healed (STARFISH)", result["healed_perplexity"], f"{result['heal_seconds']:.1f} s")]
    lines = [f"{result['model']}: held-out perplexity on {result['test_sequences']} sequences of "
             f"{result['sequence_length']} tokens; healed on {result['calibration_sequences']} unlabeled sequences "
             f"x {result['epochs']} epochs",
             f"{'model':<22} {'perplexity':>10} {'heal time':>10}"]
    lines += [f"{name:<22} {ppl:>10.2f} {t:>10}" for name, ppl, t in rows]
    before, after = result["mean_block_cosine_before"], result["mean_block_cosine_after"]
    lines.append(f"mean block cosine {before:.4f} -> {after:.4f}; still exactly 2:4 after healing")
    return "\n".join(lines)
