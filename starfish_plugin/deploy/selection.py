"""Per-layer kernel selection: each pruned Linear gets the fastest implementation measured on the
user's device and input shape, and only if it is faster than dense beyond noise."""

from __future__ import annotations

import copy
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, cast

import torch
from torch import nn

from starfish_plugin.base.model_io import Inputs, ModelInputs, call_model, main_output
from starfish_plugin.deploy.fold import folded_copy
from starfish_plugin.deploy.kernels import KERNEL_NAMES, build_kernel, why_not
from starfish_plugin.deploy.report import InferenceReport, LayerChoice
from starfish_plugin.deploy.timing import faster_beyond_noise, interleaved_times, synchronizer
from starfish_plugin.errors import KernelError

#: on CPU, a kernel whose first call (the output check) takes this many times dense's is not timed further
FAR_SLOWER = 4.0
KERNEL_CHOICES = ("auto", "dense", "csr", "bsr", "compact", "semi-structured", *KERNEL_NAMES[3:])
#: largest |sparse - dense| / max|dense| accepted, per dtype (summation order differs between kernels)
#: a kernel whose first call (the output check) takes this many times dense's is not timed further
FAR_SLOWER = 4.0
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 4e-2}


def sparsify_for_inference(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[Any] | Mapping[str, Any],
    device: str | torch.device | None = None,
    kernels: str | Sequence[str] = "auto",
    dtype: torch.dtype | None = None,
    repeats: int = 20,
    margin: float = 0.05,
    compile_baseline: bool = False,
    min_sparsity: float = 0.01,
) -> tuple[nn.Module, InferenceReport]:
    """A copy of ``model`` for inference, each pruned Linear replaced by its fastest kernel.

    ``model`` may hold masks in any form the adapters read (prune hooks, parametrizations) or plain
    zeros; it is not changed. ``example_inputs``: the batch to time with (a tensor, a tuple of
    positional inputs, or a dict of keyword inputs); its shape decides what is fastest.
    ``kernels="auto"`` times dense against every kernel that applies (CSR, BSR where whole blocks
    are zero, compact where whole rows or columns are, 2:4 semi-structured on CUDA in fp16/bf16)
    and swaps a layer only if its best kernel is faster than dense by more than ``margin`` and
    the timing noise; if the swapped model is then slower end to end (its median per-round time
    ratio to dense above 1), every swap is undone.
    ``kernels="csr"`` (or another name, or a list) swaps every layer that kernel applies to,
    whatever its speed; ``"dense"`` swaps nothing and only measures. ``dtype`` converts the copy and
    the floating-point inputs (the 2:4 kernels take ``torch.float16`` / ``torch.bfloat16``).

    Returns the model (on ``device``, in eval mode) and an ``InferenceReport``.
    """
    wanted, forced = _wanted_kernels(kernels)
    if repeats < 3:
        raise KernelError(f"repeats={repeats}: medians need at least 3 timed runs; pass repeats=20 or more")
    folded = folded_copy(model)
    target = torch.device(device) if device is not None else _device_of(folded)
    folded = folded.to(target, dtype).eval()
    inputs = _as_inputs(example_inputs, target, dtype)
    layers = _layer_inputs(folded, inputs, min_sparsity)
    choices = []
    sparse = copy.deepcopy(folded)
    with torch.inference_mode():
        for name, (layer, x) in layers.items():
            choice, module = _choose(name, layer, x, wanted, forced, repeats, margin, target)
            choices.append(choice)
            if module is not None:
                _replace(sparse, name, module)
        del layers
        swapped = any(c.kernel != "dense" for c in choices)
        timed: dict[str, Any] = {"dense": lambda: call_model(folded, inputs)}
        if swapped:  # otherwise the copy computes exactly what the dense one does: nothing to compare
            timed["sparse"] = lambda: call_model(sparse, inputs)
        notes = []
        if compile_baseline:
            compiled = cast(nn.Module, torch.compile(folded))
            timed["compiled"] = lambda: call_model(compiled, inputs)
        times = interleaved_times(timed, repeats, target, warmup=2, abandon=False)
        dense_ms = 1e3 * statistics.median(times["dense"])
        sparse_ms = 1e3 * statistics.median(times["sparse"]) if swapped else dense_ms
        reverted = False
        ratios = [t_sparse / t_dense for t_sparse, t_dense in zip(times.get("sparse", []), times["dense"])]
        if not forced and swapped and statistics.median(ratios) > 1.0:
            notes.append(f"the chosen kernels ran {sparse_ms:.3f} ms end to end against {dense_ms:.3f} ms dense, "
                         "slower in the typical round (median per-round ratio above 1): every layer was put back "
                         "to dense")
            reverted, sparse, sparse_ms = True, folded, dense_ms
            for c in choices:
                c.kernel, c.kernel_ms = "dense", c.dense_ms
        reference = main_output(call_model(folded, inputs))
        output = main_output(call_model(sparse, inputs))
    error, scale = _max_error(output, reference)
    model_dtype = _dtype_of(folded)
    report = InferenceReport(
        device=str(target), hardware=_hardware(target), batch_size=_batch_size(inputs),
        dtype=str(model_dtype).split(".")[-1],
        kernels=kernels if isinstance(kernels, str) else ",".join(kernels), repeats=repeats, dense_ms=dense_ms,
        sparse_ms=sparse_ms, layers=choices, max_abs_error=error,
        outputs_match=error <= TOLERANCE.get(model_dtype, 1e-4) * max(scale, 1.0),
        compiled_dense_ms=1e3 * statistics.median(times["compiled"]) if compile_baseline else None,
        reverted=reverted, notes=notes,
    )
    return sparse, report


def _wanted_kernels(kernels: str | Sequence[str]) -> tuple[list[str], bool]:
    """The kernel names to try, and whether they are forced (swapped whatever their speed)."""
    names = [kernels] if isinstance(kernels, str) else list(kernels)
    unknown = [n for n in names if n not in KERNEL_CHOICES]
    if unknown or not names:
        raise KernelError(f"kernels={kernels!r}: choose 'auto', 'dense' or from {', '.join(KERNEL_CHOICES[2:])}")
    if names == ["auto"]:
        return list(KERNEL_NAMES), False
    if names == ["dense"]:
        return [], True
    if "auto" in names or "dense" in names:
        raise KernelError(f"kernels={kernels!r}: 'auto' and 'dense' stand alone; or list kernel names")
    expanded = []
    for n in names:
        expanded += [k for k in KERNEL_NAMES if k.startswith("semi-structured")] if n == "semi-structured" else [n]
    return expanded, True


def _device_of(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _dtype_of(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _as_inputs(example: Any, device: torch.device, dtype: torch.dtype | None) -> Inputs:
    def move(v: Any) -> Any:
        if not isinstance(v, torch.Tensor):
            return v
        return v.to(device, dtype) if v.is_floating_point() and dtype is not None else v.to(device)

    if isinstance(example, torch.Tensor):
        return move(example)
    if isinstance(example, Mapping):
        return ModelInputs(kwargs={k: move(v) for k, v in example.items()})
    if isinstance(example, (tuple, list)) and example:
        return ModelInputs(tuple(move(v) for v in example))
    raise KernelError(f"example_inputs is a {type(example).__name__}; pass the batch to time with: a tensor, a "
                      "tuple of positional inputs, or a dict of keyword inputs (e.g. torch.randn(1, 3, 224, 224))")


def _batch_size(inputs: Inputs) -> int:
    first = inputs.first() if isinstance(inputs, ModelInputs) else inputs
    return int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() else 1


def _layer_inputs(
    model: nn.Module, inputs: Inputs, min_sparsity: float,
) -> dict[str, tuple[nn.Linear | nn.Conv2d, torch.Tensor]]:
    """Every Linear / Conv2d with at least ``min_sparsity`` zeros in its weight, and its input on ``inputs``."""
    floor = max(min_sparsity, 1e-12)
    pruned = {name: m for name, m in model.named_modules()
              if isinstance(m, (nn.Linear, nn.Conv2d)) and float(m.weight.eq(0).float().mean()) >= floor}
    seen: dict[str, tuple[nn.Linear | nn.Conv2d, torch.Tensor]] = {}

    def keep(name: str) -> Any:
        def hook(module: nn.Linear | nn.Conv2d, args: tuple[Any, ...]) -> None:
            if name not in seen and args and isinstance(args[0], torch.Tensor):
                seen[name] = (module, args[0].detach().clone())
        return hook

    handles = [m.register_forward_pre_hook(keep(name)) for name, m in pruned.items()]
    try:
        with torch.inference_mode():
            call_model(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return {name: seen[name] for name in pruned if name in seen}


def _choose(
    name: str, layer: nn.Linear | nn.Conv2d, x: torch.Tensor, wanted: list[str], forced: bool, repeats: int,
    margin: float, device: torch.device,
) -> tuple[LayerChoice, nn.Module | None]:
    """Time dense against each applicable kernel on ``x``; the choice and the module to swap in."""
    sync = synchronizer(device)
    sparsity = float(layer.weight.eq(0).float().mean())
    layer(x)  # warm
    sync()
    start = time.perf_counter()
    reference = layer(x)
    sync()
    dense_first_ms = 1e3 * (time.perf_counter() - start)
    scale = float(reference.abs().max())
    modules: dict[str, nn.Module] = {}
    skipped: dict[str, str] = {}
    if isinstance(layer, nn.Conv2d):
        skipped = dict.fromkeys(wanted, "no sparse Conv2d kernel; prune channels for a physically smaller conv")
        wanted = []
    for kernel in wanted:
        reason = why_not(kernel, layer)  # type: ignore[arg-type]
        if reason is not None:
            skipped[kernel] = reason
            continue
        try:  # a kernel this torch build or device lacks is skipped, not fatal
            module = build_kernel(kernel, layer).to(device)  # type: ignore[arg-type]
            sync()
            start = time.perf_counter()
            output = module(x)
            sync()
            first_ms = 1e3 * (time.perf_counter() - start)
            error = float((output - reference).abs().max())
        except (RuntimeError, NotImplementedError, ValueError) as exc:
            skipped[kernel] = f"failed here: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            continue
        tolerance = TOLERANCE.get(layer.weight.dtype, 1e-4) * max(scale, 1.0)
        if error > tolerance:
            skipped[kernel] = f"output differs from dense by {error:.2e} (tolerance {tolerance:.1e})"
        elif not forced and device.type == "cpu" and first_ms > FAR_SLOWER * dense_first_ms:
            # on CPU a first call has no set-up cost worth the name (on CUDA it has: time it properly)
            skipped[kernel] = (f"its first call took {first_ms:.3g} ms, over {FAR_SLOWER:g}x dense's "
                               f"{dense_first_ms:.3g} ms: not timed further")
        else:
            modules[kernel] = module
    candidates: dict[str, Callable[[], object]] = {"dense": partial(layer, x)}
    candidates.update({k: partial(m, x) for k, m in modules.items()})
    times = interleaved_times(candidates, repeats, device, warmup=1, abandon=not forced)
    medians = {k: 1e3 * statistics.median(t) for k, t in times.items()}
    dense_ms = medians["dense"]
    best = min((k for k in modules), key=lambda k: medians[k], default=None)
    if forced:
        chosen = best
    else:
        chosen = best if best is not None and faster_beyond_noise(times[best], times["dense"], margin) else None
    choice = LayerChoice(name=name, sparsity=sparsity, kernel=chosen or "dense", dense_ms=dense_ms,
                         kernel_ms=medians[chosen] if chosen else dense_ms,
                         candidates={k: v for k, v in medians.items() if k != "dense"}, skipped=skipped)
    return choice, modules[chosen] if chosen else None


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def _max_error(output: Any, reference: Any) -> tuple[float, float]:
    if isinstance(output, torch.Tensor) and isinstance(reference, torch.Tensor):
        return float((output.float() - reference.float()).abs().max()), float(reference.float().abs().max())
    return float("nan"), 1.0


def _hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        name = ""
    return f"{name or platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
