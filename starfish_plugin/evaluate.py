"""Accuracy and alignment diagnostics."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from starfish_plugin._modes import eval_mode


def _labeled_batches(loader: DataLoader | Dataset | Iterable, batch_size: int = 256) -> Iterable:
    if isinstance(loader, Dataset) and not isinstance(loader, torch.utils.data.IterableDataset):
        return DataLoader(loader, batch_size=batch_size, shuffle=False)
    return loader


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader | Dataset | Iterable) -> float:
    """Top-1 accuracy of ``model`` in percent over labeled batches.

    Args:
        model: a classifier returning logits ``[B, classes]``.
        loader: a ``DataLoader``, a map-style ``Dataset`` of ``(x, y)`` or any iterable of
            ``(inputs, labels)`` batches. The model's train/eval mode is restored afterwards.

    Example:
        >>> top1 = starfish.evaluate(model, test_loader)
    """
    device = next(model.parameters()).device
    correct = total = 0
    with eval_mode(model):
        for batch in _labeled_batches(loader):
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise TypeError("evaluate() needs (inputs, labels) batches; got a batch without labels")
            inputs, labels = batch[0].to(device), batch[1].to(device)
            correct += (model(inputs).argmax(dim=-1) == labels).sum().item()
            total += labels.numel()
    if total == 0:
        raise ValueError("evaluate() got an empty loader; pass at least one labeled batch")
    return 100.0 * correct / total
