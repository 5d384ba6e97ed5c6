"""Helpers the tests share: a tiny timm ViT, L1 pruning of its Linear layers, state snapshots."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import prune


def tiny_vit(depth: int = 2, seed: int = 0) -> nn.Module:
    """A two-block timm ViT on 8x8 one-channel images (patch 4, dim 32)."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    return VisionTransformer(
        img_size=8, patch_size=4, in_chans=1, num_classes=5, embed_dim=32, depth=depth, num_heads=2, mlp_ratio=2.0
    ).eval()


def prunable_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in ("qkv", "proj", "fc1", "fc2")
    ]


def l1_prune_(model: nn.Module, amount: float = 0.7) -> nn.Module:
    for _, module in prunable_linears(model):
        prune.l1_unstructured(module, "weight", amount=amount)
    return model


def sparsify_2_4_(model: nn.Module, contains: str) -> list[str]:
    """torch.ao's ``WeightNormSparsifier`` 2:4 (masks as parametrizations) on every Linear whose name
    contains ``contains``; returns their names."""
    from torch.ao.pruning import WeightNormSparsifier

    layers = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and contains in n]
    sparsifier = WeightNormSparsifier(sparsity_level=1.0, sparse_block_shape=(1, 4), zeros_per_block=2)
    sparsifier.prepare(model, [{"tensor_fqn": f"{n}.weight"} for n in layers])
    sparsifier.step()
    return layers


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    current = model.state_dict()
    assert set(current) == set(saved)
    for key, value in saved.items():
        assert torch.equal(current[key], value), f"{key} changed"


def improved_or_restored(report) -> bool:
    """What a heal promises: the judged objective fell and the final output came no further from
    the dense model's; or nothing did, and the pruned weights came back unchanged (the report says so)."""
    if report.worse_restored:
        return report.returned_state == "start" and report.held_out_after == report.held_out_before
    output_ok = report.output_cosine_after is None or report.output_cosine_after >= report.output_cosine_before
    return report.held_out_after < report.held_out_before and output_ok
