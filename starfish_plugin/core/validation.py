"""Checks run before healing touches anything; each failure names the problem and the fix."""

from __future__ import annotations

import torch
from torch import nn

from starfish_plugin.base.model_io import Inputs, call_model, describe_inputs, main_output
from starfish_plugin.config import HealConfig
from starfish_plugin.core.plan import SparsityPlan
from starfish_plugin.data.calibration import CalibrationData
from starfish_plugin.data.targets import dense_outputs
from starfish_plugin.errors import (
    CalibrationError,
    CalibrationTypeError,
    ConfigError,
    ModelMismatchError,
    NonFiniteError,
    UsageError,
)
from starfish_plugin.runtime.atomic import directory_problem


def check_models(pruned: object, dense: object) -> None:
    """Both are modules, distinct, and share no parameter storage."""
    for label, model in (("pruned", pruned), ("dense", dense)):
        if not isinstance(model, nn.Module):
            raise UsageError(f"the {label} model must be an nn.Module, got {type(model).__name__}")
    assert isinstance(pruned, nn.Module) and isinstance(dense, nn.Module)  # checked just above
    if pruned is dense:
        raise ModelMismatchError(
            "pruned and dense are the same object; keep an untouched copy "
            "(dense = copy.deepcopy(model)) before pruning"
        )
    dense_ptrs = {p.data_ptr(): n for n, p in dense.named_parameters() if p.numel() > 0}
    for name, p in pruned.named_parameters():
        if p.numel() > 0 and p.data_ptr() in dense_ptrs:
            raise ModelMismatchError(
                f"pruned parameter {name!r} shares storage with dense parameter {dense_ptrs[p.data_ptr()]!r}; "
                "healing would change the dense model. Pass dense = copy.deepcopy(model) taken before pruning"
            )


def check_dtypes(pruned: nn.Module, dense: nn.Module) -> None:
    """Both models compute in the same floating dtypes (a float64 dense model and a float32 pruned
    one would compare unlike outputs, and fail deep inside autograd)."""
    found = {
        label: sorted({str(p.dtype) for p in model.parameters() if p.is_floating_point()})
        for label, model in (("pruned", pruned), ("dense", dense))
    }
    if found["pruned"] != found["dense"]:
        raise ModelMismatchError(
            f"the pruned model's weights are {', '.join(found['pruned'])} but the dense model's are "
            f"{', '.join(found['dense'])}; convert one so both match (e.g. dense.to(torch.float32)) before healing"
        )


def _devices(model: nn.Module) -> set[torch.device]:
    return {t.device for t in list(model.parameters()) + list(model.buffers())}


def resolve_device(pruned: nn.Module, dense: nn.Module, requested: str | torch.device | None) -> torch.device:
    """The single device both models live on; it must match ``requested`` when one is given."""
    found = {}
    for label, model in (("pruned", pruned), ("dense", dense)):
        devices = _devices(model)
        if len(devices) != 1:
            raise ModelMismatchError(
                f"the {label} model has tensors on several devices {sorted(map(str, devices))}; "
                f"move it to one device with .to(device)"
            )
        found[label] = devices.pop()
    if found["pruned"] != found["dense"]:
        raise ModelMismatchError(
            f"the pruned model is on {found['pruned']} but the dense model on {found['dense']}; "
            "move both to the same device with .to(device)"
        )
    device = found["pruned"]
    if requested is not None and torch.device(requested) != device:
        want = torch.device(requested)
        if not (want.type == device.type and want.index is None):
            raise ConfigError(
                f"HealConfig.device is {want} but the models are on {device}; move both models with "
                f".to('{want}') or leave device=None"
            )
    return device


def _toolkit_free_name(name: str) -> str:
    """``lm_head.weight_orig`` (a prune hook) or ``lm_head.parametrizations.weight.original``
    (a parametrization) as the dense model names it, ``lm_head.weight``."""
    if name.endswith("_orig"):
        return name[: -len("_orig")]
    parts = name.split(".")
    if len(parts) >= 3 and parts[-3] == "parametrizations" and parts[-1] == "original":
        return ".".join(parts[:-3] + [parts[-2]])
    return name


def check_architecture(pruned: nn.Module, dense: nn.Module, plan: SparsityPlan) -> None:
    """The pruned model, read through its plan, has the dense model's parameter names and shapes."""
    trained = {id(e.parameter) for e in plan}
    canonical: dict[str, tuple[int, ...]] = {}
    # every name a parameter has: a tied weight (a language model's embedding and LM head) counts
    # under both, and only the pruned side's toolkit location is renamed
    for name, p in pruned.named_parameters(remove_duplicate=False):
        canonical[_toolkit_free_name(name) if id(p) in trained else name] = tuple(p.shape)
    reference = {name: tuple(p.shape) for name, p in dense.named_parameters(remove_duplicate=False)}
    missing = sorted(set(reference) - set(canonical))
    extra = sorted(set(canonical) - set(reference))
    if missing or extra:
        raise ModelMismatchError(
            f"the pruned {type(pruned).__name__} and dense {type(dense).__name__} are different architectures: "
            f"parameters only in dense: {missing[:5]}, only in pruned: {extra[:5]}. "
            "Pass the dense model the pruned one was made from"
        )
    if not plan.structural:
        for name, shape in reference.items():
            if canonical[name] != shape:
                raise ModelMismatchError(
                    f"parameter {name!r} has shape {canonical[name]} in the pruned model but {shape} in the "
                    "dense one; pass the dense model the pruned one was made from"
                )


def check_input_dtype(data: CalibrationData, dense: nn.Module) -> None:
    """Calibration inputs have the floating dtype of the model's parameters."""
    dtypes = {p.dtype for p in dense.parameters() if p.is_floating_point()}
    if data.dtype is None or not data.dtype.is_floating_point:
        return  # integer token ids: the model's embedding turns them into its dtype
    if len(dtypes) == 1:
        dtype = dtypes.pop()
        if data.dtype != dtype:
            raise CalibrationTypeError(
                f"calibration inputs are {data.dtype} but the model's parameters are {dtype}; "
                f"convert the inputs with .to({dtype})"
            )


def probe_forward(model: nn.Module, x: Inputs, label: str) -> object:
    """One forward on a calibration batch, turning a shape error into a clear ``CalibrationError``;
    returns the model's main output (the logits of a ``ModelOutput``)."""
    try:
        with torch.no_grad():
            return main_output(call_model(model, x))
    except (RuntimeError, ValueError, TypeError, AssertionError, IndexError, KeyError) as exc:
        hint = "Give inputs shaped as the model expects"
        if isinstance(x, torch.Tensor) and not x.is_floating_point() and x.dtype != torch.long:
            hint = ("If these are images, convert them to the model's floating dtype (e.g. images.float() / 255, "
                    "normalized as in training); token ids should be torch.long")
        elif isinstance(x, torch.Tensor) and not x.is_floating_point():
            hint = ("Integer inputs are passed as token ids; if these are images, convert them to the model's "
                    "floating dtype (e.g. images.float() / 255, normalized as in training)")
        raise CalibrationError(
            f"the {label} {type(model).__name__} cannot take calibration batches of {describe_inputs(x)}: "
            f"{type(exc).__name__}: {exc}. {hint}"
        ) from exc


def check_finite_weights(pruned: nn.Module) -> None:
    """No parameter of the pruned model holds NaN or Inf (healing cannot repair one, and a masked
    NaN still poisons the forward: NaN * 0 is NaN)."""
    for name, p in pruned.named_parameters():
        if p.is_floating_point() and p.numel() and not bool(torch.isfinite(p).all()):
            bad = int((~torch.isfinite(p)).sum())
            raise NonFiniteError(
                f"the pruned model's {name} holds {bad} NaN/Inf value(s) before healing; healing cannot repair "
                "them. Prune again from a finite dense model (check the pruning step and any fine-tuning before it)"
            )


@torch.no_grad()
def unrelated_weights(pruned: nn.Module, dense: nn.Module, plan: SparsityPlan) -> str | None:
    """A warning if the surviving weights look unrelated to the dense model's (median cosine over the
    pruned tensors below 0.1): pruning keeps surviving weights, and healing moves them only a little,
    so a low value means ``dense`` is not the model ``pruned`` was made from."""
    if plan.structural:  # kept channels are re-indexed: positions no longer correspond
        return None
    reference = dict(dense.named_parameters())
    cosines = []
    for e in plan:
        other = reference.get(e.name)
        if other is None or other.shape != e.parameter.shape or not bool(e.mask.any()):
            continue
        a, b = e.parameter[e.mask].float(), other[e.mask].float()
        cosines.append(float(torch.nn.functional.cosine_similarity(a, b, dim=0)))
    if not cosines:
        return None
    median = sorted(cosines)[len(cosines) // 2]
    if median >= 0.1:
        return None
    return (
        f"the pruned model's surviving weights barely resemble the dense model's (median cosine {median:.2f} "
        f"over {len(cosines)} pruned tensors; a pruned copy scores 1.0): is `dense` the model `pruned` was made "
        "from? Healing aligns the pruned model with this dense model's outputs whatever it is"
    )


def check_logits(logits: object, data: CalibrationData, config: HealConfig, ids: torch.Tensor | None = None) -> None:
    """``kl`` needs ``[B, classes]`` or per-token ``[B, T, vocab]`` logits; ``ce`` needs ``[B, classes]``
    logits and labels below ``classes``; ``next_token`` needs ``[B, T, vocab]`` logits of the
    calibration tokens ``ids`` (a probe batch's), every id below ``vocab``."""
    terms = {name for name, weight in config.loss_terms().items() if weight > 0}
    ce, next_token = "ce" in terms, "next_token" in terms
    allowed = (2,) if ce else (3,) if next_token else (2, 3)
    if not isinstance(logits, torch.Tensor) or logits.dim() not in allowed:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        wanted = ("a classifier returning logits [B, classes]" if ce
                  else "a language model returning logits [B, T, vocab]" if next_token
                  else "logits [B, classes] or [B, T, vocab]")
        raise ConfigError(f"loss {config.loss!r} needs {wanted}, but the model returns {shape}; "
                          "use loss='cosine' or 'mse'")
    if ce and data.labels is not None:
        low, high = int(data.labels.min()), int(data.labels.max())
        if low < 0 or high >= logits.shape[1]:
            raise CalibrationError(
                f"calibration labels span {low}..{high} but the model has {logits.shape[1]} classes; "
                "labels must be class indices in [0, classes)"
            )
    if next_token and ids is not None:
        if ids.shape[1] < 2:
            raise CalibrationError(f"loss 'next_token' needs sequences of at least 2 tokens, got {tuple(ids.shape)}")
        if tuple(ids.shape) != tuple(logits.shape[:2]):
            raise CalibrationError(
                f"loss 'next_token' needs one logit row per input token, but token ids {tuple(ids.shape)} "
                f"gave logits {tuple(logits.shape)}; pass the model's input_ids as calibration inputs"
            )
        if int(ids.min()) < 0 or int(ids.max()) >= logits.shape[-1]:
            raise CalibrationError(
                f"calibration token ids span {int(ids.min())}..{int(ids.max())} but the model's vocabulary "
                f"has {logits.shape[-1]} entries; tokenize with the model's own tokenizer"
            )


def check_directories(config: HealConfig) -> None:
    """``cache_dir`` and ``checkpoint_dir``, when they will be used, can hold files (checked before
    any work, so a heal never fails on them after an epoch)."""
    uses_cache = config.inputs == "disk" or config.targets in ("disk", "auto")
    for name, path, used in (("cache_dir", config.cache_dir, uses_cache),
                             ("checkpoint_dir", config.checkpoint_dir, True)):
        problem = directory_problem(path) if path is not None and used else None
        if problem is not None:
            raise ConfigError(f"HealConfig.{name} {path} cannot hold files: {problem}; pass a writable directory")


def probe_structural(
    pruned: nn.Module, blocks: list[str], x: Inputs, plan: SparsityPlan
) -> tuple[dict, list[str]]:
    """Block outputs of a structurally pruned model on one input and the order in which its
    modules finished, or a clear error if it cannot run."""
    order: list[str] = []
    handles = [
        module.register_forward_hook(lambda _m, _a, _o, name=name: order.append(name))
        for name, module in pruned.named_modules()
        if name in plan.kept_out_channels
    ]
    try:
        return dense_outputs(pruned, blocks, x, False, label="pruned"), order
    except (RuntimeError, ValueError, IndexError, AssertionError) as exc:
        raise ModelMismatchError(
            f"the pruned {type(pruned).__name__} fails a forward on a calibration input of "
            f"{describe_inputs(x)}: {exc}. If attention heads or widths were pruned, its attention modules' "
            f"num_heads / head_dim must match the new shapes. {plan.hint}"
        ) from exc
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def same_output_shape(pruned: nn.Module, dense_output: object, x: Inputs) -> bool:
    """Whether the pruned model's main output has the dense one's shape (per sample)."""
    out = main_output(call_model(pruned, x))
    return (isinstance(out, torch.Tensor) and isinstance(dense_output, torch.Tensor)
            and out.shape[1:] == dense_output.shape[1:])
