"""Disk-backed dense targets: fp16 block outputs written once to files, read per batch.

One file per block (and one for the logits), rows in calibration order. Rows are read with
``os.preadv`` into a fresh buffer rather than through a memory map, because mapped pages count
toward the process's resident memory; this way RAM stays flat as the calibration set grows and the
kernel's page cache (reclaimable) does the caching. A ``meta.json`` written last, after every file
is complete, holds a fingerprint of the dense model, the calibration inputs and the block
selection; a cache whose fingerprint differs, or that was never completed, is rebuilt.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from starfish_plugin.errors import TargetCacheError

VERSION = 1
META = "meta.json"
FP16_MAX = float(torch.finfo(torch.float16).max)
LOGITS = "__logits__"  # the key under which starfish_plugin.data.targets stores logits


def free_bytes(directory: Path) -> int:
    """Free bytes on the filesystem that holds ``directory`` (or its nearest existing parent)."""
    probe = directory
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def _close_quietly(handles: Iterable) -> None:
    """Close files after a failure; flushing what is buffered may fail again, and is moot."""
    for handle in handles:
        try:
            handle.close()
        except OSError:
            pass


def _file(index: int) -> str:
    return f"target_{index:03d}.bin"


class DiskTargetCache:
    """The dense targets of one calibration set, in ``directory``."""

    def __init__(self, directory: str | os.PathLike, fingerprint: dict[str, str], n_samples: int) -> None:
        self.directory = Path(directory)
        self.fingerprint, self.n = dict(fingerprint), n_samples
        self.entries: dict[str, dict] = {}
        self._fds: dict[str, int] = {}

    # -- state -------------------------------------------------------------------------------
    def stale_reason(self) -> str | None:
        """``None`` if a complete cache for this fingerprint is on disk, else why it is not usable."""
        meta_path = self.directory / META
        if not meta_path.exists():
            return "no cache there yet"
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as exc:
            return f"its {META} is unreadable ({exc})"
        if meta.get("version") != VERSION:
            return f"it was written by cache format {meta.get('version')}, this is {VERSION}"
        theirs = meta.get("fingerprint", {})
        differ = [key for key in self.fingerprint if theirs.get(key) != self.fingerprint[key]]
        if differ:
            return "it was built for another " + " and ".join(differ)
        if meta.get("n_samples") != self.n:
            return f"it holds {meta.get('n_samples')} samples, the calibration set has {self.n}"
        for name, entry in meta["entries"].items():
            path = self.directory / entry["file"]
            expected = self.n * entry["row_bytes"]
            if not path.exists() or path.stat().st_size != expected:
                return f"the file of {name!r} is missing or truncated"
        self.entries = meta["entries"]
        return None

    # -- writing -----------------------------------------------------------------------------
    def build(self, batches: Iterable[dict[str, torch.Tensor]], estimate_bytes: int) -> None:
        """Write every batch of targets (in calibration order); on any failure remove what was written."""
        self._check_space(estimate_bytes)
        self.clear()
        self.entries = {}
        self.directory.mkdir(parents=True, exist_ok=True)
        handles: dict[str, BinaryIO] = {}
        written = 0
        try:
            for outputs in batches:
                for name, out in outputs.items():
                    if name not in handles:
                        # logits stay fp32 as in the memory cache; a block leaving fp16's range too
                        wide = name == LOGITS or bool(out.abs().max() > FP16_MAX)
                        self.entries[name] = self._entry(len(self.entries), out, wide)
                        handles[name] = open(self.directory / self.entries[name]["file"], "wb")  # noqa: SIM115
                    elif self.entries[name]["dtype"] == "float16" and bool(out.abs().max() > FP16_MAX):
                        handles[name] = self._widen(name, handles[name], written)
                    dtype = np.float16 if self.entries[name]["dtype"] == "float16" else np.float32
                    handles[name].write(out.detach().to("cpu", torch.float32).numpy().astype(dtype).tobytes())
                written += next(iter(outputs.values())).shape[0]
            for handle in handles.values():
                handle.close()
            if written != self.n:
                raise TargetCacheError(f"wrote {written} target rows for {self.n} calibration samples")
            meta = {"version": VERSION, "fingerprint": self.fingerprint, "n_samples": self.n, "entries": self.entries}
            tmp = self.directory / (META + ".tmp")
            tmp.write_text(json.dumps(meta, indent=1))
            tmp.replace(self.directory / META)  # the cache counts as complete only from here on
        except OSError as exc:
            _close_quietly(handles.values())
            self.clear()
            raise TargetCacheError(
                f"writing the dense-target cache to {self.directory} failed: {exc.strerror or exc} "
                f"(it needs about {estimate_bytes / 1024**3:.2f} GiB); the partial files were removed. "
                "Free space there, pass another HealConfig.cache_dir, or use targets='online'"
            ) from exc
        except BaseException:
            _close_quietly(handles.values())
            self.clear()
            raise

    def _entry(self, index: int, out: torch.Tensor, wide: bool) -> dict:
        width = 4 if wide else 2
        return {"file": _file(index), "shape": list(out.shape[1:]), "dtype": "float32" if wide else "float16",
                "row_bytes": int(np.prod(out.shape[1:], dtype=np.int64)) * width}

    def _widen(self, name: str, handle: BinaryIO, rows: int) -> BinaryIO:
        """Rewrite ``name``'s file as fp32 when a later batch leaves the fp16 range."""
        handle.close()
        path = self.directory / self.entries[name]["file"]
        old = np.fromfile(path, dtype=np.float16)
        self.entries[name].update(dtype="float32", row_bytes=self.entries[name]["row_bytes"] * 2)
        old.astype(np.float32).tofile(path)
        assert old.size * 4 == rows * self.entries[name]["row_bytes"]
        return open(path, "ab")  # noqa: SIM115

    def _check_space(self, estimate_bytes: int) -> None:
        free = free_bytes(self.directory) + self._own_bytes()
        if estimate_bytes > free:
            raise TargetCacheError(
                f"the dense-target cache needs about {estimate_bytes / 1024**3:.2f} GiB but {self.directory} has "
                f"{free / 1024**3:.2f} GiB free; pass another HealConfig.cache_dir or use targets='online'"
            )

    def _own_bytes(self) -> int:
        if not self.directory.exists():
            return 0
        return sum(p.stat().st_size for p in self.directory.glob("target_*.bin"))

    def clear(self) -> None:
        """Remove this cache's files (only files it would write; the directory itself stays)."""
        self.close()
        if self.directory.exists():
            for path in list(self.directory.glob("target_*.bin")) + [self.directory / META]:
                path.unlink(missing_ok=True)

    # -- reading -----------------------------------------------------------------------------
    def read(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows ``idx`` of every entry, as CPU tensors of the stored dtype."""
        out = {}
        rows = idx.tolist()
        for name, entry in self.entries.items():
            fd = self._fds.get(name)
            if fd is None:
                fd = self._fds[name] = os.open(self.directory / entry["file"], os.O_RDONLY)
            dtype = np.float16 if entry["dtype"] == "float16" else np.float32
            buf = np.empty((len(rows), *entry["shape"]), dtype=dtype)
            size = entry["row_bytes"]
            view = buf.reshape(-1).view(np.uint8).data  # a memoryview of buf's bytes
            for j, i in enumerate(rows):
                if os.preadv(fd, [view[j * size : (j + 1) * size]], i * size) != size:
                    raise TargetCacheError(
                        f"the dense-target cache file {entry['file']} in {self.directory} is truncated; "
                        "delete the directory (it is rebuilt on the next heal)"
                    )
            out[name] = torch.from_numpy(buf)
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
