"""Which modules are "blocks", and capturing their outputs with forward hooks."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from starfish_plugin.base.outputs import OUTPUT_BLOCK  # the model's final output, aligned like a block
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
    if isinstance(getattr(module, "blocks", None), (nn.Sequential, nn.ModuleList)):
        return True
    children = list(module.children())
    return isinstance(module, nn.Sequential) and len(children) > 0 and not any(_is_leaf(c) for c in children)


def _expand(prefix: str, container: nn.Module) -> list[str]:
    names = []
    for child_name, child in container.named_children():
        path = f"{prefix}.{child_name}"
        if isinstance(child, nn.ModuleList):  # never called itself (Twins' stages): what it holds runs
            names += [f"{path}.{n}" for n, c in child.named_children() if not _is_leaf(c)]
        elif _is_stage(child):
            blocks = getattr(child, "blocks", None)
            inner = blocks if isinstance(blocks, (nn.Sequential, nn.ModuleList)) else child
            inner_prefix = f"{path}.blocks" if inner is not child else path
            names += [f"{inner_prefix}.{n}" for n, _ in inner.named_children()]
        elif not _is_leaf(child):  # a single layer (conv, norm, pool) is never a block
            names.append(path)
    return names


# A plain container is not a block of its own: what it holds is.
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)

RULE_FAMILY = "known family"
RULE_HF = "Hugging Face _no_split_modules"
RULE_REPEATED = "repeated composite modules"
RULE_POOL_STAGES = "pooling stage ends of a Sequential of layers"
RULE_EXPLICIT = "given (HealConfig.blocks)"
RULE_PREDICATE = "predicate (HealConfig.blocks)"


@dataclass
class BlockChoice:
    """The blocks a heal aligns and how they were chosen.

    Attributes:
        names: module names, in forward (registration) order.
        rule: which discovery rule chose them (``RULE_*``), or how they were given.
        considered: what each rule looked at, for error messages and the report.
    """

    names: list[str]
    rule: str
    considered: list[str] = field(default_factory=list)


def _family_blocks(model: nn.Module) -> list[str]:
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
    return []


def _hf_blocks(model: nn.Module, considered: list[str]) -> list[str]:
    """Instances of the classes ``transformers`` itself treats as repeated blocks, innermost ones
    (``ConvNextLayer`` rather than the ``ConvNextStage`` holding it), classes seen at least twice."""
    classes = getattr(model, "_no_split_modules", None)
    if not classes:
        return []
    classes = set(classes)
    found = [(n, m) for n, m in model.named_modules() if n and type(m).__name__ in classes]
    counts = Counter(type(m).__name__ for _, m in found)
    considered.append(f"{RULE_HF}: {dict(counts) or sorted(classes)}")
    found = [(n, m) for n, m in found if counts[type(m).__name__] >= 2]
    names = [n for n, _ in found]
    return [n for n in names if not any(o != n and o.startswith(n + ".") for o in names)]


def _repeated_blocks(model: nn.Module, considered: list[str]) -> list[str]:
    """Every instance of the composite class that forms the most runs of same-class siblings
    (decoder layers, residual blocks, a Swin or RegNet stage's blocks); never leaf layers."""
    in_runs: Counter[type] = Counter()
    size: dict[type, int] = {}
    layer_like: set[type] = set()
    for parent in model.modules():
        run: list[nn.Module] = []
        for child in list(parent.children()) + [None]:
            if run and (child is None or type(child) is not type(run[0])):
                if len(run) >= 2:
                    in_runs[type(run[0])] += len(run)
                    size.setdefault(type(run[0]), sum(p.numel() for p in run[0].parameters()))
                run = []
            if child is not None and not _is_leaf(child) and type(child) not in _CONTAINERS:
                if _weight_layers(child) <= 1:  # conv + norm + activation: one layer, not a block
                    layer_like.add(type(child))
                else:
                    run.append(child)
    in_runs = Counter({c: n for c, n in in_runs.items() if c not in layer_like})
    if not in_runs:
        considered.append(f"{RULE_REPEATED}: none (no two sibling composite modules of one class)")
        return []
    total = Counter(type(m) for m in model.modules())
    ranked = sorted(in_runs, key=lambda c: (total[c], in_runs[c], -size[c]), reverse=True)  # finer first
    considered.append(f"{RULE_REPEATED}: " + ", ".join(f"{c.__name__} x{total[c]}" for c in ranked[:5]))
    best = ranked[0]
    names = [n for n, m in model.named_modules() if n and type(m) is best]
    return [n for n in names if not any(o != n and n.startswith(o + ".") for o in names)]  # outermost if nested


def _weight_layers(module: nn.Module) -> int:
    """How many leaf layers with a matrix or kernel weight (Linear, Conv, Embedding) ``module`` holds."""
    return sum(
        1
        for m in module.modules()
        if _is_leaf(m) and isinstance(weight := getattr(m, "weight", None), torch.Tensor) and weight.dim() >= 2
    )


def _pool_stage_blocks(model: nn.Module, considered: list[str]) -> list[str]:
    """A VGG-style ``Sequential`` of conv/norm/activation/pool layers: each pooling layer ends a
    stage, and its output is the stage's output (never every single layer)."""
    best: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Sequential) and all(_is_leaf(c) for c in module.children()):
            pools = [f"{name}.{n}" if name else n for n, c in module.named_children() if isinstance(c, _POOLS)]
            if len(pools) >= 2 and len(pools) > len(best):
                best = pools
    considered.append(f"{RULE_POOL_STAGES}: {len(best) or 'none'}")
    return best


def discover_blocks(model: nn.Module) -> BlockChoice:
    """Choose the blocks of ``model``: the known families, then a Hugging Face model's own
    ``_no_split_modules``, then the most repeated composite class, then the pooling layers that
    end the stages of a plain ``Sequential`` feature extractor.

    Raises:
        BlockError: no rule found blocks; the message lists what each rule considered.
    """
    names = _family_blocks(model)
    if names:
        return BlockChoice(names, RULE_FAMILY)
    considered: list[str] = [f"{RULE_FAMILY}: none of {SUPPORTED_FAMILIES}"]
    for rule, finder in (
        (RULE_HF, _hf_blocks),
        (RULE_REPEATED, _repeated_blocks),
        (RULE_POOL_STAGES, _pool_stage_blocks),
    ):
        names = finder(model, considered)
        if names:
            return BlockChoice(names, rule, considered)
    raise BlockError(
        f"cannot discover the blocks of {type(model).__name__}: no rule found repeated blocks. Considered:\n  - "
        + "\n  - ".join(considered)
        + "\nPass blocks=['name', ...] (module names as in model.named_modules()) or a predicate "
        "blocks=lambda name, module: ... to heal()."
    )


def find_blocks(model: nn.Module) -> list[str]:
    """Names of the modules whose outputs STARFISH aligns, for any model.

    Transformers give their encoder or decoder layers; CNNs give every block of every stage
    (stems and transition layers of known families count as blocks of their own); see
    ``discover_blocks`` for the rules and their order.

    Raises:
        BlockError: no rule applies; pass ``blocks=[names]`` or a predicate.

    Example:
        >>> starfish.find_blocks(timm.create_model("deit_tiny_patch16_224"))[:2]
        ['blocks.0', 'blocks.1']
    """
    return discover_blocks(model).names


def resolve_blocks(
    dense: nn.Module,
    pruned: nn.Module,
    selector: Sequence[str] | Callable[[str, nn.Module], bool] | None,
) -> BlockChoice:
    """Turn a ``HealConfig.blocks`` selector into block names present in both models (the
    model's final output may be named as ``OUTPUT_BLOCK``)."""
    if selector is None:
        choice = discover_blocks(dense)
    elif callable(selector):
        names = [name for name, module in dense.named_modules() if name and selector(name, module)]
        if not names:
            raise BlockError(
                f"the blocks predicate matched no module of {type(dense).__name__}; "
                "check it against [name for name, _ in model.named_modules()]"
            )
        choice = BlockChoice(names, RULE_PREDICATE)
    else:
        choice = BlockChoice(list(selector), RULE_EXPLICIT)
    dense_names = dict(dense.named_modules())
    pruned_names = dict(pruned.named_modules())
    for name in choice.names:
        if name == OUTPUT_BLOCK:
            continue
        for label, table in (("dense", dense_names), ("pruned", pruned_names)):
            if name not in table or name == "":
                close = [n for n in table if n and n.split(".")[-1] == name.split(".")[-1]][:5]
                hint = f" Similar names: {close}." if close else ""
                raise BlockError(
                    f"block {name!r} does not exist in the {label} model {type(table['']).__name__}.{hint} "
                    f"Use names from model.named_modules(), {OUTPUT_BLOCK!r} for the final output, or "
                    "blocks=None for discovery."
                )
    return choice
