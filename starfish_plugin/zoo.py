"""Small models for the demo, tests and benchmarks, with the shipped checkpoints that fit them."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

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


FASHION_VIT = TinyViTSpec(img_size=28, patch_size=7, embed_dim=96, depth=6, num_heads=4)
DIGITS_VIT = TinyViTSpec(img_size=8, patch_size=2, embed_dim=64, depth=4, num_heads=4)
SPECS = {"vit_fmnist": FASHION_VIT, "vit_digits": DIGITS_VIT}


def tiny_vit(spec: TinyViTSpec) -> nn.Module:
    """Build an untrained timm ``VisionTransformer`` of the given shape (``pretrained=False``)."""
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the demo models need timm: pip install 'starfish-plugin[demo]'") from exc
    return VisionTransformer(**asdict(spec))


def load_checkpoint(name: str) -> nn.Module:
    """Build model ``name`` (``vit_fmnist`` or ``vit_digits``) and load its shipped weights."""
    if name not in SPECS:
        raise ValueError(f"unknown checkpoint {name!r}; choose from {sorted(SPECS)}")
    path = CHECKPOINT_DIR / f"{name}.pt"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; recreate it with `python benchmarks/train_checkpoints.py {name}`")
    model = tiny_vit(SPECS[name])
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict({k: v.float() for k, v in state.items()})
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
