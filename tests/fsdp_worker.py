"""Run by ``test_fsdp.py`` under torchrun: heal with ``strategy="fsdp"`` on 2 CPU ranks (gloo) and
write what each rank ended with to ``<out>/rank<r>.json``.

Models (argument ``case``): ``llama`` (a tiny Hugging Face Llama, decoder Linears pruned with
``torch.nn.utils.prune`` hooks), ``vit_24`` (the tiny ViT, block Linears 2:4-pruned with
``torch.ao.pruning.WeightNormSparsifier`` parametrizations).
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from ddp_worker import Crash, run_in_group  # noqa: E402
from helpers import sparsify_2_4_, tiny_vit  # noqa: E402

import starfish_plugin as starfish  # noqa: E402
from starfish_plugin.runtime.fingerprint import model_fingerprint  # noqa: E402


def llama() -> tuple[nn.Module, nn.Module, object]:
    import transformers
    from torch.nn.utils import prune

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
    dense = transformers.LlamaForCausalLM(config).eval()
    pruned = copy.deepcopy(dense)
    for module in pruned.model.layers.modules():
        if isinstance(module, nn.Linear):
            prune.l1_unstructured(module, "weight", 0.6)
    tokens = torch.randint(1, 64, (96, 16), generator=torch.Generator().manual_seed(1))
    return dense, pruned, tokens


def vit_24() -> tuple[nn.Module, nn.Module, object]:
    dense = tiny_vit(depth=3)
    pruned = copy.deepcopy(dense)
    sparsify_2_4_(pruned, "blocks.")
    images = torch.randn(96, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    return dense, pruned, images


def _heal(out: Path, case: str, checkpoint_dir: str | None = None, crash_step: int = 0) -> None:
    rank = dist.get_rank()
    if crash_step and rank == 1:
        starfish.plugin_manager().register(Crash(crash_step))
    dense, pruned, calibration = {"llama": llama, "vit_24": vit_24}[case]()
    dense_before = model_fingerprint(dense)
    masks_before = {n: b.clone() for n, b in pruned.named_buffers() if n.endswith("mask")}
    extra = json.loads(os.environ.get("FSDP_WORKER_HEAL_SETTINGS", "{}"))
    settings = dict(strategy="fsdp", epochs=3, lr=3e-3, batch_size=16, quiet=True, holdout=0.34,
                    checkpoint_dir=checkpoint_dir) | extra
    report = starfish.heal(pruned, dense, calibration, **settings)
    masks_after = {n: b for n, b in pruned.named_buffers() if n.endswith("mask")}
    if case == "vit_24":
        from starfish_plugin.core.nm_pattern import check_nm

        for name, module in pruned.named_modules():
            if hasattr(module, "parametrizations"):
                check_nm(module.weight.detach(), name, 2, 4)  # raises if the healed weight is not 2:4
    (out / f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "weights": model_fingerprint(pruned), "epoch_losses": report.epoch_losses,
        "cosine_before": report.block_cosine_before, "cosine_after": report.block_cosine_after,
        "held_out_before": report.held_out_before, "held_out_after": report.held_out_after,
        "output_cosine_before": report.output_cosine_before, "output_cosine_after": report.output_cosine_after,
        "returned_state": report.returned_state, "strategy": report.strategy, "world_size": report.world_size,
        "notes": report.notes, "steps": report.steps, "n_samples": report.n_samples,
        "resumed_after_epoch": report.resumed_after_epoch, "held_out_samples": report.held_out_samples,
        "mask_unchanged": report.mask_unchanged, "masked_weights_zero": report.masked_weights_zero,
        "masks_identical": len(masks_before) > 0 and all(torch.equal(masks_before[n], masks_after[n])
                                                         for n in masks_before),
        "dense_untouched": model_fingerprint(dense) == dense_before,
        "types": sorted({type(p).__name__ for p in pruned.parameters()}),
    }))


def main(*args: Any) -> None:
    run_in_group(_heal, *args)

if __name__ == "__main__":
    # fsdp_worker.py OUT CASE [CHECKPOINT_DIR CRASH_STEP]
    main(Path(sys.argv[1]), sys.argv[2], *(sys.argv[3:4]), *(int(a) for a in sys.argv[4:5]))
