"""What a repair after a Torch-Pruning step changed (``Fix``) or found it could not (``Misfit``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn


@dataclass(frozen=True)
class Fix:
    """``module.attribute`` changed from ``before`` to ``after`` by ``rule``."""

    module: str
    attribute: str
    before: Any
    after: Any
    rule: str

    def __str__(self) -> str:
        return f"{self.module or '(model)'}.{self.attribute}: {self.before} -> {self.after} ({self.rule})"


@dataclass(frozen=True)
class Misfit:
    """``what`` in ``module`` should be ``expected`` but is ``found``; ``fix`` says how to set the
    pruner up so that it is."""

    module: str
    what: str
    expected: Any
    found: Any
    fix: str

    def __str__(self) -> str:
        return f"{self.what}: expected {self.expected}, found {self.found} ({self.fix})"


def set_attribute(name: str, module: nn.Module, attribute: str, value: Any, rule: str) -> list[Fix]:
    """``module.<attribute> = value`` (a plain attribute), recorded if it changed."""
    before = getattr(module, attribute)
    if before == value:
        return []
    setattr(module, attribute, value)
    return [Fix(name, attribute, before, value, rule)]
