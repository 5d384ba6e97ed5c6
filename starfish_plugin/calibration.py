"""Calibration data in any of the accepted forms, checked and held as tensors."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from starfish_plugin.errors import CalibrationError, CalibrationTypeError

ACCEPTED = "a Dataset, a DataLoader, a Tensor of inputs, or an iterable of batches (inputs or (inputs, labels))"


@dataclass
class CalibrationData:
    """Calibration inputs ``[N, ...]`` and, when given, their labels ``[N]``."""

    inputs: torch.Tensor
    labels: torch.Tensor | None
    source: str
    _fingerprint: str | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def fingerprint(self) -> str:
        """Hash of the inputs (computed once; the disk cache and checkpoints both use it)."""
        if self._fingerprint is None:
            from starfish_plugin.fingerprint import hash_tensors

            self._fingerprint = hash_tensors([("inputs", self.inputs)])
        return self._fingerprint

    def batches(
        self, batch_size: int, generator: torch.Generator | None = None, n_batches: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """Yield ``(indices, inputs, labels)``; shuffled when a generator is given.

        With ``n_batches`` (distributed healing: every rank must step equally often) the samples
        are split into exactly that many batches of near-equal size instead.
        """
        n = len(self)
        order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
        if n_batches is not None:
            for idx in torch.tensor_split(order, n_batches):
                yield idx, self.inputs[idx], None if self.labels is None else self.labels[idx]
            return
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            if generator is None:
                sl = slice(start, start + len(idx))
                yield idx, self.inputs[sl], None if self.labels is None else self.labels[sl]
            else:
                yield idx, self.inputs[idx], None if self.labels is None else self.labels[idx]


def _split(item: object, where: str) -> tuple[object, object | None]:
    if isinstance(item, torch.Tensor):
        return item, None
    if isinstance(item, (tuple, list)) and len(item) >= 1:
        return item[0], item[1] if len(item) > 1 else None
    if isinstance(item, dict) and "pixel_values" in item:
        return item["pixel_values"], item.get("labels", item.get("label"))
    raise CalibrationTypeError(
        f"{where} is a {type(item).__name__}; each batch must be a Tensor of inputs or an (inputs, labels) pair"
    )


def _as_batches(calibration: object) -> tuple[Iterable, str, bool]:
    """Return (iterable, source name, items_are_single_samples)."""
    if isinstance(calibration, torch.Tensor):
        return [calibration], "Tensor", False
    if isinstance(calibration, DataLoader):
        return calibration, "DataLoader", False
    if isinstance(calibration, Dataset) and not isinstance(calibration, IterableDataset):
        return (calibration[i] for i in range(len(calibration))), "Dataset", True  # type: ignore[arg-type]
    if isinstance(calibration, (str, bytes)) or not isinstance(calibration, Iterable):
        raise CalibrationTypeError(f"calibration is a {type(calibration).__name__}; pass {ACCEPTED}")
    return calibration, type(calibration).__name__, False


def load_calibration(calibration: object) -> CalibrationData:
    """Gather ``calibration`` into tensors and check it: non-empty, floating, finite, one shape.

    Raises:
        CalibrationError: empty, inconsistent shapes, or NaN/Inf inputs.
        CalibrationTypeError: an unsupported type, non-tensor items or a non-floating dtype.
    """
    batches, source, singles = _as_batches(calibration)
    inputs: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    for i, item in enumerate(batches):
        where = f"calibration {'sample' if singles else 'batch'} {i}"
        x, y = _split(item, where)
        if not isinstance(x, torch.Tensor):
            raise CalibrationTypeError(f"{where} holds inputs of type {type(x).__name__}; inputs must be Tensors")
        if singles:
            x = x.unsqueeze(0)
            if y is not None:
                y = torch.as_tensor(y)
                if y.numel() != 1:
                    raise CalibrationTypeError(
                        f"{where} has a label of shape {tuple(y.shape)}; labels must be class indices (one integer each)"
                    )
                y = y.reshape(1)
        if x.dim() < 2:
            raise CalibrationError(
                f"{where} has shape {tuple(x.shape)}; inputs need a batch dimension first, e.g. [N, C, H, W]"
            )
        if inputs and x.shape[1:] != inputs[0].shape[1:]:
            raise CalibrationError(
                f"{where} has per-sample shape {tuple(x.shape[1:])} but earlier ones have "
                f"{tuple(inputs[0].shape[1:])}; resize every input to one shape"
            )
        if (y is None) != (not labels) and inputs:
            raise CalibrationError(f"{where} {'lacks' if y is None else 'has'} labels unlike earlier batches")
        if y is not None:
            y = torch.as_tensor(y)
            if y.dim() != 1 or y.shape[0] != x.shape[0]:
                raise CalibrationError(
                    f"{where} has {x.shape[0]} inputs but labels of shape {tuple(y.shape)}; "
                    "labels must be class indices, one per input"
                )
            labels.append(y)
        inputs.append(x)
    if not inputs or sum(x.shape[0] for x in inputs) == 0:
        raise CalibrationError(f"the calibration set is empty; pass at least one batch ({ACCEPTED})")
    data = torch.cat(inputs) if len(inputs) > 1 else inputs[0]
    if not data.is_floating_point():
        raise CalibrationTypeError(
            f"calibration inputs have dtype {data.dtype}; convert them to the model's floating dtype "
            "(e.g. images.float() / 255, normalized as in training)"
        )
    finite = torch.isfinite(data.reshape(data.shape[0], -1)).all(dim=1)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten()
        raise CalibrationError(
            f"{len(bad)} calibration inputs contain NaN or Inf (first: sample {int(bad[0])}); clean or drop them"
        )
    label_tensor = (torch.cat(labels) if len(labels) > 1 else labels[0]) if labels else None
    if label_tensor is not None and label_tensor.is_floating_point():
        raise CalibrationTypeError(f"calibration labels have dtype {label_tensor.dtype}; class indices must be integers")
    if label_tensor is not None:
        label_tensor = label_tensor.long()
    return CalibrationData(inputs=data, labels=label_tensor, source=source)
