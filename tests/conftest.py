"""Shared fixtures: tiny models built fresh for every test, real toolkits, no mocks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import starfish_plugin as starfish
from starfish_plugin.plugins.manager import reset_plugin_manager

torch.set_num_threads(2)


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


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    current = model.state_dict()
    assert set(current) == set(saved)
    for key, value in saved.items():
        assert torch.equal(current[key], value), f"{key} changed"


@pytest.fixture(autouse=True)
def fresh_plugin_manager():
    """Every test starts from a freshly built plugin manager."""
    reset_plugin_manager()
    yield
    reset_plugin_manager()


@pytest.fixture
def dense() -> nn.Module:
    return tiny_vit()


@pytest.fixture
def pruned(dense) -> nn.Module:
    return l1_prune_(copy.deepcopy(dense))


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def labels() -> torch.Tensor:
    return torch.randint(0, 5, (64,), generator=torch.Generator().manual_seed(2))


@pytest.fixture
def fast() -> starfish.HealConfig:
    """A cheap config for unit tests: few epochs, higher lr, no progress output."""
    return starfish.HealConfig(epochs=3, lr=3e-3, batch_size=16, quiet=True, diagnostic_samples=64)
