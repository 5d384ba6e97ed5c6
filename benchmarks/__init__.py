"""Benchmarks of starfish-plugin, run from the repository root as modules:
``python -m benchmarks.<name>`` (see each module's docstring). Results go to ``benchmarks/results``."""
