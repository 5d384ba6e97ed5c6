"""Where a heal starts: the models prepared once, then healed by the strategy the config names."""

from __future__ import annotations

from typing import Any

from torch import nn

from starfish_plugin.config import HealConfig
from starfish_plugin.core.fsdp import FsdpHeal
from starfish_plugin.core.heal import HealRun
from starfish_plugin.core.sequential import SequentialHeal
from starfish_plugin.errors import ConfigError
from starfish_plugin.report import HealReport
from starfish_plugin.runtime.signals import signals_as_exceptions


def heal_with(
    hooks: Any, pruned: nn.Module, dense: nn.Module, calibration: object, config: HealConfig
) -> HealReport:
    """``starfish.heal`` with the plugin hooks given (``plugin_manager().hook``): the core never
    reaches for the plugin manager itself. ``strategy="joint"`` heals every block at once
    (``HealRun``), ``"sequential"`` one block at a time (``SequentialHeal``), ``"fsdp"`` every
    block at once on FSDP2-sharded copies under torchrun (``FsdpHeal``)."""
    if config.offload != "none" and config.strategy != "sequential":
        raise ConfigError(
            f"offload={config.offload!r} applies to strategy='sequential' (one dense block in memory at a time); "
            f"under strategy={config.strategy!r} the whole dense model runs at once: use offload='none', or "
            "strategy='sequential'"
        )
    with signals_as_exceptions():  # SIGTERM / SIGHUP clean up like Ctrl-C
        run = HealRun.prepare(hooks, pruned, dense, calibration, config)
        try:
            if config.strategy == "sequential":
                return SequentialHeal(run).execute()
            if config.strategy == "fsdp":
                return FsdpHeal(run).execute()
            return run.run()
        finally:
            run.loaded.close()
