"""``format="torchao-2:4"``: every Linear whose weight is 2:4 and has a shape the kernels take is
re-packed with torchao's semi-structured weight config (cuSPARSELt / CUTLASS, fp16 or bf16, CUDA),
the rest stay dense, and the whole module is saved with ``torch.save`` (torchao's safetensors path
does not cover sparse tensors). Checked once against the unpacked model on the example batch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from starfish_plugin.base.model_io import main_output
from starfish_plugin.errors import ExportError, NMPatternError, SemiStructuredError
from starfish_plugin.extras import need

TORCHAO_FILE = "model.pt"
HALF_TYPES = (torch.float16, torch.bfloat16)


def packable_layers(model: nn.Module, dtype: torch.dtype) -> tuple[list[str], dict[str, str]]:
    """(Linear layers the 2:4 kernels can take in ``dtype``, {layer left dense: why})."""
    from starfish_plugin.deploy.semi_structured import check_packable

    packed, dense = [], {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        try:
            check_packable(module.weight.detach().to(dtype), f"{name}.weight", backend="cusparselt")
        except (NMPatternError, SemiStructuredError) as exc:
            dense[name] = str(exc).split(";")[0]
        else:
            packed.append(name)
    return packed, dense


def save_torchao(model: nn.Module, directory: Path, example: Any) -> dict[str, Any]:
    """Pack ``model`` (a plain copy: masks folded) on the GPU in its own half dtype (float16 for a
    float32 model) and ``torch.save`` it."""
    from starfish_plugin.deploy.semi_structured import pack_semi_structured_

    need("torchao", "the torchao 2:4 export")
    first = next(model.parameters(), None)
    dtype = first.dtype if first is not None and first.dtype in HALF_TYPES else torch.float16
    packed, dense = packable_layers(model, dtype)
    if not packed:
        raise ExportError(f"no Linear layer of {type(model).__name__} is 2:4 with a shape the kernels take "
                          f"({len(dense)} checked, e.g. {next(iter(dense.items()), ('none', ''))}); prune it 2:4 "
                          "(e.g. torch.ao WeightNormSparsifier with sparse_block_shape=(1, 4), zeros_per_block=2) "
                          "or export it with format='hf' or 'onnx'")
    model = model.to("cuda", dtype).eval()
    checks: dict[str, Any] = {}
    x = None
    if isinstance(example, torch.Tensor):
        x = example.to("cuda", dtype if example.is_floating_point() else None)
    with torch.no_grad():
        want = main_output(model(x)).float() if x is not None else None
        pack_semi_structured_(model, packed)
        if want is not None:
            got = main_output(model(x)).float()
            scale = float(want.abs().max()) or 1.0
            checks["packed max abs difference to unpacked"] = float((got - want).abs().max())
            checks["relative to the output's largest value"] = checks["packed max abs difference to unpacked"] / scale
    write_packed(model, directory / TORCHAO_FILE)
    return {"dtype": str(dtype).replace("torch.", ""), "packed_layers": packed, "dense_layers": dense,
            "checks": checks,
            "load_hint": f"torch.load('{TORCHAO_FILE}', weights_only=False) on a CUDA machine with torchao installed "
                         "(a whole pickled module: load only files you trust)"}


def write_packed(model: nn.Module, path: Path) -> None:
    """``torch.save`` the whole packed module. torchao's ``sparsify_`` binds an ``extra_repr`` method
    on each packed Linear's instance, which pickles but does not unpickle (it is looked up by its
    own name); those instance bindings are dropped first (the class's ``extra_repr`` remains)."""
    for module in model.modules():
        module.__dict__.pop("extra_repr", None)
    torch.save(model, path)


def load_torchao(directory: Path) -> nn.Module:
    if not torch.cuda.is_available():
        raise ExportError(f"{directory} holds torchao 2:4 packed weights, which live on CUDA: load it on a machine "
                          "with a GPU, or export the model with format='hf', 'onnx' or 'torch' for this one")
    need("torchao", "loading a torchao 2:4 export")
    model = torch.load(directory / TORCHAO_FILE, map_location="cuda", weights_only=False)
    if not isinstance(model, nn.Module):
        raise ExportError(f"{directory / TORCHAO_FILE} does not hold a module; export it again")
    return model.eval()
