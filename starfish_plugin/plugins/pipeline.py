"""Built-in ``starfish_after_prune`` implementation: heal after every pruning step."""

from __future__ import annotations

from starfish_plugin.plugins.hookspecs import hookimpl


@hookimpl
def starfish_after_prune(pruner, model, dense, calibration, config, step):
    from starfish_plugin.core.heal import heal

    return heal(model, dense, calibration, config)
