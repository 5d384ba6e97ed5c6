"""The pruning recipes the benchmarks share, all through the real toolkits: magnitude pruning of
the shipped ViT (``prune_vit_``, the demo's), torch.ao 2:4, global L1 over a CNN's convolutions,
and Torch-Pruning channels (CNN) or MLP units and heads (ViT)."""

from __future__ import annotations

import timm
import torch
from torch import nn
from torch.ao.pruning import WeightNormSparsifier
from torch.nn.utils import prune

from starfish_plugin.demo.run import prune_vit_

__all__ = ["prune_vit_", "prune_24_", "conv_weights", "prune_l1_global_", "prune_tp_", "make_vit_pruner"]


def prune_24_(model: torch.nn.Module) -> torch.nn.Module:
    """2:4 masks on every qkv/proj/fc1/fc2 weight with torch.ao's WeightNormSparsifier (kept as
    parametrizations, the form torchao's sparsifiers leave before ``squash_mask``)."""
    names = [name for name, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in ("qkv", "proj", "fc1", "fc2")]
    sparsifier = WeightNormSparsifier(sparsity_level=1.0, sparse_block_shape=(1, 4), zeros_per_block=2)
    sparsifier.prepare(model, [{"tensor_fqn": f"{name}.weight"} for name in names])
    sparsifier.step()
    return model


def conv_weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, "weight") for m in model.modules() if isinstance(m, nn.Conv2d)]


def prune_l1_global_(model: nn.Module, amount: float) -> nn.Module:
    """Global L1-unstructured pruning of every Conv2d weight (masks as torch.nn.utils.prune leaves them)."""
    prune.global_unstructured(conv_weights(model), pruning_method=prune.L1Unstructured, amount=amount)
    return model


def prune_tp_(model: nn.Module, ratio: float, example: torch.Tensor) -> nn.Module:
    """Torch-Pruning channel pruning of ``model`` in place, kept channels recorded for healing."""
    import torch_pruning as tp

    from starfish_plugin.adapters import tp_graph

    pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.MagnitudeImportance(p=2),
                                  pruning_ratio=ratio, ignored_layers=[model.head])
    tp_graph.track(pruner)  # before the step: heal needs the kept channels to index the dense targets
    pruner.step()
    return model


def make_vit_pruner(model: torch.nn.Module, panel: str, ratio: float, example: torch.Tensor | None = None):
    """A MetaPruner over MLP hidden units (``mlp``) or MLP units and whole heads (``mlp_heads``)
    of a timm ViT (``example``: one input, by default a 28 px grayscale image)."""
    example = torch.randn(1, 1, 28, 28) if example is None else example
    ignored = [model.head, model.patch_embed.proj]
    for block in model.blocks:
        ignored += [block.mlp.fc2, block.attn.proj]  # the residual stream stays whole
        if panel == "mlp":
            ignored.append(block.attn.qkv)
    kwargs = {}
    if panel == "mlp_heads":
        heads = {m.qkv: m.num_heads for m in model.modules() if isinstance(m, timm.layers.Attention)}
        kwargs = {"num_heads": heads, "prune_num_heads": True, "prune_head_dims": False, "head_pruning_ratio": ratio}
    import torch_pruning as tp

    return tp.pruner.MetaPruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                pruning_ratio=ratio, ignored_layers=ignored, **kwargs)
