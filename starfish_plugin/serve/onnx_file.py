"""``format="onnx"``: ``model.onnx`` for ONNX Runtime, OpenVINO and TensorRT, written by PyTorch's
current exporter (``torch.onnx.export(..., dynamo=True)``) with a dynamic batch dimension, and
checked once by running it in ONNX Runtime against the PyTorch model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from starfish_plugin.base.model_io import main_output
from starfish_plugin.errors import ExportError
from starfish_plugin.extras import need

ONNX_FILE = "model.onnx"


def _need(module: str) -> Any:
    return need(module, "ONNX export and ONNX Runtime")


def save_onnx(model: nn.Module, directory: Path, example: torch.Tensor) -> dict[str, Any]:
    """Export, then run the file in ONNX Runtime on ``example`` and record the largest difference."""
    _need("onnx"), _need("onnxscript")
    ort = _need("onnxruntime")
    if not isinstance(example, torch.Tensor):
        raise ExportError(
            f"format='onnx' takes one input tensor as example_inputs (a batch as the model's forward takes it), "
            f"got {type(example).__name__}; for Hugging Face language models use format='hf'"
        )
    path = directory / ONNX_FILE
    batch = torch.export.Dim("batch", min=1)
    try:
        with torch.no_grad():
            torch.onnx.export(model, (example,), str(path), dynamo=True, dynamic_shapes=({0: batch},),
                              input_names=["input"], output_names=["output"], external_data=False, verbose=False)
    except Exception as exc:  # the exporter raises many kinds; all mean "cannot be traced"
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise ExportError(
            f"{type(model).__name__} could not be exported to ONNX ({type(exc).__name__}: {first[:300]}). Check that "
            "example_inputs is a batch the model's forward takes; a model with Python control flow on values "
            "cannot be traced: export it with format='torch' (or 'hf')"
        ) from exc
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = example.detach().cpu()
    with torch.no_grad():
        want = main_output(model(example))
    if not isinstance(want, torch.Tensor):
        raise ExportError(f"the model returned {type(want).__name__} with no tensor in it; ONNX export needs one")
    want = want.detach().float().cpu()
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]).float()
    if got.shape != want.shape:
        raise ExportError(f"ONNX Runtime returned shape {tuple(got.shape)} where PyTorch returns {tuple(want.shape)}")
    difference = float((got - want).abs().max())
    return {"input_shape": list(example.shape), "input_dtype": str(example.dtype).replace("torch.", ""),
            "checks": {"onnxruntime max abs difference to PyTorch": difference},
            "load_hint": f"onnxruntime.InferenceSession('{ONNX_FILE}')"}


class OnnxModel(nn.Module):
    """An exported ONNX file run by ONNX Runtime (CPU), called like the PyTorch model it came from."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        ort = _need("onnxruntime")
        self.path = path
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: x.detach().cpu().numpy()})[0]
        return torch.from_numpy(out)


def load_onnx(directory: Path) -> nn.Module:
    return OnnxModel(directory / ONNX_FILE).eval()
