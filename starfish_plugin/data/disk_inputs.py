"""Calibration inputs in a file instead of RAM (``HealConfig(inputs="disk")``).

Batches are validated and appended as they arrive, so a Dataset, DataLoader or generator of
batches is never gathered into one tensor; rows are read back per batch with ``os.preadv`` (not
a memory map, whose pages count as resident memory), as the disk target cache does.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from starfish_plugin.errors import CalibrationFileError


class DiskInputs:
    """Inputs ``[N, *row_shape]`` stored row after row in one file; ``rows`` selects a subset."""

    def __init__(self, directory: str | os.PathLike | None = None) -> None:
        try:
            if directory is not None:
                Path(directory).mkdir(parents=True, exist_ok=True)
            self.directory = Path(tempfile.mkdtemp(prefix="starfish-inputs-", dir=directory))
        except OSError as exc:
            raise CalibrationFileError(
                f"cannot create a directory for the calibration inputs in {directory or tempfile.gettempdir()} "
                f"({exc.strerror or exc}); pass another HealConfig.cache_dir or use inputs='memory'"
            ) from exc
        self.path = self.directory / "inputs.bin"
        self.row_shape: tuple[int, ...] = ()
        self.dtype: torch.dtype | None = None
        self.n = 0
        self.rows: torch.Tensor | None = None  # None: every row, in file order
        self._shared: dict[str, int | None] = {"fd": None}  # one read descriptor for the owner and its views
        try:
            self._writer = open(self.path, "wb", buffering=0)  # noqa: SIM115 - closed in finish() / close()
        except OSError as exc:
            shutil.rmtree(self.directory, ignore_errors=True)
            raise CalibrationFileError(
                f"cannot create the calibration inputs' file in {self.directory.parent} ({exc.strerror or exc}); "
                "pass another HealConfig.cache_dir or use inputs='memory'"
            ) from exc

    # -- writing -----------------------------------------------------------------------------
    def append(self, x: torch.Tensor) -> None:
        """Append the rows of one validated batch."""
        if self.dtype is None:
            self.row_shape, self.dtype = tuple(x.shape[1:]), x.dtype
        raw = x.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data  # a memoryview of the bytes
        try:
            while len(raw):  # unbuffered: a failed write raises here, not later at close
                raw = raw[self._writer.write(raw):]
        except OSError as exc:
            self.close()
            raise CalibrationFileError(
                f"writing calibration inputs to {self.directory} failed ({exc.strerror or exc}); free space there, "
                "pass another HealConfig.cache_dir, or use inputs='memory'"
            ) from exc
        self.n += x.shape[0]

    def finish(self) -> None:
        self._writer.close()

    # -- reading -----------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.row_shape)

    def __len__(self) -> int:
        return self.n if self.rows is None else len(self.rows)

    def subset(self, rows: torch.Tensor) -> DiskInputs:
        """A view of ``rows`` (positions in this view) sharing the file."""
        view = object.__new__(DiskInputs)
        view.__dict__.update(self.__dict__)  # the same file and read descriptor
        view.rows = rows if self.rows is None else self.rows[rows]
        return view

    def __getitem__(self, key: slice | torch.Tensor) -> torch.Tensor:
        positions = torch.arange(*key.indices(len(self))) if isinstance(key, slice) else key
        rows = positions if self.rows is None else self.rows[positions]
        fd = self._shared["fd"]
        if fd is None:
            fd = self._shared["fd"] = os.open(self.path, os.O_RDONLY)
        out = torch.empty((len(rows), *self.row_shape), dtype=self.dtype)
        size = out[0].numel() * out.element_size() if len(rows) else 0
        view = out.reshape(-1).view(torch.uint8).numpy().data  # a memoryview of out's bytes
        for j, i in enumerate(rows.tolist()):
            if os.preadv(fd, [view[j * size : (j + 1) * size]], i * size) != size:
                raise CalibrationFileError(f"the calibration input file {self.path} was truncated while healing")
        return out

    def chunks(self, rows_per_chunk: int = 256):
        """The rows in order, a chunk at a time (for hashing)."""
        for start in range(0, len(self), rows_per_chunk):
            yield self[slice(start, start + rows_per_chunk)]

    def close(self) -> None:
        """Close the file and remove it (views share the owner's file: only the owner removes it)."""
        if self.rows is not None:
            return
        if self._shared["fd"] is not None:
            os.close(self._shared["fd"])
            self._shared["fd"] = None
        if not self._writer.closed:
            try:
                self._writer.close()
            except OSError:
                pass  # the file is removed next anyway
        shutil.rmtree(self.directory, ignore_errors=True)
