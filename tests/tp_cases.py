"""Model builders and Torch-Pruning set-ups for the coverage matrix (smallest inputs that work)."""

from __future__ import annotations

import timm
import torchvision
from torch import nn


def _timm_heads(model):
    return {m.qkv: m.num_heads for m in model.modules() if isinstance(m, timm.layers.Attention)}


def deit_mlp(model):
    """Only MLP hidden units: everything but fc1's output is left alone."""
    ignored = [model.head, model.patch_embed.proj]
    for block in model.blocks:
        ignored += [block.attn.qkv, block.attn.proj, block.mlp.fc2]
    return {"ignored_layers": ignored}


def deit_heads(model):
    """Whole attention heads only (qkv rows in head-sized groups), residual untouched."""
    ignored = [model.head, model.patch_embed.proj]
    for block in model.blocks:
        ignored += [block.mlp.fc1, block.mlp.fc2, block.attn.proj]
    return {"ignored_layers": ignored, "num_heads": _timm_heads(model), "prune_num_heads": True,
            "prune_head_dims": False, "head_pruning_ratio": 0.34}


def deit_embed(model):
    """The embedding width (residual stream) and MLP units."""
    return {"ignored_layers": [model.head], "num_heads": _timm_heads(model)}


def tv_vit_heads(model):
    heads = {m: m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    return {"ignored_layers": [model.heads], "num_heads": heads}


def cnn(head_attr):
    def setup(model):
        head = model
        for part in head_attr.split("."):
            head = getattr(head, part) if not part.isdigit() else head[int(part)]
        return {"ignored_layers": [head]}

    return setup


CASES = {
    # name: (builder, input size, pruner kwargs)
    "timm_deit_tiny_mlp": (
        lambda: timm.create_model("deit_tiny_patch16_224", img_size=32, num_classes=10),
        32,
        deit_mlp,
    ),
    "timm_deit_tiny_heads": (
        lambda: timm.create_model("deit_tiny_patch16_224", img_size=32, num_classes=10),
        32,
        deit_heads,
    ),
    "timm_deit_tiny_embed": (
        lambda: timm.create_model("deit_tiny_patch16_224", img_size=32, num_classes=10),
        32,
        deit_embed,
    ),
    "timm_resnet18": (lambda: timm.create_model("resnet18", num_classes=10), 32, cnn("fc")),
    "timm_mobilenetv1": (lambda: timm.create_model("mobilenetv1_100", num_classes=10), 32, cnn("classifier")),
    "tv_resnet18": (lambda: torchvision.models.resnet18(weights=None, num_classes=10), 32, cnn("fc")),
    "tv_mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(weights=None, num_classes=10), 32, cnn("classifier.1")),
    "tv_mobilenet_v3_small": (
        lambda: torchvision.models.mobilenet_v3_small(weights=None, num_classes=10),
        32,
        cnn("classifier.3"),
    ),
    "tv_efficientnet_b0": (
        lambda: torchvision.models.efficientnet_b0(weights=None, num_classes=10),
        32,
        cnn("classifier.1"),
    ),
    "tv_convnext_tiny": (
        lambda: torchvision.models.convnext_tiny(weights=None, num_classes=10),
        32,
        cnn("classifier.2"),
    ),
    "tv_vit_b_16": (lambda: torchvision.models.vit_b_16(weights=None, image_size=32, num_classes=10), 32, tv_vit_heads),
}
