"""Pruning and packing recipes written with the toolkits' own APIs, for the demos, benchmarks and
the deployment helpers: the only place outside the mask adapters that imports a toolkit."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn


def prune_llama_mlp_width_(model: nn.Module, example_ids: torch.Tensor, ratio: float = 0.5) -> None:
    """Torch-Pruning's ``MetaPruner`` (L2 group magnitude) removes ``ratio`` of the MLP hidden units
    of every decoder layer of a Llama-style causal LM (``tp_build.mlp_width_pruner``); attention,
    embedding and LM head stay whole, so every decoder layer's output keeps its width."""
    from starfish_plugin.adapters.tp_build import mlp_width_pruner

    mlp_width_pruner(model, {"input_ids": example_ids}, ratio).step()


def wanda_(model: nn.Module, calibration: torch.Tensor, tensor_fqns: list[str], block_size: int | None = None) -> Any:
    """torchao's ``WandaSparsifier`` at 50 % on the weights ``tensor_fqns`` (per output row, or N:M
    within blocks of ``block_size``: 4 gives 2:4), its activation observers fed ``calibration``
    token ids 32 at a time; masks as parametrizations."""
    from torchao.sparsity import WandaSparsifier

    sparsifier = WandaSparsifier(sparsity_level=0.5, semi_structured_block_size=block_size)
    sparsifier.prepare(model, [{"tensor_fqn": n} for n in tensor_fqns])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for batch in calibration.split(32):
            model(input_ids=batch)  # Wanda's activation observers
    sparsifier.step()
    return sparsifier


def torchao_semi_sparse_(model: nn.Module, names: set[str]) -> None:
    """torchao's ``sparsify_`` with its 2:4 semi-structured weight config on the Linear layers named
    ``names`` (CUDA; the caller has checked every weight)."""
    from torchao.sparsity import semi_sparse_weight, sparsify_

    sparsify_(model, semi_sparse_weight(), filter_fn=lambda m, fqn: fqn in names)
