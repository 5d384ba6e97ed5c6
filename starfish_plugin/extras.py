"""Optional dependencies: import them by name, and say which extra installs one that is missing."""

from __future__ import annotations

import importlib
from types import ModuleType

from starfish_plugin.errors import MissingDependencyError

# top-level module -> (distribution, the extra of starfish-plugin that installs it)
EXTRAS: dict[str, tuple[str, str]] = {
    "matplotlib": ("matplotlib", "bench"),
    "transformers": ("transformers", "hf"),
    "safetensors": ("safetensors", "hf"),
    "torch_pruning": ("torch-pruning", "torch-pruning"),
    "torchao": ("torchao", "torchao"),
    "datasets": ("datasets", "cli"),
    "PIL": ("pillow", "cli"),
    "torchvision": ("torchvision", "cli"),
    "timm": ("timm", "demo"),
    "sklearn": ("scikit-learn", "demo"),
    "onnx": ("onnx", "onnx"),
    "onnxscript": ("onnxscript", "onnx"),
    "onnxruntime": ("onnxruntime", "onnx"),
}


def install_hint(module: str) -> str:
    """``pip install "starfish-plugin[extra]"`` for ``module`` (or the package itself)."""
    top = module.split(".")[0]
    distribution, extra = EXTRAS.get(top, (top, ""))
    return f'pip install "starfish-plugin[{extra}]"' if extra else f"pip install {distribution}"


def need(module: str, purpose: str) -> ModuleType:
    """``import module``, or a ``MissingDependencyError`` naming ``purpose`` and the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        distribution = EXTRAS.get(top, (top, ""))[0]
        raise MissingDependencyError(
            f"{purpose} needs {distribution}, which is not installed: {install_hint(module)}"
        ) from exc
