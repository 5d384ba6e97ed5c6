"""Shared fixtures: tiny models built fresh for every test, real toolkits, no mocks."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from helpers import l1_prune_, tiny_vit
from torch import nn

import starfish_plugin as starfish
from starfish_plugin.plugins.manager import reset_plugin_manager

# Under pytest-xdist (`make test` runs two workers) each worker takes one core.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


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
