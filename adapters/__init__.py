"""Built-in adapters, installed as ``starfish_plugin.adapters``: one pluggy plugin per toolkit form."""
