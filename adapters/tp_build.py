"""Building a Torch-Pruning ``MetaPruner`` that works on Hugging Face models too.

Torch-Pruning 1.6 traces the model's output to build its dependency graph. A Hugging Face decoder
with its key/value cache on (``config.use_cache``, the default) returns the cache with the logits,
and the trace fails inside Torch-Pruning (``AttributeError: 'tuple' object has no attribute
'grad_fn'``) or, given an ``output_transform``, takes minutes even for two tiny layers.
``meta_pruner`` builds the pruner with the cache off (and the model's main output traced), then
puts the setting back; anything Torch-Pruning raises while building its graph comes back as a
``PrunerError`` that names the model and what to change.

    from starfish_plugin.adapters.tp_build import meta_pruner
    pruner = meta_pruner(model, {"input_ids": ids}, importance=tp.importance.MagnitudeImportance(p=2),
                         pruning_ratio=0.3, ignored_layers=[model.lm_head])
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from starfish_plugin.adapters.tp_kept import is_conv1d
from starfish_plugin.base.model_io import main_output
from starfish_plugin.errors import PrunerError


@contextmanager
def cache_off(model: nn.Module) -> Iterator[list[str]]:
    """Every ``config.use_cache`` in ``model`` set to ``False`` inside the block (names of the modules
    changed are yielded), and put back afterwards."""
    changed: list[tuple[Any, bool]] = []
    names: list[str] = []
    seen: set[int] = set()
    for name, module in model.named_modules():
        config = getattr(module, "config", None)
        if config is None or id(config) in seen or not getattr(config, "use_cache", False):
            continue
        seen.add(id(config))
        changed.append((config, config.use_cache))
        names.append(name or type(model).__name__)
        config.use_cache = False
    try:
        yield names
    finally:
        for config, value in changed:
            config.use_cache = value


def _version() -> str:
    try:
        import torch_pruning

        return str(getattr(torch_pruning, "__version__", "?"))
    except ImportError:
        return "not installed"


def meta_pruner(model: nn.Module, example_inputs: Any, **kwargs: Any) -> Any:
    """``torch_pruning.pruner.MetaPruner(model, example_inputs, **kwargs)``, built so that Hugging
    Face models trace: their key/value cache is off while the graph is built, and the model's main
    output (its logits) is what is traced unless ``output_transform`` is given.

    Raises:
        PrunerError: Torch-Pruning failed to build its graph; the message names the model, the
            error and the settings that fix the usual causes.
    """
    import torch_pruning as tp

    kwargs.setdefault("output_transform", main_output)
    try:
        with cache_off(model):
            return tp.pruner.MetaPruner(model, example_inputs, **kwargs)
    except Exception as exc:  # noqa: BLE001 - Torch-Pruning's own errors, whatever they are
        conv1d = any(is_conv1d(m) for m in model.modules())
        hint = (
            " GPT-2-style models keep their linear layers as Hugging Face Conv1D, which Torch-Pruning does not "
            "prune by itself: build the pruner with tp_build.mlp_width_pruner (MLP width), or prune with masks."
            if conv1d else ""
        )
        raise PrunerError(
            f"Torch-Pruning {_version()} could not build the dependency graph of {type(model).__name__}: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. Give example_inputs the "
            "model takes (a dict of keyword tensors for Hugging Face models), an output_transform that returns "
            "one tensor of the output, and leave layers it cannot follow alone (ignored_layers=[...]; for "
            "decoder LMs, prune MLP width only with root_module_types=[nn.Linear] and the attention in "
            f"ignored_layers, as starfish_plugin.adapters.recipes.prune_llama_mlp_width_ does).{hint}"
        ) from exc


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    """Every attention module of a Hugging Face decoder (separate or fused projections)."""
    names = ("q_proj", "query", "c_attn", "qkv_proj", "query_key_value", "Wqkv")
    return [m for m in model.modules() if any(isinstance(getattr(m, n, None), nn.Module) for n in names)]


def mlp_width_pruner(model: nn.Module, example_inputs: Any, pruning_ratio: float = 0.5, **kwargs: Any) -> Any:
    """A ``MetaPruner`` that removes MLP hidden units only from a Hugging Face decoder LM: the set-up
    Torch-Pruning 1.6.1 builds quickly (its full graph on a decoder takes minutes). Attention,
    embeddings and the LM head are in ``ignored_layers``; the roots are the model's linear layers
    (``nn.Linear``, or GPT-2's ``Conv1D``, which gets a pruning function and an importance of its own,
    ``tp_conv1d``). Every block's output keeps its width. ``kwargs`` go to ``MetaPruner``
    (``importance`` defaults to ``GroupMagnitudeImportance(p=2)``).

        pruner = mlp_width_pruner(model, {"input_ids": ids[:2]}, pruning_ratio=0.5)
        starfish.attach(pruner, dense, {"input_ids": ids})
        pruner.step()
    """
    import torch_pruning as tp

    from starfish_plugin.adapters.tp_conv1d import conv1d_magnitude, conv1d_pruners

    conv1d = any(is_conv1d(m) for m in model.modules())
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    output_embeddings = getattr(model, "get_output_embeddings", None)
    head = output_embeddings() if callable(output_embeddings) else None
    ignored = [*_attention_modules(model), *embeddings, *([head] if isinstance(head, nn.Module) else [])]
    kwargs["ignored_layers"] = [*ignored, *kwargs.get("ignored_layers", [])]
    kwargs.setdefault("importance", tp.importance.GroupMagnitudeImportance(p=2))
    if conv1d:
        pruners = conv1d_pruners()
        kwargs["customized_pruners"] = {**pruners, **kwargs.get("customized_pruners", {})}
        kwargs.setdefault("root_module_types", list(pruners))
    else:
        kwargs.setdefault("root_module_types", [nn.Linear])
    pruner = meta_pruner(model, example_inputs, pruning_ratio=pruning_ratio, **kwargs)
    if conv1d:
        pruner.importance = conv1d_magnitude(pruner.DG)
    return pruner
