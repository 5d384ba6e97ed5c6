"""Hugging Face's ``Conv1D`` (GPT-2's linear layer, its weight stored ``(in, out)``) for
Torch-Pruning 1.6.1, which has no pruning function for it and whose importance criteria skip layer
types they do not know: ``customized_pruners=conv1d_pruners()`` lets it remove Conv1D channels,
and ``Conv1DMagnitude`` ranks them (L2 norm of each channel's weights over the whole group).
``tp_build.gpt2_mlp_pruner`` puts both together for MLP-width pruning."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


def _conv1d_class() -> type:
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def conv1d_pruners() -> dict[type, Any]:
    """``{Conv1D: its Torch-Pruning pruning function}`` for ``customized_pruners=``."""
    import torch_pruning as tp

    class Conv1DPruner(tp.pruner.function.BasePruningFunc):
        """Out channels are the weight's columns (and the bias), in channels its rows."""

        def prune_out_channels(self, layer: Any, idxs: Sequence[int]) -> nn.Module:
            keep = sorted(set(range(layer.nf)) - {int(i) for i in idxs})
            layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 1)
            layer.bias = self._prune_parameter_and_grad(layer.bias, keep, 0)
            layer.nf = len(keep)
            return layer

        def prune_in_channels(self, layer: Any, idxs: Sequence[int]) -> nn.Module:
            keep = sorted(set(range(layer.weight.shape[0])) - {int(i) for i in idxs})
            layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 0)
            return layer

        def get_out_channels(self, layer: Any) -> int:
            return int(layer.weight.shape[1])

        def get_in_channels(self, layer: Any) -> int:
            return int(layer.weight.shape[0])

    return {_conv1d_class(): Conv1DPruner()}


def conv1d_magnitude(graph: Any) -> Any:
    """A Torch-Pruning importance that ranks each channel of a group by the squared L2 norm of its
    weights in every Conv1D of the group (columns where the group prunes outputs, rows where it
    prunes inputs). ``graph``: the pruner's ``DG``."""
    import torch_pruning as tp

    conv1d: Any = _conv1d_class()

    class Conv1DMagnitude(tp.importance.Importance):
        @torch.no_grad()
        def __call__(self, group: Any) -> torch.Tensor:
            root = {int(getattr(i, "root_idx", i)): k for k, i in enumerate(group[0][1])}
            score = torch.zeros(len(root))
            for dep, idxs in group:
                layer: Any = dep.target.module
                if not isinstance(layer, conv1d):
                    continue
                plain = [int(getattr(i, "idx", i)) for i in idxs]
                weight = layer.weight.detach().float().cpu()
                outputs = graph.is_out_channel_pruning_fn(dep.handler)
                part = weight[:, plain].pow(2).sum(0) if outputs else weight[plain, :].pow(2).sum(1)
                for i, value in zip(idxs, part, strict=True):
                    position = root.get(int(getattr(i, "root_idx", i)))
                    if position is not None:
                        score[position] += value
            return score

    return Conv1DMagnitude()
