"""The plugin system: hook specifications, the plugin manager, ``attach`` and the built-in plugins
(progress reporting, heal after a pruning step)."""
