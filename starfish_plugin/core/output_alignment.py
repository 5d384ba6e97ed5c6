"""The model's final output as one more block: when pruned weights get no training signal from the
blocks (a pruned classifier head after the last block), the output is aligned too."""

from __future__ import annotations

import torch
from torch import nn

from starfish_plugin.base.model_io import Inputs, call_model
from starfish_plugin.base.outputs import OUTPUT_BLOCK, capture_outputs
from starfish_plugin.config import HealConfig
from starfish_plugin.core.losses import cosine_distance
from starfish_plugin.core.plan import SparsityPlan
from starfish_plugin.core.trainable import trainable_only
from starfish_plugin.errors import BlockError


def params_without_signal(
    model: nn.Module,
    plan: SparsityPlan,
    params: list[nn.Parameter],
    blocks: list[str],
    x: Inputs,
    targets: dict[str, torch.Tensor],
    reduction: str,
) -> tuple[list[nn.Parameter], list[str]]:
    """The tensors of ``params`` that no block's output depends on (no gradient reaches them) on
    the batch ``x``, and the blocks in the order they ran; ``targets`` holds the dense outputs of
    ``blocks`` on ``x``."""
    with trainable_only(model, params), torch.enable_grad(), capture_outputs(model, blocks) as outputs:
        plan.refresh()
        call_model(model, x)
        order = list(outputs)
        loss = sum(cosine_distance(outputs[b].float(), targets[b], reduction) for b in blocks)
        if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
            return list(params), order
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [p for p, g in zip(params, grads) if g is None], order


def _names_of(plan: SparsityPlan, params: list[nn.Parameter]) -> list[str]:
    ids = {id(p) for p in params}
    return [e.name for e in plan if id(e.parameter) in ids]


def choose_output_alignment(
    pruned: nn.Module,
    plan: SparsityPlan,
    blocks: list[str],
    candidate: bool,
    probe_x: Inputs,
    probe_out: dict[str, torch.Tensor],
    config: HealConfig,
    notes: list[str],
) -> tuple[list[str], str | None, list[str]]:
    """``blocks``, with the model's final output added when pruned weights would otherwise get no
    training signal (``align_output="auto"``) or when asked (``"always"``); and the block whose
    output is detached on its way to the rest of the model, so that the output's loss trains only
    the weights after the blocks and leaves the block alignment to the blocks' own losses.

    Raises:
        BlockError: no pruned weight gets any training signal from the chosen blocks.
    """
    params = plan.parameters()
    detach_at = None
    x = probe_x[: min(8, len(probe_x))]
    targets = {name: out[: len(x)] for name, out in probe_out.items()}
    silent, order = params_without_signal(pruned, plan, params, blocks, x, targets, config.cosine_reduction)
    if candidate and (config.align_output == "always" or silent):
        why = (
            "asked (align_output='always')"
            if not silent
            else (
                f"{len(silent)} pruned tensor(s) outside every block get no signal from the blocks: "
                f"{_names_of(plan, silent)[:5]}"
            )
        )
        last = order[-1] if order else None
        notes.append(
            f"the model's final output is aligned as one more block {OUTPUT_BLOCK!r}: {why}; its loss "
            f"trains only the weights after the last block ({last})"
        )
        blocks = blocks + [OUTPUT_BLOCK]
        silent, _ = params_without_signal(pruned, plan, params, blocks, x, targets, config.cosine_reduction)
        detach_at = last
    if silent and len(silent) == len(params):
        raise BlockError(
            f"none of the {len(params)} pruned tensors of {type(pruned).__name__} gets a training signal from the "
            f"blocks {blocks[:6]}: no block output depends on them (e.g. {_names_of(plan, silent)[:3]}). Choose "
            f"blocks that contain or follow the pruned layers (HealConfig.blocks), or align the final output "
            f"(align_output='auto' or 'always')"
        )
    if silent:
        notes.append(
            f"{len(silent)} pruned tensor(s) get no training signal and stay as pruned: {_names_of(plan, silent)[:5]}"
        )
    return blocks, detach_at, _names_of(plan, silent)
