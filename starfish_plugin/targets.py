"""Dense targets: block outputs of the dense model, cached in memory as fp16 or recomputed online."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from starfish_plugin.alignment import ChannelIndex, select_channels
from starfish_plugin.blocks import capture_outputs, require_outputs
from starfish_plugin.calibration import CalibrationData
from starfish_plugin.errors import NonFiniteError

LOGITS = "__logits__"
FP16_MAX = torch.finfo(torch.float16).max


@dataclass
class TargetPlan:
    """What the dense targets will cost and where they will live."""

    mode: str
    reason: str
    estimate_bytes: int
    per_sample_bytes: dict[str, int] = field(default_factory=dict)


def _check_finite(name: str, tensor: torch.Tensor) -> None:
    if not bool(torch.isfinite(tensor).all()):
        what = "logits" if name == LOGITS else f"block {name!r}"
        raise NonFiniteError(
            f"the dense model's {what} output contains NaN or Inf on the calibration inputs; "
            "check the dense model and the input normalization"
        )


def plan_targets(
    probe: dict[str, torch.Tensor], n_samples: int, mode: str, budget: int
) -> TargetPlan:
    """Estimate the cache size from one probe forward and choose memory or online storage."""
    per_sample = {}
    for name, out in probe.items():
        width = 4 if name == LOGITS else 2  # logits stay fp32, block outputs fp16
        per_sample[name] = out[0].numel() * width
    estimate = sum(per_sample.values()) * n_samples
    if mode == "memory":
        return TargetPlan("memory", "requested (targets='memory')", estimate, per_sample)
    if mode == "online":
        return TargetPlan("online", "requested (targets='online')", estimate, per_sample)
    gib = 1024**3
    if estimate <= budget:
        reason = f"auto: estimated cache {estimate / gib:.3f} GiB fits the budget of {budget / gib:.2f} GiB"
        return TargetPlan("memory", reason, estimate, per_sample)
    reason = (
        f"auto: estimated cache {estimate / gib:.3f} GiB exceeds the budget of {budget / gib:.2f} GiB, "
        "so the dense model runs online each step"
    )
    return TargetPlan("online", reason, estimate, per_sample)


@torch.no_grad()
def dense_outputs(
    dense: nn.Module,
    blocks: Sequence[str],
    x: torch.Tensor,
    need_logits: bool,
    index: ChannelIndex | None = None,
    label: str = "dense",
) -> dict[str, torch.Tensor]:
    """Block outputs of ``dense`` on ``x`` (and its logits under the key ``LOGITS`` if asked).

    With ``index``, outputs of blocks whose width was pruned keep only the surviving channels.
    """
    with capture_outputs(dense, blocks) as outputs:
        logits = dense(x)
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
        if plan.mode == "memory":
            self._fill(data, batch_size)

    @property
    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.cache.values())

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
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

    def get(self, idx: torch.Tensor, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Targets for calibration samples ``idx`` (whose inputs are ``x``, already on device)."""
        if self.plan.mode == "online":
            return self.forward(x)
        non_blocking = self.device.type == "cuda"
        return {name: t[idx].to(self.device, non_blocking=non_blocking).float() for name, t in self.cache.items()}
