"""What goes into a model and what comes out: structured inputs and logits found in any output.

Calibration batches come as one tensor (images, token ids), as several positional tensors, or
as a dict of tensors passed as keyword arguments (``input_ids``, ``attention_mask``,
``pixel_values``, ...). ``ModelInputs`` holds the latter two, with the sample dimension first in
every field, and behaves like a tensor where the heal needs it (``len``, row indexing, ``.to``).
Models may return a tensor, a tuple, a dict or a Hugging Face ``ModelOutput``; ``main_output``
finds the logits in any of them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

# Names under which models return their main output, in lookup order.
OUTPUT_KEYS = ("logits", "last_hidden_state", "prediction_logits", "pooler_output")


class ModelInputs:
    """Positional and keyword tensors of a batch; every field has the samples first.

    A field may also be any object indexable by rows with ``len()`` (the calibration inputs'
    file on disk, ``DiskInputs``).
    """

    def __init__(self, args: tuple[Any, ...] = (), kwargs: Mapping[str, Any] | None = None) -> None:
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        if not self.args and not self.kwargs:
            raise ValueError("ModelInputs needs at least one field")

    # -- fields ------------------------------------------------------------------------------
    def fields(self) -> Iterator[tuple[str, Any]]:
        """``(name, tensor)`` for every field: positional ones named ``"arg0"``, ``"arg1"``, ..."""
        for i, value in enumerate(self.args):
            yield f"arg{i}", value
        yield from self.kwargs.items()

    def map(self, fn) -> ModelInputs:
        """A ``ModelInputs`` with ``fn`` applied to every field."""
        return ModelInputs(tuple(fn(v) for v in self.args), {k: fn(v) for k, v in self.kwargs.items()})

    @property
    def first(self) -> Any:
        return next(self.fields())[1]

    # -- tensor-like behaviour -----------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.first)

    def __getitem__(self, key: Any) -> ModelInputs:
        return self.map(lambda v: v[key])

    def to(self, *args: Any, **kwargs: Any) -> ModelInputs:
        return self.map(lambda v: v.to(*args, **kwargs))

    def split(self, size: int) -> list[ModelInputs]:
        return [self[i : i + size] for i in range(0, len(self), size)]

    @property
    def shape(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(v.shape) for name, v in self.fields()}

    @property
    def dtype(self) -> torch.dtype | None:
        """The dtype of the first floating field (pixel values), or ``None`` (token ids only)."""
        return next((v.dtype for _, v in self.fields() if v.dtype.is_floating_point), None)

    def describe(self) -> str:
        return ", ".join(f"{name} {tuple(v.shape)} {str(v.dtype).replace('torch.', '')}" for name, v in self.fields())

    def __repr__(self) -> str:
        return f"ModelInputs({self.describe()})"


Inputs = torch.Tensor | ModelInputs


def call_model(model: nn.Module, x: Inputs) -> Any:
    """``model(x)``, or ``model(*args, **kwargs)`` for structured inputs."""
    if isinstance(x, ModelInputs):
        return model(*x.args, **x.kwargs)
    return model(x)


def attention_mask(x: Inputs) -> torch.Tensor | None:
    """The batch's ``[B, T]`` ``attention_mask`` keyword input (1: real token, 0: padding), if any."""
    if isinstance(x, ModelInputs):
        mask = x.kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            return mask
    return None


def token_ids(x: Inputs) -> torch.Tensor | None:
    """The batch's ``[B, T]`` integer token ids: the ``input_ids`` keyword, or the first positional
    field (or the tensor itself) when it is a 2-D integer tensor; ``None`` otherwise."""
    if isinstance(x, ModelInputs):
        if "decoder_input_ids" in x.kwargs:  # an encoder-decoder: its logits follow the decoder's ids
            return None
        ids = x.kwargs.get("input_ids", x.args[0] if x.args else None)
    else:
        ids = x
    if isinstance(ids, torch.Tensor) and ids.dim() == 2 and not ids.dtype.is_floating_point:
        return ids
    return None


def describe_inputs(x: Inputs) -> str:
    """Shape and dtype for error messages."""
    if isinstance(x, ModelInputs):
        return x.describe()
    return f"shape {tuple(x.shape)} and dtype {x.dtype}"


def main_output(output: Any) -> Any:
    """The model's main output tensor: itself, ``logits`` (or another known key) of a dict or
    ``ModelOutput``, or the first tensor of a tuple. Anything else is returned unchanged."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        for key in OUTPUT_KEYS:
            value = output.get(key)
            if isinstance(value, torch.Tensor):
                return value
        return next((v for v in output.values() if isinstance(v, torch.Tensor)), output)
    if isinstance(output, (tuple, list)):
        return next((v for v in output if isinstance(v, torch.Tensor)), output)
    return output


def accepts_keyword(model: nn.Module, name: str) -> bool:
    """Whether ``model.forward`` takes ``name`` as a keyword (or takes ``**kwargs``)."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def modules_called(model: nn.Module, x: Inputs) -> set[int]:
    """The ids of the modules whose forward runs when ``model`` takes ``x`` (one no-grad forward)."""
    called: set[int] = set()
    handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda m, _args: called.add(id(m)))
    try:
        with torch.no_grad():
            call_model(model, x)
    finally:
        handle.remove()
    return called


@contextmanager
def kv_cache_off(*models: nn.Module) -> Iterator[None]:
    """Every Hugging Face ``config.use_cache`` in ``models`` switched off inside the block (a block
    called again and again must not append to a key/value cache), put back on exit."""
    configs: dict[int, Any] = {}
    for model in models:
        for module in model.modules():
            config = getattr(module, "config", None)
            if getattr(config, "use_cache", False):
                configs[id(config)] = config
    try:
        for config in configs.values():
            config.use_cache = False
        yield
    finally:
        for config in configs.values():
            config.use_cache = True
