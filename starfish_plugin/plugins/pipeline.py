"""Built-in ``starfish_after_prune`` implementation: heal after every pruning step.

The manager builds it with ``make_plugin(pm)``, so it heals through the manager's own hooks
without importing the manager (no import cycle)."""

from __future__ import annotations

from typing import Any

import pluggy
from torch import nn

from starfish_plugin.config import HealConfig, resolve_config
from starfish_plugin.core.entry import heal_with
from starfish_plugin.plugins.hookspecs import hookimpl
from starfish_plugin.report import HealReport


class AfterPrune:
    """Heals ``model`` with ``config`` (the defaults when ``None``) after each pruning step."""

    def __init__(self, hooks: Any) -> None:
        self.hooks = hooks

    @hookimpl
    def starfish_after_prune(
        self, pruner: Any, model: nn.Module, dense: nn.Module, calibration: object, config: HealConfig | None,
        step: int,
    ) -> HealReport:
        return heal_with(self.hooks, model, dense, calibration, resolve_config(config, {}))


def make_plugin(pm: pluggy.PluginManager) -> AfterPrune:
    return AfterPrune(pm.hook)
