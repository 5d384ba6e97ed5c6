"""The lowest layer: how a model is called and what its blocks output. ``runtime``, ``data`` and
``core`` all sit on it; it imports none of them."""
