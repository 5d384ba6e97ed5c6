"""Calibration data in any of the accepted forms, checked and held as tensors (or in a file)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from starfish_plugin.disk_inputs import DiskInputs
from starfish_plugin.errors import CalibrationError, CalibrationTypeError

ACCEPTED = "a Dataset, a DataLoader, a Tensor of inputs, or an iterable of batches (inputs or (inputs, labels))"


@dataclass
class CalibrationData:
    """Calibration inputs ``[N, ...]`` (a tensor, or ``DiskInputs`` read per batch) and, when
    given, their labels ``[N]``."""

    inputs: torch.Tensor | DiskInputs
    labels: torch.Tensor | None
    source: str
    total: int | None = None  # set on one rank's shard: the number of samples over all ranks
    _fingerprint: str | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.inputs)

    @property
    def dtype(self) -> torch.dtype:
        return self.inputs.dtype

    @property
    def on_disk(self) -> bool:
        return isinstance(self.inputs, DiskInputs)

    def head(self, n: int) -> torch.Tensor:
        """The first ``n`` inputs as a tensor."""
        return self.inputs[:n]

    def shard(self, rank: int, world: int) -> CalibrationData:
        """Samples ``rank, rank + world, ...`` (a view: no copy in memory, the same file on disk)."""
        if self.total is not None:
            return self  # already this rank's shard (written so by load_calibration)
        labels = None if self.labels is None else self.labels[rank::world]
        if self.on_disk:
            inputs = self.inputs.subset(torch.arange(rank, len(self), world))
        else:
            inputs = self.inputs[rank::world]
        return CalibrationData(inputs, labels, self.source, total=len(self))

    def fingerprint(self) -> str:
        """Hash of the inputs (computed once; the disk cache and checkpoints both use it). The
        same in memory and on disk, so a cache or checkpoint carries over between the two."""
        if self._fingerprint is None:
            from starfish_plugin.fingerprint import hash_chunks, hash_tensors

            if self.on_disk:
                self._fingerprint = hash_chunks("inputs", self.dtype, self.inputs.shape, self.inputs.chunks())
            else:
                self._fingerprint = hash_tensors([("inputs", self.inputs)])
        return self._fingerprint

    def close(self) -> None:
        """Remove the inputs' file, if they are on disk."""
        if self.on_disk:
            self.inputs.close()

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


def load_calibration(
    calibration: object, to_disk: bool = False, directory: str | None = None, shard: tuple[int, int] | None = None
) -> CalibrationData:
    """Gather ``calibration`` and check it: non-empty, floating, finite, one shape and dtype.

    With ``to_disk``, each batch is checked and appended to a file (in a new temporary directory
    under ``directory``) instead of being kept: RAM does not grow with the calibration set. With
    ``shard=(rank, world)`` as well, only that rank's samples (``rank::world``) are written.

    Raises:
        CalibrationError: empty, inconsistent shapes, or NaN/Inf inputs.
        CalibrationTypeError: an unsupported type, non-tensor items or a non-floating dtype.
    """
    batches, source, singles = _as_batches(calibration)
    disk = DiskInputs(directory) if to_disk else None
    try:
        return _gather(batches, source, singles, disk, shard if to_disk else None)
    except BaseException:
        if disk is not None:
            disk.close()
        raise


def _gather(
    batches: Iterable, source: str, singles: bool, disk: DiskInputs | None, shard: tuple[int, int] | None
) -> CalibrationData:
    inputs: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    first_shape: tuple[int, ...] | None = None
    first_dtype: torch.dtype | None = None
    n, n_bad, first_bad = 0, 0, -1
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
        if first_shape is not None and x.shape[1:] != first_shape:
            raise CalibrationError(
                f"{where} has per-sample shape {tuple(x.shape[1:])} but earlier ones have "
                f"{first_shape}; resize every input to one shape"
            )
        if (y is None) != (not labels) and n > 0:
            raise CalibrationError(f"{where} {'lacks' if y is None else 'has'} labels unlike earlier batches")
        if not x.is_floating_point():
            raise CalibrationTypeError(
                f"calibration inputs have dtype {x.dtype}; convert them to the model's floating dtype "
                "(e.g. images.float() / 255, normalized as in training)"
            )
        if first_dtype is not None and x.dtype != first_dtype:
            raise CalibrationTypeError(
                f"{where} has dtype {x.dtype} but earlier ones have {first_dtype}; convert every input to the "
                "model's dtype"
            )
        if y is not None:
            y = torch.as_tensor(y)
            if y.dim() != 1 or y.shape[0] != x.shape[0]:
                raise CalibrationError(
                    f"{where} has {x.shape[0]} inputs but labels of shape {tuple(y.shape)}; "
                    "labels must be class indices, one per input"
                )
            labels.append(y)
        if x.shape[0] == 0:
            continue
        finite = torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)
        if not bool(finite.all()):
            bad = (~finite).nonzero().flatten()
            first_bad = n + int(bad[0]) if first_bad < 0 else first_bad
            n_bad += len(bad)
        first_shape, first_dtype = tuple(x.shape[1:]), x.dtype
        if shard is not None:  # keep this rank's rows only
            keep = (torch.arange(n, n + x.shape[0]) % shard[1]) == shard[0]
            x = x[keep]
            if y is not None:
                labels[-1] = labels[-1][keep]
        n += len(keep) if shard is not None else x.shape[0]
        if disk is not None:
            disk.append(x)
        else:
            inputs.append(x)
    if n == 0:
        raise CalibrationError(f"the calibration set is empty; pass at least one batch ({ACCEPTED})")
    if n_bad:
        raise CalibrationError(
            f"{n_bad} calibration inputs contain NaN or Inf (first: sample {first_bad}); clean or drop them"
        )
    label_tensor = (torch.cat(labels) if len(labels) > 1 else labels[0]) if labels else None
    if label_tensor is not None and label_tensor.is_floating_point():
        raise CalibrationTypeError(f"calibration labels have dtype {label_tensor.dtype}; class indices must be integers")
    if label_tensor is not None:
        label_tensor = label_tensor.long()
    if disk is not None:
        disk.finish()
        return CalibrationData(inputs=disk, labels=label_tensor, source=f"{source} (inputs on disk)",
                               total=n if shard is not None else None)
    data = torch.cat(inputs) if len(inputs) > 1 else inputs[0]
    return CalibrationData(inputs=data, labels=label_tensor, source=source)
