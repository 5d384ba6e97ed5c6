"""Which modules are "blocks", and capturing their outputs with forward hooks."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from starfish_plugin.errors import BlockError

# Where known families keep their sequence of blocks (or of stages of blocks), in lookup order.
CONTAINER_PATHS: tuple[str, ...] = (
    "blocks",  # timm ViT / DeiT / DeiT3, timm EfficientNet / MobileNetV1-V3 (stages of blocks)
    "encoder.layers",  # torchvision VisionTransformer
    "stages",  # timm ConvNeXt and other staged timm CNNs
    "features",  # torchvision MobileNetV2 / V3, EfficientNet, ConvNeXt
)
RESNET_STAGES: tuple[str, ...] = ("layer1", "layer2", "layer3", "layer4")
SUPPORTED_FAMILIES = (
    "timm VisionTransformer (ViT, DeiT, DeiT3), torchvision VisionTransformer, "
    "ResNet, MobileNetV1/V2/V3, EfficientNet, ConvNeXt (timm and torchvision)"
)


def _get(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _is_leaf(module: nn.Module) -> bool:
    return next(module.children(), None) is None


def _is_stage(module: nn.Module) -> bool:
    """A stage is a Sequential of composite modules (blocks), not a Sequential of layers."""
    if isinstance(getattr(module, "blocks", None), nn.Sequential):
        return True
    children = list(module.children())
    return isinstance(module, nn.Sequential) and len(children) > 0 and not any(_is_leaf(c) for c in children)


def _expand(prefix: str, container: nn.Module) -> list[str]:
    names = []
    for child_name, child in container.named_children():
        path = f"{prefix}.{child_name}"
        if _is_stage(child):
            inner = child.blocks if isinstance(getattr(child, "blocks", None), nn.Sequential) else child
            inner_prefix = f"{path}.blocks" if inner is not child else path
            names += [f"{inner_prefix}.{n}" for n, _ in inner.named_children()]
        else:
            names.append(path)
    return names


def find_blocks(model: nn.Module) -> list[str]:
    """Names of the modules whose outputs STARFISH aligns, for known model families.

    Transformers give their encoder blocks; CNNs give every block of every stage (stems and
    transition layers count as blocks of their own).

    Raises:
        BlockError: the model is of no known family; pass ``blocks=[names]`` or a predicate.

    Example:
        >>> starfish.find_blocks(timm.create_model("deit_tiny_patch16_224"))[:2]
        ['blocks.0', 'blocks.1']
    """
    if all(_get(model, name) is not None for name in RESNET_STAGES):
        names = []
        for stage in RESNET_STAGES:
            names += [f"{stage}.{n}" for n, _ in model.get_submodule(stage).named_children()]
        if names:
            return names
    for path in CONTAINER_PATHS:
        container = _get(model, path)
        if isinstance(container, (nn.Sequential, nn.ModuleList)) and len(container) > 0:
            names = _expand(path, container)
            if names:
                return names
    raise BlockError(
        f"cannot discover the blocks of {type(model).__name__}: it is none of the known families "
        f"({SUPPORTED_FAMILIES}). Pass blocks=['name', ...] (module names as in model.named_modules()) "
        "or a predicate blocks=lambda name, module: ... to heal()."
    )


def resolve_blocks(
    dense: nn.Module,
    pruned: nn.Module,
    selector: Sequence[str] | Callable[[str, nn.Module], bool] | None,
) -> list[str]:
    """Turn a ``HealConfig.blocks`` selector into block names present in both models."""
    if selector is None:
        names = find_blocks(dense)
    elif callable(selector):
        names = [name for name, module in dense.named_modules() if name and selector(name, module)]
        if not names:
            raise BlockError(
                f"the blocks predicate matched no module of {type(dense).__name__}; "
                "check it against [name for name, _ in model.named_modules()]"
            )
    else:
        names = list(selector)
    dense_names = dict(dense.named_modules())
    pruned_names = dict(pruned.named_modules())
    for name in names:
        for label, table in (("dense", dense_names), ("pruned", pruned_names)):
            if name not in table or name == "":
                close = [n for n in table if n and n.split(".")[-1] == name.split(".")[-1]][:5]
                hint = f" Similar names: {close}." if close else ""
                raise BlockError(
                    f"block {name!r} does not exist in the {label} model {type(table['']).__name__}.{hint} "
                    "Use names from model.named_modules(), or blocks=None for discovery."
                )
    return names


def _first_tensor(output: object, name: str) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise BlockError(f"block {name!r} returned {type(output).__name__}, not a tensor; choose another block")


def require_outputs(outputs: dict[str, torch.Tensor], names: Sequence[str], label: str) -> None:
    """Raise ``BlockError`` if a block produced no output in the last forward."""
    missing = [n for n in names if n not in outputs]
    if missing:
        raise BlockError(
            f"block(s) {missing} of the {label} model exist but are not called in its forward; choose blocks "
            "that run (blocks=[...])"
        )


@contextmanager
def capture_outputs(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Record each named block's output (its first tensor) on every forward, keyed by name.

    The dictionary is refilled by each forward; hooks are removed on exit.
    """
    outputs: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for name in names:
            module = model.get_submodule(name)

            def hook(_module, _args, output, name=name):
                outputs[name] = _first_tensor(output, name)

            handles.append(module.register_forward_hook(hook))
        yield outputs
    finally:
        for handle in handles:
            handle.remove()
