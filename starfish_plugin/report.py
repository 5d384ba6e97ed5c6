"""``HealReport``: what a heal did, what it cost, and whether the mask survived it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class HealReport:
    """The outcome of ``starfish.heal``.

    Attributes:
        epoch_losses: mean training loss of each epoch.
        block_cosine_before / block_cosine_after: mean cosine similarity of each block's output to
            its dense target on the first ``diagnostic_samples`` calibration images.
        seconds: wall-clock time of the whole call; ``train_seconds`` of the optimizer loop only.
        samples_per_second: calibration samples processed per second in the optimizer loop.
        peak_memory_bytes: peak memory and what was measured (``peak_memory_kind``).
        targets_mode / targets_reason: where the dense targets lived and why.
        mask_unchanged: the masks read back after healing equal the ones before, bit for bit.
        masked_weights_zero: every masked entry of every effective weight is exactly zero.
        block_rule: how the blocks were chosen (a discovery rule, or given by the caller).
        target_alignment: per block, ``"direct"`` or which kept channels index the dense target
            (when structural pruning narrowed the block's output).
        calibration_source: what the calibration data came as (``"Tensor"``, ``"Dataset (inputs on disk)"``).
        output_aligned: the final output was aligned as one more block (``"(output)"``).
        untrained_tensors: pruned tensors that got no training signal and stayed as pruned.
        target_cache_action: ``"built"``, ``"reused"`` or ``"rebuilt"`` for a disk cache of dense
            targets, ``""`` without one; ``target_cache_reason`` says why it was rebuilt.
        resumed_after_epoch: the epoch a resumed heal continued after (0: not resumed).
        compiled: the ``torch.compile`` mode of the training forward (``""``: eager).
        autocast: ``"bf16"`` when the pruned forward ran under bf16 autocast, else ``""``.
        world_size: processes that healed together (torchrun), 1 for one process.
        warm_start_rescaled: tensors the row-norm warm start rescaled.
        healing_worsened: the mean block cosine fell (a ``HealingWarning`` was issued).
        worse_restored: it fell and ``if_worse="restore"`` put the weights from before healing back.
        recipe_applied: what ``recipe="auto"`` changed, if anything (``""``: the config as given).
        parameters_dense, parameters_pruned: parameter counts of both models (they differ when
            pruning removed structures, e.g. Torch-Pruning).
        macs_dense, macs_pruned: multiply-accumulates of their Linear/Conv layers per sample
            (structural pruning only; 0 otherwise, where zeros save no dense compute).
        notes: the same facts and the adapters' remarks, as sentences.
    """

    loss: str
    blocks: list[str]
    epoch_losses: list[float]
    block_cosine_before: dict[str, float]
    block_cosine_after: dict[str, float]
    seconds: float
    train_seconds: float
    samples_per_second: float
    steps: int
    n_samples: int
    peak_memory_bytes: int
    peak_memory_kind: str
    targets_mode: str
    targets_reason: str
    target_cache_bytes: int
    target_cache_estimate_bytes: int
    mask_unchanged: bool
    masked_weights_zero: bool
    sparsity: float
    adapter: str
    trainable_parameters: int
    frozen_parameters: int
    device: str
    block_rule: str = ""
    target_alignment: dict[str, str] = field(default_factory=dict)
    calibration_source: str = ""
    output_aligned: bool = False
    untrained_tensors: list[str] = field(default_factory=list)
    target_cache_action: str = ""
    target_cache_reason: str = ""
    resumed_after_epoch: int = 0
    compiled: str = ""
    autocast: str = ""
    world_size: int = 1
    warm_start_rescaled: int = 0
    healing_worsened: bool = False
    worse_restored: bool = False
    recipe_applied: str = ""
    parameters_dense: int = 0
    parameters_pruned: int = 0
    macs_dense: int = 0
    macs_pruned: int = 0
    notes: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def mean_cosine_before(self) -> float:
        values = list(self.block_cosine_before.values())
        return sum(values) / len(values) if values else float("nan")

    @property
    def mean_cosine_after(self) -> float:
        values = list(self.block_cosine_after.values())
        return sum(values) / len(values) if values else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), indent=kwargs.pop("indent", 2), **kwargs)

    def summary(self) -> str:
        """A few human-readable lines."""
        if self.macs_dense:  # structures removed: the zeros-based sparsity would read 0 %
            shape = (f"structured: parameters {_count(self.parameters_dense)} -> {_count(self.parameters_pruned)}"
                     f" ({1 - self.parameters_pruned / self.parameters_dense:.1%} fewer), MACs per sample "
                     f"{_count(self.macs_dense)} -> {_count(self.macs_pruned)} "
                     f"({1 - self.macs_pruned / self.macs_dense:.1%} fewer)")
        else:
            shape = f"{self.sparsity:.1%} sparsity"
        if len(self.epoch_losses) > 1:
            first, last, n = self.epoch_losses[0], self.epoch_losses[-1], len(self.epoch_losses)
            loss = f"loss {first:.4f} -> {last:.4f} over {n} epochs"
        else:
            loss = f"loss {self.epoch_losses[0]:.4f} (1 epoch)" if self.epoch_losses else "no epochs"
        lines = [
            f"healed {self.adapter} model: {shape}, {len(self.blocks)} blocks ({self.block_rule or 'given'}), "
            f"loss={self.loss}, {self.steps} steps on {self.n_samples} samples",
            loss,
            f"mean block cosine to the dense model {self.mean_cosine_before:.4f} -> {self.mean_cosine_after:.4f}",
            f"{self.seconds:.1f} s ({self.samples_per_second:.0f} samples/s in the loop), targets: {self.targets_mode}",
            f"mask unchanged: {self.mask_unchanged}, masked weights zero: {self.masked_weights_zero}",
        ]
        epochs = self.config.get("epochs", len(self.epoch_losses))
        if self.resumed_after_epoch:
            lines.append(
                f"resumed from a checkpoint after epoch {self.resumed_after_epoch} of {epochs}"
                + (": nothing was left to train, the checkpoint's weights were returned"
                   if self.resumed_after_epoch >= epochs else "")
            )
        if self.recipe_applied:
            lines.append(self.recipe_applied)
        if self.worse_restored:
            lines.append("healing lowered the mean block cosine: the weights from before healing were kept")
        elif self.healing_worsened:
            lines.append("WARNING: healing lowered the mean block cosine (see the notes)")
        return "\n".join(lines)


def _count(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return str(n)
