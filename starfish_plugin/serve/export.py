"""``export`` a healed model in a form serving engines load, and ``load_exported`` it back.

Every export is written into a new directory next to the target and moved into place only when
it is complete, so a failed export leaves the disk as it was; the model itself is never changed
(a copy has its masks made permanent). Each export holds the model's files, ``starfish.json``
(format, per-layer sparsity and pattern, the heal's facts, checks, package versions) and a
``README.md`` model card.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from starfish_plugin.deploy.fold import folded_copy
from starfish_plugin.errors import ExportError
from starfish_plugin.serve.card import dtype_name, heal_facts, layer_sparsity, read_facts, versions, write_card
from starfish_plugin.serve.hf import load_hf, save_hf
from starfish_plugin.serve.onnx_file import load_onnx, save_onnx
from starfish_plugin.serve.torch_file import load_torch, save_torch
from starfish_plugin.serve.torchao_file import load_torchao, save_torchao

FORMATS = ("hf", "onnx", "torch", "torchao-2:4")


def plain_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every adapter's masks made permanent (prune hooks and
    parametrizations removed, pruned entries exact zeros), in eval mode on the CPU."""
    return folded_copy(model).cpu().eval()


def _target(directory: str | os.PathLike[str], overwrite: bool) -> Path:
    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise ExportError(f"{target} is a file; export writes a directory: pass a directory path")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise ExportError(f"{target} exists and is not empty: nothing was written. Pass overwrite=True (CLI "
                          "--overwrite) to replace it, or choose a new directory")
    return target


def export(
    model: nn.Module,
    directory: str | os.PathLike[str],
    format: str = "torch",  # noqa: A002 - the public name users pass
    *,
    overwrite: bool = False,
    report: Any = None,
    example_inputs: torch.Tensor | None = None,
    model_spec: str | None = None,
    model_args: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` to ``directory`` as ``format``; returns the directory.

    Args:
        format: ``"hf"`` (Hugging Face folder, safetensors: transformers, vLLM, SGLang), ``"onnx"``
            (``model.onnx``: ONNX Runtime, OpenVINO, TensorRT; needs ``example_inputs``, checked in
            ONNX Runtime), ``"torch"`` (weights-only ``model.pt`` plus the constructor that rebuilds
            it: ``model_spec``/``model_args``, guessed for timm models) or ``"torchao-2:4"`` (CUDA: every
            2:4 Linear packed for torchao's sparse kernels in fp16/bf16, the module ``torch.save``-d;
            checked against the unpacked model when ``example_inputs`` is given).
        overwrite: replace a non-empty ``directory``; otherwise that is an ``ExportError``.
        report: the ``HealReport`` of the heal, recorded in ``starfish.json`` and the model card.
    """
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if not isinstance(model, nn.Module):
        raise ExportError(f"export() needs an nn.Module, got {type(model).__name__}")
    target = _target(directory, overwrite)
    if format == "torchao-2:4" and not torch.cuda.is_available():
        raise ExportError("format='torchao-2:4' packs 2:4 weights for torchao's CUDA kernels (cuSPARSELt/CUTLASS), "
                          "and no CUDA device is available here: export on a machine with a GPU, or use format='hf' "
                          "or 'onnx' (TensorRT uses 2:4 weights from ONNX)")
    if format == "onnx" and example_inputs is None:
        raise ExportError("format='onnx' traces the model: pass example_inputs (one batch as its forward takes it)")
    plain = plain_copy(model)
    facts: dict[str, Any] = {"format": format, "architecture": type(model).__name__, "dtype": dtype_name(plain),
                             "parameters": sum(p.numel() for p in plain.parameters()),
                             "layers": layer_sparsity(plain), "heal": heal_facts(report), "versions": versions()}
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}-export-", dir=target.parent))
    try:
        if format == "hf":
            facts |= save_hf(plain, work)
        elif format == "onnx":
            facts |= save_onnx(plain, work, example_inputs.detach().cpu())  # type: ignore[union-attr]
        elif format == "torch":
            facts |= save_torch(plain, work, model_spec, model_args)
        else:
            facts |= save_torchao(plain, work, example_inputs)
        facts["files"] = sorted(p.name for p in work.iterdir())
        write_card(work, facts)
        _move_into_place(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return target


def _move_into_place(work: Path, target: Path) -> None:
    """``work`` becomes ``target``; an old ``target`` (``overwrite=True``) is removed only once the
    new one is in place, and put back if the move fails."""
    old = target.with_name(f".{target.name}-replaced") if target.exists() else None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    try:
        work.rename(target)
    except OSError:
        if old is not None:
            old.rename(target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def load_exported(directory: str | os.PathLike[str]) -> nn.Module:
    """The model an ``export`` wrote to ``directory``: a transformers model (``hf``), the rebuilt
    architecture with its weights (``torch``), the ONNX file run by ONNX Runtime (``onnx``), or the
    packed module on the GPU (``torchao-2:4``, a pickle: load only exports you trust)."""
    path = Path(directory)
    try:
        facts = read_facts(path)
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path} is not a starfish export (no readable starfish.json: {exc}); export a model "
                          "there with starfish_plugin.export(model, path, format=...)") from exc
    loaders = {"hf": lambda: load_hf(path, facts), "onnx": lambda: load_onnx(path),
               "torch": lambda: load_torch(path, facts), "torchao-2:4": lambda: load_torchao(path)}
    if facts.get("format") not in loaders:
        raise ExportError(f"{path} holds format {facts.get('format')!r}, which load_exported cannot read here")
    return loaders[facts["format"]]()
