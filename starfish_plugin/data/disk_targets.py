"""Disk-backed dense targets: fp16 block outputs written once to files, read per batch.

One file per block (and one for the logits), rows in calibration order. Rows are read with
``os.preadv`` into a fresh buffer rather than through a memory map, because mapped pages count
toward the process's resident memory; this way RAM stays flat as the calibration set grows and the
kernel's page cache (reclaimable) does the caching.

Concurrent heals may share one ``cache_dir``. Each cache lives in its own subdirectory named by
a hash of its fingerprint (dense model, calibration inputs, block selection, sample count), so
heals of different data never touch each other's files. A cache is built in a private directory
and published by one atomic rename, after which it is never modified; its ``meta.json`` records
a digest of every file, checked against the files' contents before reuse. A heal holds a shared
lock on the cache it reads; unused caches of other fingerprints are removed (one cache per
directory when heals run one at a time), never one that another heal holds.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from starfish_plugin.errors import TargetCacheError
from starfish_plugin.runtime import locks

VERSION = 2
META = "meta.json"
LOCK = ".lock"
PREFIX = "targets-"
BUILD_GRACE_SECONDS = 600  # a build this young is never removed as abandoned
FILE_NAME = re.compile(r"target_\d{3}\.bin")
FP16_MAX = float(torch.finfo(torch.float16).max)
LOGITS = "__logits__"  # the key under which starfish_plugin.data.targets stores logits


def _age(path: Path) -> float:
    """Seconds since ``path`` was last modified (0 if it is gone)."""
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


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


def file_digest(path: Path) -> str:
    """BLAKE2b of a file's bytes, read in 8 MiB chunks."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        while chunk := handle.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _remove_tree(directory: Path, root: Path) -> None:
    """Rename ``directory`` out of the way (atomic: a reader sees it whole or not at all), then delete it."""
    trash = Path(tempfile.mkdtemp(prefix=".trash-", dir=root))
    try:
        directory.rename(trash / "cache")
    except OSError:
        pass  # gone already
    shutil.rmtree(trash, ignore_errors=True)


class DiskTargetCache:
    """The dense targets of one calibration set, in a subdirectory of ``root`` named by their
    fingerprint."""

    def __init__(self, root: str | os.PathLike, fingerprint: dict[str, str], n_samples: int) -> None:
        self.root = Path(root)
        self.fingerprint, self.n = dict(fingerprint), n_samples
        key = hashlib.sha256(json.dumps([VERSION, self.fingerprint, n_samples], sort_keys=True).encode())
        self.directory = self.root / (PREFIX + key.hexdigest()[:16])
        self.entries: dict[str, dict] = {}
        self._fds: dict[str, int] = {}
        self._lock: int | None = None  # shared lock on the cache being read (or built)

    # -- state -------------------------------------------------------------------------------
    def open_existing(self) -> str | None:
        """Take a shared lock on a complete, intact cache for this fingerprint and open its files;
        ``None`` if that worked, else why there is no usable cache."""
        if not (self.directory / META).exists():
            return self._why_others_differ() or "no cache there yet"
        fd = locks.shared(self.directory / LOCK)
        if fd is None:
            return "no cache there yet"
        reason = self._check(self.directory)
        if reason is not None:
            os.close(fd)
            return reason
        self._lock = fd
        self._open_files()
        return None

    def _meta_problem(self, directory: Path) -> tuple[str | None, dict]:
        """Why ``directory``'s ``meta.json`` does not describe this fingerprint's cache (``None`` if
        it does), and the meta itself."""
        try:
            meta = json.loads((directory / META).read_text())
        except (OSError, ValueError) as exc:
            return f"its {META} is unreadable ({exc})", {}
        if meta.get("version") != VERSION:
            return f"it was written by cache format {meta.get('version')}, this is {VERSION}", meta
        differ = [key for key in self.fingerprint if meta.get("fingerprint", {}).get(key) != self.fingerprint[key]]
        if differ:
            return "it was built for another " + " and ".join(differ), meta
        if meta.get("n_samples") != self.n:
            return f"it holds {meta.get('n_samples')} samples, the calibration set has {self.n}", meta
        return None, meta

    def _check(self, directory: Path) -> str | None:
        """Why the cache in ``directory`` is not usable for this fingerprint (its meta, its files'
        names, sizes and digests), or ``None``, with ``self.entries`` then set from it."""
        problem, meta = self._meta_problem(directory)
        if problem is not None:
            return problem
        entries = meta.get("entries", {})
        names = [entry.get("file", "") for entry in entries.values()]
        if not all(isinstance(n, str) and FILE_NAME.fullmatch(n) for n in names) or len(set(names)) != len(names):
            return f"its {META} names files outside the cache"
        for name, entry in entries.items():
            path = directory / entry["file"]
            if not path.exists() or path.stat().st_size != self.n * entry["row_bytes"]:
                return f"the file of {name!r} is missing or truncated"
            if file_digest(path) != entry.get("digest"):
                return f"the file of {name!r} does not match the digest in its {META}"
        self.entries = entries
        return None

    def _why_others_differ(self) -> str | None:
        """For the report: why the cache(s) of another fingerprint in ``root`` do not fit."""
        for other in sorted(self.root.glob(PREFIX + "*")):
            if (other / META).exists():
                reason, _ = self._meta_problem(other)
                if reason is not None:
                    return reason
        return None

    # -- writing -----------------------------------------------------------------------------
    def build(self, batches: Iterable[dict[str, torch.Tensor]], estimate_bytes: int) -> None:
        """Write every batch of targets (in calibration order) into a private directory and publish
        it; on any failure remove what was written. Unused caches of other fingerprints go first."""
        self.evict_unused()
        self._check_space(estimate_bytes)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            private = Path(tempfile.mkdtemp(prefix=".building-", dir=self.root))
        except OSError as exc:
            raise self._write_error(exc, estimate_bytes, "") from exc
        lock = locks.try_exclusive(private / LOCK)  # readers and evictors keep off while it builds
        handles: dict[str, BinaryIO] = {}
        try:
            written = self._write(private, batches, handles)
            if written != self.n:
                raise TargetCacheError(f"wrote {written} target rows for {self.n} calibration samples")
            for entry in self.entries.values():
                entry["digest"] = file_digest(private / entry["file"])
            meta = {"version": VERSION, "fingerprint": self.fingerprint, "n_samples": self.n, "entries": self.entries}
            (private / META).write_text(json.dumps(meta, indent=1))
            self._publish(private, lock)
        except OSError as exc:
            _close_quietly(handles.values())
            self._abandon(private, lock)
            raise self._write_error(exc, estimate_bytes, "; the partial files were removed") from exc
        except BaseException:
            _close_quietly(handles.values())
            self._abandon(private, lock)
            raise

    def _write(self, directory: Path, batches: Iterable[dict[str, torch.Tensor]], handles: dict[str, BinaryIO]) -> int:
        self.entries = {}
        written = 0
        for outputs in batches:
            for name, out in outputs.items():
                if name not in handles:
                    # logits stay fp32 as in the memory cache; a block leaving fp16's range too
                    wide = name == LOGITS or bool(out.abs().max() > FP16_MAX)
                    self.entries[name] = self._entry(len(self.entries), out, wide)
                    handles[name] = open(directory / self.entries[name]["file"], "wb")  # noqa: SIM115
                elif self.entries[name]["dtype"] == "float16" and bool(out.abs().max() > FP16_MAX):
                    handles[name] = self._widen(directory, name, handles[name], written)
                dtype = np.float16 if self.entries[name]["dtype"] == "float16" else np.float32
                handles[name].write(out.detach().to("cpu", torch.float32).numpy().astype(dtype).tobytes())
            written += next(iter(outputs.values())).shape[0]
        for handle in handles.values():
            handle.close()
        return written

    def _publish(self, private: Path, lock: int | None) -> None:
        """Rename ``private`` to this fingerprint's directory (atomic); if another heal published the
        same cache first, use theirs; if what is there is broken, replace it."""
        for _ in range(2):
            try:
                private.rename(self.directory)
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                if self.open_existing() is None:  # the same cache, published by a concurrent heal
                    self._abandon(private, lock)
                    return
                _remove_tree(self.directory, self.root)
                continue
            if lock is not None and locks.fcntl is not None:
                locks.fcntl.flock(lock, locks.fcntl.LOCK_SH)  # from builder to reader
            self._lock = lock
            self._open_files()
            return
        raise TargetCacheError(
            f"another heal keeps replacing the dense-target cache {self.directory}; give each heal its own cache_dir"
        )

    def _abandon(self, private: Path, lock: int | None) -> None:
        if lock is not None:
            os.close(lock)
        shutil.rmtree(private, ignore_errors=True)

    def _write_error(self, exc: OSError, estimate_bytes: int, removed: str) -> TargetCacheError:
        return TargetCacheError(
            f"writing the dense-target cache to {self.root} failed: {exc.strerror or exc} "
            f"(it needs about {estimate_bytes / 1024**3:.2f} GiB){removed}. "
            "Free space there, pass another HealConfig.cache_dir, or use targets='online'"
        )

    def _entry(self, index: int, out: torch.Tensor, wide: bool) -> dict:
        width = 4 if wide else 2
        return {"file": _file(index), "shape": list(out.shape[1:]), "dtype": "float32" if wide else "float16",
                "row_bytes": int(np.prod(out.shape[1:], dtype=np.int64)) * width}

    def _widen(self, directory: Path, name: str, handle: BinaryIO, rows: int) -> BinaryIO:
        """Rewrite ``name``'s file as fp32 when a later batch leaves the fp16 range."""
        handle.close()
        path = directory / self.entries[name]["file"]
        old = np.fromfile(path, dtype=np.float16)
        self.entries[name].update(dtype="float32", row_bytes=self.entries[name]["row_bytes"] * 2)
        old.astype(np.float32).tofile(path)
        assert old.size * 4 == rows * self.entries[name]["row_bytes"]
        return open(path, "ab")  # noqa: SIM115

    def _check_space(self, estimate_bytes: int) -> None:
        free = free_bytes(self.root)
        if estimate_bytes > free:
            raise TargetCacheError(
                f"the dense-target cache needs about {estimate_bytes / 1024**3:.2f} GiB but {self.root} has "
                f"{free / 1024**3:.2f} GiB free; pass another HealConfig.cache_dir or use targets='online'"
            )

    def evict_unused(self) -> None:
        """Remove the caches in ``root`` that are not this one and that no heal holds, and builds
        abandoned by a heal that died (unlocked, and older than ``BUILD_GRACE_SECONDS``: a builder
        creates its lock file a moment before it locks it)."""
        if not self.root.exists():
            return
        for other in list(self.root.glob(PREFIX + "*")) + list(self.root.glob(".building-*")):
            if other == self.directory and self._lock is not None:
                continue
            if other.name.startswith(".building-") and _age(other) < BUILD_GRACE_SECONDS:
                continue  # its builder may be between creating its lock file and locking it
            fd = locks.try_exclusive(other / LOCK, create=False)
            if fd is None and ((other / LOCK).exists() or other.name.startswith(".building-")):
                continue  # another heal reads or builds it (a build takes its lock right after mkdtemp)
            _remove_tree(other, self.root)
            if fd is not None:
                os.close(fd)
        for trash in self.root.glob(".trash-*"):
            shutil.rmtree(trash, ignore_errors=True)

    # -- reading -----------------------------------------------------------------------------
    def _open_files(self) -> None:
        """Open every file now: a cache removed later (it cannot be while we hold its lock) stays readable."""
        for name, entry in self.entries.items():
            self._fds[name] = os.open(self.directory / entry["file"], os.O_RDONLY)

    def read(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows ``idx`` of every entry, as CPU tensors of the stored dtype."""
        out = {}
        rows = idx.tolist()
        for name, entry in self.entries.items():
            fd = self._fds[name]
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
        """Close the files and release the lock (the cache stays on disk for reuse)."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None
