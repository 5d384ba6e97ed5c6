"""The plugin manager: built-in plugins, then third-party ones from the ``starfish`` entry points.

Environment variables:
    STARFISH_PLUGINS: comma-separated plugin names to load (built-in and third-party); unset loads all.
        Set it to an empty string to load none.
    STARFISH_TRACE_HOOKS: set to 1 to print every hook call and its result to stderr.
"""

from __future__ import annotations

import importlib
import os
import sys

import pluggy

from starfish_plugin.plugins import hookspecs

DEFAULT_PLUGINS: tuple[str, ...] = (
    "starfish_plugin.adapters.torch_masks",
    "starfish_plugin.adapters.tp_graph",
    "starfish_plugin.adapters.nm_layouts",
    "starfish_plugin.plugins.progress",
    "starfish_plugin.plugins.pipeline",
)
ENTRY_POINT_GROUP = "starfish"

_pm: pluggy.PluginManager | None = None


def _allowed() -> set[str] | None:
    raw = os.environ.get("STARFISH_PLUGINS")
    if raw is None:
        return None
    return {name.strip() for name in raw.split(",") if name.strip()}


def _trace(pm: pluggy.PluginManager) -> None:
    def before(hook_name, hook_impls, kwargs):
        names = ", ".join(pm.get_name(impl.plugin) or "?" for impl in hook_impls)
        print(f"[starfish] {hook_name}({', '.join(sorted(kwargs))}) -> [{names}]", file=sys.stderr)

    def after(outcome, hook_name, hook_impls, kwargs):
        print(f"[starfish] {hook_name} returned {type(outcome.get_result()).__name__}", file=sys.stderr)

    pm.add_hookcall_monitoring(before, after)


def build_plugin_manager() -> pluggy.PluginManager:
    """A fresh manager with the built-in plugins and the ``starfish`` entry points registered."""
    pm = pluggy.PluginManager("starfish")
    pm.add_hookspecs(hookspecs)
    allowed = _allowed()
    for module_name in DEFAULT_PLUGINS:
        short = module_name.rsplit(".", 1)[-1]
        if allowed is None or short in allowed or module_name in allowed:
            module = importlib.import_module(module_name)
            factory = getattr(module, "make_plugin", None)  # a plugin that needs the manager's hooks
            pm.register(factory(pm) if callable(factory) else module, name=short)
    if allowed is None:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    else:
        for name in allowed:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=name)
    pm.check_pending()
    if os.environ.get("STARFISH_TRACE_HOOKS", "") not in ("", "0"):
        _trace(pm)
    return pm


def plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, built on first use.

    Register your own hook implementations on it::

        class MyLogger:
            @starfish.hookimpl
            def starfish_epoch_ended(self, epoch, loss):
                print(epoch, loss)

        starfish.plugin_manager().register(MyLogger())
    """
    global _pm
    if _pm is None:
        _pm = build_plugin_manager()
    return _pm


def reset_plugin_manager() -> None:
    """Forget the process-wide manager; the next ``plugin_manager()`` builds a fresh one."""
    global _pm
    _pm = None
