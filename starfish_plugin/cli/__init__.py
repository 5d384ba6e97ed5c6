"""The ``starfish`` command: heal, eval, bench and demo, with image folders and hub datasets."""

from starfish_plugin.cli.main import main

__all__ = ["main"]
