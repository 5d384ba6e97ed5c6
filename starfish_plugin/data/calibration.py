"""Calibration data in any of the accepted forms, checked and held as tensors (or in a file)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from starfish_plugin.base.model_io import ModelInputs, accepts_keyword
from starfish_plugin.data.disk_inputs import DiskInputs
from starfish_plugin.errors import CalibrationError, CalibrationTypeError

ACCEPTED = (
    "a Dataset, a DataLoader, a Tensor of inputs, or an iterable of batches (inputs, (inputs, labels), "
    "or dicts of tensors passed as keyword arguments)"
)


@dataclass
class CalibrationData:
    """Calibration inputs ``[N, ...]`` (a tensor, ``DiskInputs`` read per batch, or ``ModelInputs``
    whose fields are either) and, when given, their labels ``[N]``."""

    inputs: torch.Tensor | DiskInputs | ModelInputs
    labels: torch.Tensor | None
    source: str
    total: int | None = None  # set on one rank's shard: the number of samples over all ranks
    _fingerprint: str | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.inputs)

    @property
    def dtype(self) -> torch.dtype | None:
        """The floating dtype of the inputs (``None`` for token ids only) or the integer one."""
        return self.inputs.dtype

    @property
    def on_disk(self) -> bool:
        if isinstance(self.inputs, ModelInputs):
            return any(isinstance(v, DiskInputs) for _, v in self.inputs.fields())
        return isinstance(self.inputs, DiskInputs)

    def head(self, n: int) -> torch.Tensor | ModelInputs:
        """The first ``n`` inputs (a tensor, or ``ModelInputs`` of tensors)."""
        return self.inputs[:n]

    def shard(self, rank: int, world: int) -> CalibrationData:
        """Samples ``rank, rank + world, ...`` (the same file on disk)."""
        if self.total is not None:
            return self  # already this rank's shard (written so by load_calibration)
        shard = self.subset(torch.arange(rank, len(self), world))
        shard.total = len(self)
        return shard

    def subset(self, rows: torch.Tensor) -> CalibrationData:
        """The samples at positions ``rows``, in that order (inputs on disk stay in their file,
        read through a view; the owner keeps removing the file on ``close``)."""

        def pick(value):
            return value.subset(rows) if isinstance(value, DiskInputs) else value[rows]

        inputs = self.inputs.map(pick) if isinstance(self.inputs, ModelInputs) else pick(self.inputs)
        labels = None if self.labels is None else self.labels[rows]
        return CalibrationData(inputs, labels, self.source, total=self.total)

    def fingerprint(self) -> str:
        """Hash of the inputs (computed once; the disk cache and checkpoints both use it). The
        same in memory and on disk, so a cache or checkpoint carries over between the two."""
        if self._fingerprint is None:
            from starfish_plugin.runtime.fingerprint import hash_chunks, hash_tensors, text_fingerprint

            def one(name: str, value) -> str:
                if isinstance(value, DiskInputs):
                    return hash_chunks(name, value.dtype, value.shape, value.chunks())
                return hash_tensors([(name, value)])

            if isinstance(self.inputs, ModelInputs):
                self._fingerprint = text_fingerprint([(name, one(name, v)) for name, v in self.inputs.fields()])
            else:
                self._fingerprint = one("inputs", self.inputs)
        return self._fingerprint

    def close(self) -> None:
        """Remove the inputs' files, if they are on disk."""
        fields = self.inputs.fields() if isinstance(self.inputs, ModelInputs) else [("inputs", self.inputs)]
        for _, value in fields:
            if isinstance(value, DiskInputs):
                value.close()

    def batches(
        self, batch_size: int, generator: torch.Generator | None = None, n_batches: int | None = None,
        rows: torch.Tensor | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor | ModelInputs, torch.Tensor | None]]:
        """Yield ``(indices, inputs, labels)``; shuffled when a generator is given.

        With ``n_batches`` (distributed healing: every rank must step equally often) the samples
        are split into exactly that many batches of near-equal size instead. With ``rows``, only
        those samples are read (the indices yielded are still positions in the whole set).
        """
        pool = torch.arange(len(self)) if rows is None else rows
        n = len(pool)
        order = pool[torch.randperm(n, generator=generator)] if generator is not None else pool
        if n_batches is not None:
            for idx in torch.tensor_split(order, n_batches):
                yield idx, self.inputs[idx], None if self.labels is None else self.labels[idx]
            return
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            if generator is None and rows is None:
                sl = slice(start, start + len(idx))
                yield idx, self.inputs[sl], None if self.labels is None else self.labels[sl]
            else:
                yield idx, self.inputs[idx], None if self.labels is None else self.labels[idx]


LABEL_KEYS = ("labels", "label")


@dataclass
class _Batch:
    """One calibration item taken apart: its input fields, the call structure and its labels."""

    fields: dict[str, torch.Tensor]  # "arg0", "arg1", ... for positional inputs, else keyword names
    structure: tuple  # ("tensor",) for a single tensor, ("args", n, keys) otherwise
    labels: object | None


def _tensor_field(value: object, where: str, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (list, tuple, int, float)) and not isinstance(value, bool):
        try:
            return torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError):
            pass
    raise CalibrationTypeError(
        f"{where} holds {name!r} of type {type(value).__name__}; every input must be a Tensor "
        "(or a list of numbers, e.g. token ids)"
    )


def _split(item: object, where: str) -> _Batch:
    """Inputs and labels of one item: a Tensor, an ``(inputs, labels)`` pair whose inputs are a
    Tensor, a tuple of Tensors (positional) or a dict (keywords), or a dict batch whose
    ``labels``/``label`` entry holds the labels."""
    if isinstance(item, torch.Tensor):
        return _Batch({"arg0": item}, ("tensor",), None)
    labels = None
    if isinstance(item, Mapping):
        inputs: object = {k: v for k, v in item.items() if k not in LABEL_KEYS}
        labels = next((item[k] for k in LABEL_KEYS if k in item), None)
    elif isinstance(item, (tuple, list)) and len(item) >= 1:
        inputs, labels = item[0], item[1] if len(item) > 1 else None
    else:
        raise CalibrationTypeError(
            f"{where} is a {type(item).__name__}; each batch must be a Tensor of inputs, an (inputs, labels) pair, "
            "or a dict of tensors passed to the model as keyword arguments"
        )
    if isinstance(inputs, torch.Tensor):
        return _Batch({"arg0": inputs}, ("tensor",), labels)
    if isinstance(inputs, Mapping):
        if not inputs:
            raise CalibrationTypeError(f"{where} is a dict with no inputs besides labels; add the model's inputs")
        fields = {str(k): _tensor_field(v, where, str(k)) for k, v in inputs.items() if v is not None}
        return _Batch(fields, ("args", 0, tuple(fields)), labels)
    if isinstance(inputs, (tuple, list)) and inputs:
        fields = {f"arg{i}": _tensor_field(v, where, f"input {i}") for i, v in enumerate(inputs)}
        return _Batch(fields, ("args", len(fields), ()), labels)
    raise CalibrationTypeError(
        f"{where} holds inputs of type {type(inputs).__name__}; inputs must be Tensors, a tuple of Tensors "
        "or a dict of Tensors"
    )


def _is_inputs_and_labels(calibration: object) -> bool:
    """A pair ``(inputs [N, ...], labels [N])`` of integer labels, rather than two batches."""
    if not (isinstance(calibration, tuple) and len(calibration) == 2):
        return False
    x, y = calibration
    return (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.dim() >= 2 and y.dim() == 1
            and not y.is_floating_point() and len(x) == len(y))


def _as_batches(calibration: object) -> tuple[Iterable, str, bool]:
    """Return (iterable, source name, items_are_single_samples)."""
    if isinstance(calibration, torch.Tensor):
        return [calibration], "Tensor", False
    if isinstance(calibration, DataLoader):
        return calibration, "DataLoader", False
    if isinstance(calibration, Dataset) and not isinstance(calibration, IterableDataset):
        return (calibration[i] for i in range(len(calibration))), "Dataset", True  # type: ignore[arg-type]
    if isinstance(calibration, Mapping):
        return [calibration], "dict of Tensors", False
    if _is_inputs_and_labels(calibration):  # (images, labels) for the whole set, as TensorDataset takes them
        return [calibration], "(inputs, labels) pair", False
    if isinstance(calibration, (str, bytes)) or not isinstance(calibration, Iterable):
        raise CalibrationTypeError(f"calibration is a {type(calibration).__name__}; pass {ACCEPTED}")
    return calibration, type(calibration).__name__, False


def load_calibration(
    calibration: object,
    to_disk: bool = False,
    directory: str | None = None,
    shard: tuple[int, int] | None = None,
    model: nn.Module | None = None,
) -> CalibrationData:
    """Gather ``calibration`` and check it: non-empty, finite, one shape and dtype per input.

    Float images, integer token ids, several positional tensors and dicts of keyword tensors
    are accepted. With ``to_disk``, each batch is checked and appended to files (in a new
    temporary directory under ``directory``) instead of being kept: RAM does not grow with the
    calibration set. With ``shard=(rank, world)`` as well, only that rank's samples
    (``rank::world``) are written. ``model``, if given, decides whether a dict batch with one
    input (``{"pixel_values": x}``) is passed by keyword or positionally.

    Raises:
        CalibrationError: empty, inconsistent shapes, or NaN/Inf inputs.
        CalibrationTypeError: an unsupported type, non-tensor items or changing dtypes.
    """
    batches, source, singles = _as_batches(calibration)
    gathered = _Gathered(to_disk, directory, shard if to_disk else None)
    try:
        for i, item in enumerate(batches):
            gathered.add(_split(item, f"calibration {'sample' if singles else 'batch'} {i}"), singles)
        return gathered.finish(source, model)
    except BaseException:
        gathered.discard()
        raise


class _Gathered:
    """Checked calibration batches, field by field, in memory or in files."""

    def __init__(self, to_disk: bool, directory: str | None, shard: tuple[int, int] | None) -> None:
        self.to_disk, self.directory, self.shard = to_disk, directory, shard
        self.structure: tuple | None = None
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self.parts: dict[str, list[torch.Tensor]] = {}
        self.disk: dict[str, DiskInputs] = {}
        self.labels: list[torch.Tensor] = []
        self.n, self.n_bad, self.first_bad, self.batches = 0, 0, -1, 0
        self.dropped_labels: tuple[int, ...] | None = None

    def add(self, batch: _Batch, single: bool) -> None:
        where = f"calibration {'sample' if single else 'batch'} {self.batches}"
        self.batches += 1
        fields, y = batch.fields, batch.labels
        if any(v.is_meta for v in fields.values()):
            raise CalibrationError(
                f"{where} is on the 'meta' device: it has a shape but no values (built under "
                "torch.device('meta')?); pass real tensors, on the CPU or the models' device"
            )
        if single:
            fields = {k: v.unsqueeze(0) for k, v in fields.items()}
        if self.structure is None:
            self.structure = batch.structure
        elif batch.structure != self.structure:
            raise CalibrationError(
                f"{where} has inputs {sorted(fields)} but earlier ones have {sorted(self.shapes)}; give every "
                "batch the same inputs"
            )
        plain = batch.structure == ("tensor",)
        rows = {k: v.shape[0] if v.dim() else None for k, v in fields.items()}
        for name, v in fields.items():
            has = f"{where} has" if plain else f"{where} has input {name!r} of"
            if v.dim() < (2 if plain else 1):
                raise CalibrationError(
                    f"{has} shape {tuple(v.shape)}; inputs need a batch dimension first, "
                    "e.g. [N, C, H, W] images or [N, T] token ids"
                )
            if self.shapes.get(name, v.shape[1:]) != v.shape[1:]:
                raise CalibrationError(
                    f"{has} per-sample shape {tuple(v.shape[1:])} but earlier ones have "
                    f"{self.shapes[name]}; resize every input to one shape (pad token ids to one length)"
                )
            if self.dtypes.get(name, v.dtype) != v.dtype:
                raise CalibrationTypeError(
                    f"{has} dtype {v.dtype} but earlier ones have {self.dtypes[name]}; convert "
                    "every input to one dtype (the model's)"
                )
            if plain and (v.dtype in (torch.bool, torch.uint8) or v.is_complex()):
                raise CalibrationTypeError(
                    f"calibration inputs have dtype {v.dtype}; convert images to the model's floating dtype "
                    "(e.g. images.float() / 255, normalized as in training); token ids should be torch.long"
                )
        if len(set(rows.values())) != 1:
            raise CalibrationError(f"{where} has inputs with different numbers of rows {rows}; one row per sample")
        n_rows = next(iter(rows.values()))
        assert n_rows is not None  # every input has a batch dimension (checked above)
        y = self._labels(y, n_rows, where, single, plain)
        if (y is None) != (not self.labels) and self.n > 0 and self.dropped_labels is None:
            raise CalibrationError(f"{where} {'lacks' if y is None else 'has'} labels unlike earlier batches")
        if y is not None:
            self.labels.append(y)
        if n_rows == 0:
            return
        bad = torch.zeros(n_rows, dtype=torch.bool)
        for v in fields.values():
            if v.is_floating_point() or v.is_complex():
                bad |= ~torch.isfinite(v.reshape(n_rows, -1)).all(dim=1)
        if bool(bad.any()):
            self.first_bad = self.n + int(bad.nonzero()[0]) if self.first_bad < 0 else self.first_bad
            self.n_bad += int(bad.sum())
        for name, v in fields.items():
            self.shapes[name], self.dtypes[name] = tuple(v.shape[1:]), v.dtype
        if self.shard is not None:  # keep this rank's rows only
            keep = (torch.arange(self.n, self.n + n_rows) % self.shard[1]) == self.shard[0]
            fields = {k: v[keep] for k, v in fields.items()}
            if y is not None:
                self.labels[-1] = self.labels[-1][keep]
        self.n += n_rows
        for name, v in fields.items():
            if self.to_disk:
                if name not in self.disk:
                    self.disk[name] = DiskInputs(self.directory)
                self.disk[name].append(v)
            else:
                self.parts.setdefault(name, []).append(v)

    def _labels(self, y: object, n_rows: int, where: str, single: bool, plain: bool) -> torch.Tensor | None:
        """Class-index labels ``[N]``; in dict batches, other labels (token labels ``[N, T]``) are
        ignored, since the alignment losses do not use labels."""
        if y is None:
            return None
        y = torch.as_tensor(y)
        if single:
            if y.numel() != 1 and plain:
                raise CalibrationTypeError(
                    f"{where} has a label of shape {tuple(y.shape)}; labels must be class indices (one integer each)"
                )
            y = y.reshape(1) if y.numel() == 1 else y.unsqueeze(0)
        if y.dim() != 1 or y.shape[0] != n_rows:
            if not plain and y.dim() >= 1 and y.shape[0] == n_rows:
                self.dropped_labels = tuple(y.shape[1:])
                return None
            raise CalibrationError(
                f"{where} has {n_rows} inputs but labels of shape {tuple(y.shape)}; "
                "labels must be class indices, one per input"
            )
        return y

    def finish(self, source: str, model: nn.Module | None) -> CalibrationData:
        if self.n == 0:
            raise CalibrationError(f"the calibration set is empty; pass at least one batch ({ACCEPTED})")
        if self.n_bad:
            raise CalibrationError(
                f"{self.n_bad} calibration inputs contain NaN or Inf (first: sample {self.first_bad}); "
                "clean or drop them"
            )
        label_tensor = (torch.cat(self.labels) if len(self.labels) > 1 else self.labels[0]) if self.labels else None
        if label_tensor is not None and label_tensor.is_floating_point():
            raise CalibrationTypeError(
                f"calibration labels have dtype {label_tensor.dtype}; class indices must be integers"
            )
        if label_tensor is not None:
            label_tensor = label_tensor.long()
        values: dict[str, torch.Tensor | DiskInputs]
        if self.to_disk:
            for d in self.disk.values():
                d.finish()
            values = dict(self.disk)
            source = f"{source} (inputs on disk)"
        else:
            values = {k: torch.cat(v) if len(v) > 1 else v[0] for k, v in self.parts.items()}
        assert self.structure is not None
        inputs: torch.Tensor | DiskInputs | ModelInputs
        if self.structure == ("tensor",):
            inputs = values["arg0"]
        elif self.structure[1] == 0 and len(values) == 1 and model is not None and not accepts_keyword(
            model, next(iter(values))
        ):
            inputs = next(iter(values.values()))  # {"pixel_values": x} for a model whose forward takes x
        else:
            n_args = self.structure[1]
            inputs = ModelInputs(
                tuple(values[f"arg{i}"] for i in range(n_args)),
                {k: v for k, v in values.items() if not (n_args and k.startswith("arg"))},
            )
        total = self.n if self.shard is not None else None
        data = CalibrationData(inputs=inputs, labels=label_tensor, source=source, total=total)
        if self.dropped_labels is not None:
            data.source += f" (labels of per-sample shape {self.dropped_labels} ignored: not class indices)"
        return data

    def discard(self) -> None:
        for d in self.disk.values():
            d.close()
