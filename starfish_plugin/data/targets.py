"""Dense targets: block outputs of the dense model, cached in memory as fp16 or recomputed online."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from starfish_plugin.base.model_io import Inputs, call_model, main_output
from starfish_plugin.base.outputs import ChannelIndex, capture_outputs, require_outputs, select_channels
from starfish_plugin.data.calibration import CalibrationData
from starfish_plugin.data.disk_targets import LOGITS, DiskTargetCache, free_bytes
from starfish_plugin.errors import NonFiniteError
from starfish_plugin.runtime.fingerprint import hash_tensors, model_fingerprint, text_fingerprint

FP16_MAX = torch.finfo(torch.float16).max


@dataclass
class TargetPlan:
    """What the dense targets will cost and where they will live."""

    mode: str
    reason: str
    estimate_bytes: int
    per_sample_bytes: dict[str, int] = field(default_factory=dict)
    directory: str | None = None
    temporary: bool = False


def _check_finite(name: str, tensor: torch.Tensor) -> None:
    if not bool(torch.isfinite(tensor).all()):
        what = "logits" if name == LOGITS else f"block {name!r}"
        raise NonFiniteError(
            f"the dense model's {what} output contains NaN or Inf on the calibration inputs; "
            "check the dense model and the input normalization"
        )


def plan_targets(
    probe: dict[str, torch.Tensor], n_samples: int, mode: str, budget: int, cache_dir: str | None = None
) -> TargetPlan:
    """Estimate the cache size from one probe forward and choose memory, disk or online storage.

    ``auto`` keeps the cache in memory when it fits ``budget``; otherwise on disk (in ``cache_dir``,
    or a temporary directory removed afterwards) when the disk has room; otherwise online.
    """
    per_sample = {}
    for name, out in probe.items():
        width = 4 if name == LOGITS else 2  # logits stay fp32, block outputs fp16
        per_sample[name] = out[0].numel() * width
    estimate = sum(per_sample.values()) * n_samples
    if mode == "memory":
        return TargetPlan("memory", "requested (targets='memory')", estimate, per_sample)
    if mode == "online":
        return TargetPlan("online", "requested (targets='online')", estimate, per_sample)
    directory = Path(cache_dir) if cache_dir is not None else Path(tempfile.gettempdir())
    temporary = cache_dir is None
    where = f"a temporary directory in {directory}" if temporary else str(directory)
    if mode == "disk":
        return TargetPlan("disk", f"requested (targets='disk'), in {where}", estimate, per_sample,
                          str(directory), temporary)
    gib = 1024**3
    if estimate <= budget:
        reason = f"auto: estimated cache {estimate / gib:.3f} GiB fits the memory budget of {budget / gib:.2f} GiB"
        return TargetPlan("memory", reason, estimate, per_sample)
    over = f"auto: estimated cache {estimate / gib:.3f} GiB exceeds the memory budget of {budget / gib:.2f} GiB"
    free = free_bytes(directory)
    if estimate * 1.05 <= free:
        return TargetPlan("disk", f"{over}, so it goes on disk in {where} ({free / gib:.1f} GiB free)", estimate,
                          per_sample, str(directory), temporary)
    reason = f"{over} and {where} has only {free / gib:.2f} GiB free, so the dense model runs online each step"
    return TargetPlan("online", reason, estimate, per_sample)


@torch.no_grad()
def dense_outputs(
    dense: nn.Module,
    blocks: Sequence[str],
    x: Inputs,
    need_logits: bool,
    index: ChannelIndex | None = None,
    label: str = "dense",
) -> dict[str, torch.Tensor]:
    """Block outputs of ``dense`` on ``x`` (and its logits under the key ``LOGITS`` if asked).

    With ``index``, outputs of blocks whose width was pruned keep only the surviving channels.
    """
    with capture_outputs(dense, blocks) as outputs:
        logits = main_output(call_model(dense, x))
        require_outputs(outputs, blocks, label)
        result = {name: outputs[name] for name in blocks}
    if index:
        select_channels(result, index)
    if need_logits:
        result[LOGITS] = logits
    return result


def check_finite(outputs: dict[str, torch.Tensor]) -> None:
    """Raise ``NonFiniteError`` naming the first output holding NaN or Inf."""
    for name, tensor in outputs.items():
        _check_finite(name, tensor)


class DenseTargets:
    """Serves dense block outputs (and logits when a loss needs them) for a batch of indices."""

    def __init__(
        self,
        dense: nn.Module,
        blocks: Sequence[str],
        data: CalibrationData,
        plan: TargetPlan,
        device: torch.device,
        need_logits: bool,
        batch_size: int,
        index: ChannelIndex | None = None,
    ) -> None:
        self.dense, self.blocks, self.plan, self.device = dense, list(blocks), plan, device
        self.need_logits, self.index = need_logits, index or {}
        self.cache: dict[str, torch.Tensor] = {}
        self.fp32_blocks: list[str] = []
        self.disk: DiskTargetCache | None = None
        self.note = ""
        self.cache_action = ""  # built / reused / rebuilt, for a disk cache
        self.cache_reason = ""
        if plan.mode == "memory":
            self._fill(data, batch_size)
        elif plan.mode == "disk":
            self._open_disk(dense, data, batch_size)

    @property
    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.cache.values())

    def forward(self, x: Inputs) -> dict[str, torch.Tensor]:
        """Run the dense model on ``x``; return block outputs (and logits) at full precision."""
        return dense_outputs(self.dense, self.blocks, x, self.need_logits, self.index)

    @torch.no_grad()
    def _fill(self, data: CalibrationData, batch_size: int) -> None:
        n = len(data)
        for idx, x, _ in data.batches(batch_size):
            outs = self.forward(x.to(self.device))
            for name, out in outs.items():
                _check_finite(name, out)
                if name not in self.cache:
                    wide = name == LOGITS or bool(out.abs().max() > FP16_MAX)
                    if wide and name != LOGITS:
                        self.fp32_blocks.append(name)
                    dtype = torch.float32 if wide else torch.float16
                    self.cache[name] = torch.empty((n, *out.shape[1:]), dtype=dtype)
                elif self.cache[name].dtype == torch.float16 and bool(out.abs().max() > FP16_MAX):
                    self.cache[name] = self.cache[name].float()
                    self.fp32_blocks.append(name)
                self.cache[name][idx] = out.to("cpu", self.cache[name].dtype)

    def _open_disk(self, dense: nn.Module, data: CalibrationData, batch_size: int) -> None:
        """Reuse the disk cache if it was built for this dense model, data and block selection;
        otherwise (re)build it."""
        assert self.plan.directory is not None
        if self.plan.temporary:
            directory = Path(tempfile.mkdtemp(prefix="starfish-targets-", dir=self.plan.directory))
        else:
            directory = Path(self.plan.directory)
        # the channel index holds (dim, kept channels) per block: the dim goes into the hashed name
        kept = [(f"{name}|{dim}", channels) for name, (dim, channels) in sorted(self.index.items())]
        fingerprint = {
            "dense model": model_fingerprint(dense),
            "calibration set": data.fingerprint(),
            "block selection": text_fingerprint(self.blocks, self.need_logits, hash_tensors(kept)),
        }
        self.disk = DiskTargetCache(directory, fingerprint, len(data))
        stale = self.disk.open_existing()
        if stale is None:
            self.cache_action = "reused"
            self.note = f"dense targets: reused the disk cache in {self.disk.directory}"
        else:
            try:
                self.disk.build(self._batches(data, batch_size), self.plan.estimate_bytes)
            except BaseException:
                self.close()
                raise
            self.cache_action = "built" if stale == "no cache there yet" else "rebuilt"
            self.cache_reason = "" if self.cache_action == "built" else stale
            verb = "built" if stale == "no cache there yet" else f"rebuilt ({stale})"
            self.note = f"dense targets: {verb} the disk cache in {self.disk.directory}"
        self.disk.evict_unused()
        self.fp32_blocks = [n for n, e in self.disk.entries.items() if n != LOGITS and e["dtype"] == "float32"]

    def _batches(self, data: CalibrationData, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        for _, x, _ in data.batches(batch_size):
            outs = self.forward(x.to(self.device))
            for name, out in outs.items():
                _check_finite(name, out)
            yield outs

    def close(self) -> None:
        """Close the disk cache's files; remove it if it lives in a temporary directory."""
        if self.disk is not None:
            self.disk.close()
            if self.plan.temporary:
                shutil.rmtree(self.disk.root, ignore_errors=True)

    def get(self, idx: torch.Tensor, x: Inputs) -> dict[str, torch.Tensor]:
        """Targets for calibration samples ``idx`` (whose inputs are ``x``, already on device)."""
        if self.plan.mode == "online":
            return self.forward(x)
        non_blocking = self.device.type == "cuda"
        rows = self.disk.read(idx) if self.disk is not None else {name: t[idx] for name, t in self.cache.items()}
        if non_blocking:
            rows = {name: t.pin_memory() for name, t in rows.items()}
        return {name: t.to(self.device, non_blocking=non_blocking).float() for name, t in rows.items()}
