"""Accuracy and alignment diagnostics."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from starfish_plugin.base.model_io import ModelInputs, call_model, main_output
from starfish_plugin.core.modes import eval_mode
from starfish_plugin.errors import EvaluationError, UsageError


def _labeled_batches(loader: DataLoader | Dataset | Iterable, batch_size: int = 256) -> Iterable:
    if isinstance(loader, Dataset) and not isinstance(loader, torch.utils.data.IterableDataset):
        return DataLoader(loader, batch_size=batch_size, shuffle=False)
    return loader


def _inputs_and_labels(batch: object) -> tuple[torch.Tensor | ModelInputs, torch.Tensor]:
    """``(inputs, labels)`` of a labeled batch: a pair, or a dict whose ``labels``/``label`` entry
    holds the labels and whose other entries are the model's keyword inputs."""
    if isinstance(batch, Mapping):
        key = next((k for k in ("labels", "label") if k in batch), None)
        if key is not None:
            kwargs = {k: v for k, v in batch.items() if k not in ("labels", "label")}
            return ModelInputs(kwargs=kwargs), torch.as_tensor(batch[key])
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        inputs = batch[0]
        if isinstance(inputs, Mapping):
            inputs = ModelInputs(kwargs=inputs)
        elif isinstance(inputs, (tuple, list)):
            inputs = ModelInputs(tuple(inputs))
        return inputs, torch.as_tensor(batch[1])
    raise UsageError(
        "evaluate() needs labeled batches: (inputs, labels) pairs or dicts with a 'labels' entry; "
        f"got a {type(batch).__name__} without labels"
    )


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader | Dataset | Iterable) -> float:
    """Top-1 accuracy of ``model`` in percent over labeled batches.

    Args:
        model: a classifier returning logits ``[B, classes]``.
        loader: a ``DataLoader``, a map-style ``Dataset`` of ``(x, y)`` or any iterable of
            ``(inputs, labels)`` batches or dicts of keyword inputs with a ``labels`` entry. The
            model's train/eval mode is restored afterwards.

    Example:
        >>> top1 = starfish.evaluate(model, test_loader)
    """
    device = next(model.parameters()).device
    correct = total = 0
    with eval_mode(model):
        for batch in _labeled_batches(loader):
            inputs, labels = _inputs_and_labels(batch)
            logits = main_output(call_model(model, inputs.to(device)))
            correct += (logits.argmax(dim=-1) == labels.to(device)).sum().item()
            total += labels.numel()
    if total == 0:
        raise EvaluationError("evaluate() got an empty loader; pass at least one labeled batch")
    return 100.0 * correct / total


def _head(model: nn.Module, name: str | None) -> tuple[str, nn.Linear]:
    if name is not None:
        module = model.get_submodule(name)
    else:
        linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise EvaluationError(f"{type(model).__name__} has no Linear classifier head; pass head='name'")
        name, module = linears[-1]
    if not isinstance(module, nn.Linear):
        raise EvaluationError(f"head {name!r} is a {type(module).__name__}, not a Linear layer")
    return name, module


@torch.no_grad()
def kl_diagnostics(
    model: nn.Module, dense: nn.Module, inputs: torch.Tensor, head: str | None = None, batch_size: int = 256
) -> dict[str, float]:
    """Output-level agreement with the dense model, and a bound from the final representation.

    For a shared linear head ``z = W h + b`` the KL divergence of the class distributions is a
    Bregman divergence of log-sum-exp, so by Hoeffding's lemma
    ``KL(dense || model) <= (max_i d_i - min_i d_i)^2 / 8 <= D^2 / 8 * ||h_model - h_dense||^2``,
    with ``d = z_model - z_dense`` and ``D`` the largest distance between two rows of ``W``. This
    is the same kind of statement as the paper's Theorem 1 (aligned representations bound the
    output divergence), derived here; it needs the head unpruned and identical in both models.

    Returns:
        ``kl`` (mean KL(dense || model)), ``logit_range_bound`` and ``representation_bound``
        (means of the two bounds above), ``bound_holds`` (1.0 if every sample satisfies both),
        and ``representation_distance`` (mean ``||h_model - h_dense||^2``).
    """
    head_name, dense_head = _head(dense, head)
    _, model_head = _head(model, head_name)
    same_head = torch.equal(dense_head.weight, model_head.weight) and (
        (dense_head.bias is None and model_head.bias is None)
        or (
            dense_head.bias is not None
            and model_head.bias is not None
            and torch.equal(dense_head.bias, model_head.bias)
        )
    )
    w = dense_head.weight.float()
    spread = torch.cdist(w, w).max().item()
    captured: dict[str, torch.Tensor] = {}

    def grab(key):
        def hook(_module, args):
            captured[key] = args[0].float()

        return hook

    sums = {"kl": 0.0, "logit_range_bound": 0.0, "representation_bound": 0.0, "representation_distance": 0.0}
    holds, n = True, 0
    device = next(model.parameters()).device
    handles = [dense_head.register_forward_pre_hook(grab("dense")), model_head.register_forward_pre_hook(grab("model"))]
    try:
        with eval_mode(model), eval_mode(dense):
            for start in range(0, len(inputs), batch_size):
                x = inputs[start : start + batch_size].to(device)
                z_d, z_m = dense(x).float(), model(x).float()
                log_p, log_q = z_d.log_softmax(-1), z_m.log_softmax(-1)
                kl = (log_p.exp() * (log_p - log_q)).sum(-1)
                diff = z_m - z_d
                range_bound = (diff.max(-1).values - diff.min(-1).values) ** 2 / 8
                dist = (captured["model"] - captured["dense"]).pow(2).sum(-1)
                rep_bound = spread**2 / 8 * dist
                holds &= bool((kl <= range_bound * (1 + 1e-4) + 1e-6).all())
                if same_head:
                    holds &= bool((range_bound <= rep_bound * (1 + 1e-4) + 1e-6).all())
                sums["kl"] += kl.sum().item()
                sums["logit_range_bound"] += range_bound.sum().item()
                sums["representation_bound"] += rep_bound.sum().item()
                sums["representation_distance"] += dist.sum().item()
                n += len(x)
    finally:
        for handle in handles:
            handle.remove()
    result = {k: v / n for k, v in sums.items()}
    if not same_head:
        result["representation_bound"] = float("nan")  # the bound assumes one shared head
    result["bound_holds"] = 1.0 if holds else 0.0
    return result
