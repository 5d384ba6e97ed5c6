"""Serve a healed model: ``export`` it in the forms serving engines load, ``load_exported`` it back."""

from starfish_plugin.serve.export import FORMATS, export, load_exported

__all__ = ["FORMATS", "export", "load_exported"]
