"""Small models for the demo, tests and benchmarks, with the shipped checkpoints that fit them.

Two ViTs (timm ``VisionTransformer``) and one ResNet-style CNN (``SmallResNet``, defined here).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import cast

import torch
from torch import nn

from starfish_plugin.demo.datasets import FASHION_MNIST_MEAN, FASHION_MNIST_STD
from starfish_plugin.errors import DemoError

CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"


@dataclass(frozen=True)
class TinyViTSpec:
    """Shape of a small timm VisionTransformer."""

    img_size: int
    patch_size: int
    in_chans: int = 1
    num_classes: int = 10
    embed_dim: int = 96
    depth: int = 6
    num_heads: int = 4
    mlp_ratio: float = 4.0


@dataclass(frozen=True)
class SmallResNetSpec:
    """Shape of a ``SmallResNet``: a stem, one stage per width, ``depth`` residual blocks each."""

    in_chans: int = 1
    num_classes: int = 10
    widths: tuple[int, ...] = (32, 64, 128)
    depth: int = 2
    stem_stride: int = 1


class ResidualBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a shortcut (identity, or 1x1 conv-BN when the shape
    changes), then ReLU: the basic block of ResNet-18/34."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = nn.functional.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return nn.functional.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """A ResNet-style CNN for small images: ``stem`` (conv3x3-BN-ReLU), ``stages`` (an
    ``nn.Sequential`` of stages, each an ``nn.Sequential`` of ``ResidualBlock``; every stage after
    the first halves the resolution), global average pooling and a Linear ``head``.

    The residual blocks are ``stages.<i>.<j>``, e.g. ``stages.0.0`` ... ``stages.2.1``.
    """

    def __init__(self, spec: SmallResNetSpec = SmallResNetSpec()) -> None:
        super().__init__()
        first = spec.widths[0]
        self.stem = nn.Sequential(
            nn.Conv2d(spec.in_chans, first, 3, stride=spec.stem_stride, padding=1, bias=False),
            nn.BatchNorm2d(first),
            nn.ReLU(),
        )
        stages, channels = [], first
        for i, width in enumerate(spec.widths):
            blocks = [ResidualBlock(channels, width, stride=1 if i == 0 else 2)]
            blocks += [ResidualBlock(width, width) for _ in range(spec.depth - 1)]
            stages.append(nn.Sequential(*blocks))
            channels = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(channels, spec.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def block_names(self) -> list[str]:
        """Names of every residual block of every stage, in forward order."""
        return [
            f"stages.{i}.{j}" for i, stage in enumerate(self.stages) for j in range(len(cast(nn.Sequential, stage)))
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.head(torch.flatten(self.pool(x), 1))


FASHION_VIT = TinyViTSpec(img_size=28, patch_size=7, embed_dim=96, depth=6, num_heads=4)
DIGITS_VIT = TinyViTSpec(img_size=8, patch_size=2, embed_dim=64, depth=4, num_heads=4)
FASHION_RESNET = SmallResNetSpec(in_chans=1, num_classes=10, widths=(32, 64, 128), depth=2, stem_stride=2)
SPECS: dict[str, TinyViTSpec | SmallResNetSpec] = {
    "vit_fmnist": FASHION_VIT,
    "vit_digits": DIGITS_VIT,
    "resnet_fmnist": FASHION_RESNET,
}
# The images each shipped model was trained on: side in pixels, channels, and the mean/std applied
# after scaling pixels to [0, 1] (the command line uses these unless told otherwise).
IMAGES: dict[str, dict] = {
    "vit_fmnist": {"size": 28, "channels": 1, "mean": (FASHION_MNIST_MEAN,), "std": (FASHION_MNIST_STD,)},
    "vit_digits": {"size": 8, "channels": 1, "mean": (0.0,), "std": (1.0,)},
    "resnet_fmnist": {"size": 28, "channels": 1, "mean": (FASHION_MNIST_MEAN,), "std": (FASHION_MNIST_STD,)},
}


def build(spec: TinyViTSpec | SmallResNetSpec) -> nn.Module:
    """Build an untrained model of ``spec``: a timm ViT for a ``TinyViTSpec``, a ``SmallResNet``
    for a ``SmallResNetSpec``."""
    if isinstance(spec, SmallResNetSpec):
        return SmallResNet(spec)
    return tiny_vit(spec)


def tiny_vit(spec: TinyViTSpec | SmallResNetSpec) -> nn.Module:
    """Build an untrained timm ``VisionTransformer`` of the given shape (``pretrained=False``).

    Given a ``SmallResNetSpec`` it builds that CNN instead (as ``build`` does), so callers that
    build any entry of ``SPECS`` through this function (``starfish:<name>`` in the CLI) get
    every shipped model.
    """
    if isinstance(spec, SmallResNetSpec):
        return SmallResNet(spec)
    from starfish_plugin.extras import need

    vision_transformer = need("timm.models.vision_transformer", "the shipped ViTs (timm)")
    return vision_transformer.VisionTransformer(**asdict(spec))


def load_checkpoint(name: str) -> nn.Module:
    """Build model ``name`` (``vit_fmnist``, ``vit_digits`` or ``resnet_fmnist``) and load its
    shipped weights."""
    if name not in SPECS:
        raise DemoError(f"unknown checkpoint {name!r}; choose from {sorted(SPECS)}")
    path = CHECKPOINT_DIR / f"{name}.pt"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; recreate it with `python benchmarks/train_checkpoints.py {name}`")
    model = build(SPECS[name])
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return model.eval()


def train_classifier(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    seed: int = 0,
    log=print,
) -> nn.Module:
    """Train ``model`` with AdamW, a cosine schedule and label smoothing; deterministic for a seed."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * ((len(labels) + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        total = 0.0
        for start in range(0, len(labels), batch_size):
            idx = order[start : start + batch_size]
            loss = loss_fn(model(images[idx]), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(idx)
        log(f"epoch {epoch + 1}/{epochs}: train loss {total / len(labels):.4f}")
    return model.eval()
