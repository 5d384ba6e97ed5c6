"""What images a model takes: side, channels and normalization, read from the model itself (or
the shipped model's record), so that every command works without image flags."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from torch import nn

from starfish_plugin.cli.image_folders import NORMALIZATIONS
from starfish_plugin.errors import ConfigError


@dataclass(frozen=True)
class ImageDefaults:
    """``size``: the side the model requires (``None``: it takes any size); ``channels``; ``mean``
    and ``std`` after scaling pixels to [0, 1]; ``source``: where these came from."""

    size: int | None
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str


def _fixed_size(model: nn.Module) -> int | None:
    """The image side a model requires: a timm ViT's ``patch_embed.img_size`` (when not dynamic) or
    a torchvision ViT's ``image_size``; ``None`` for models that take any size (CNNs)."""
    embed = getattr(model, "patch_embed", None)
    size = getattr(embed, "img_size", None)
    if size is not None and not getattr(embed, "dynamic_img_size", False) and getattr(embed, "strict_img_size", True):
        return int(size[0] if isinstance(size, (tuple, list)) else size)
    size = getattr(model, "image_size", None)
    return int(size) if isinstance(size, int) else None


def _first_channels(model: nn.Module) -> int:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    return 3


def image_defaults(spec: str, model: nn.Module) -> ImageDefaults:
    """The images ``model`` (built from ``--model spec``) takes."""
    source, _, name = spec.partition(":")
    if source == "starfish":
        from starfish_plugin.demo.zoo import IMAGES

        info = IMAGES[name]
        return ImageDefaults(info["size"], info["channels"], info["mean"], info["std"], f"the shipped {name} record")
    channels = _first_channels(model)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    mean, std = NORMALIZATIONS["imagenet"]
    where = "ImageNet mean/std"
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("mean") and cfg.get("std"):
        mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
        where = "timm's pretrained_cfg mean/std"
    if len(mean) != channels:
        mean, std = (sum(mean) / len(mean),) * channels, (sum(std) / len(std),) * channels
    return ImageDefaults(_fixed_size(model), channels, mean, std, f"the model ({where})")


def apply_image_defaults(args: argparse.Namespace, spec: str, model: nn.Module) -> str:
    """Fill ``--image-size``, ``--channels`` and ``--mean/--std`` that were not given from the
    model; refuse flags the model cannot take, naming the fix. Returns a line saying what is used."""
    found = image_defaults(spec, model)
    if getattr(args, "channels", None) is None:
        args.channels = found.channels
    elif args.channels != found.channels:
        raise ConfigError(
            f"{spec} takes {found.channels}-channel images but --channels is {args.channels}; drop --channels "
            "(it is read from the model)"
        )
    size = getattr(args, "image_size", None)
    if size is None:
        args.image_size = found.size
    elif found.size is not None and size != found.size:
        raise ConfigError(
            f"{spec} is built for {found.size}-pixel images but --image-size is {size}; drop --image-size, or "
            f"build the model for that size with --model-arg img_size={size} (weights trained at that size)"
        )
    norm = "as given"
    if hasattr(args, "normalize") and args.normalize is None and args.mean is None:
        args.mean, args.std = list(found.mean), list(found.std)
        norm = f"mean {_short(found.mean)}, std {_short(found.std)} from {found.source}"
    side = f"{args.image_size} px" if args.image_size else "any size (the images' own)"
    return f"{spec} takes {args.channels}-channel images of {side}; normalization {norm}"


def _short(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"
