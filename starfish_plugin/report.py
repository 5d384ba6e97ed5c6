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
            its dense target on the judged samples (``judged_on``), for the pruned model and for
            the state returned.
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
        warm_start_changed: tensors the warm start changed (rescaled or solved).
        judged_on: ``"held-out"`` (samples split off the calibration set, never trained on),
            ``"training samples"`` (``holdout=0`` or a set too small to split) or ``""`` (no judgement).
        held_out_samples: samples every state was judged on.
        held_out_before / held_out_after: the healing objective there (lower is better) for the
            pruned model and for the returned one; ``output_cosine_before`` / ``_after``: the
            cosine of the final output to the dense model's (``None`` if not comparable).
        held_out_history: every judged state in order: ``{stage, objective, mean_cosine, output_cosine}``.
        returned_state: the state left in the model: ``"start"`` (the pruned weights, unchanged),
            ``"warm start"`` or ``"epoch N"``.
        stopped_early_after: the epoch after which ``patience`` stopped the heal (0: it did not).
        diverged_in_epoch: the epoch whose loss (or held-out score) became NaN/Inf; the heal
            stopped there and returned its best judged state (0: it did not diverge).
        healing_worsened: the last state was worse than the start (``if_worse="warn"`` keeps it and
            warns).
        worse_restored: nothing beat the start, so the pruned weights were put back bit for bit.
        recipe_applied: what ``recipe="auto"`` chose (``""``: the config as given).
        recipe_probe: the probe's candidates, their held-out scores, its choice and cost.
        parameters_dense, parameters_pruned: parameter counts of both models (they differ when
            pruning removed structures, e.g. Torch-Pruning).
        macs_dense, macs_pruned: multiply-accumulates of their Linear/Conv layers per sample
            (structural pruning only; 0 otherwise, where zeros save no dense compute).
        strategy: ``"joint"`` or ``"sequential"`` (``HealConfig.strategy``).
        sequential_blocks: under ``"sequential"``, each block's own heal in order: ``{block,
            trained, inputs ("carried": the previous block's output; "captured": the model ran up to
            it), seconds, held_out_before, held_out_after, returned_state, epochs, recipe_applied,
            resumed_after_epoch}``.
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
    warm_start_changed: int = 0
    judged_on: str = ""
    held_out_samples: int = 0
    held_out_before: float = float("nan")
    held_out_after: float = float("nan")
    output_cosine_before: float | None = None
    output_cosine_after: float | None = None
    held_out_history: list[dict[str, Any]] = field(default_factory=list)
    returned_state: str = ""
    stopped_early_after: int = 0
    diverged_in_epoch: int = 0
    healing_worsened: bool = False
    worse_restored: bool = False
    recipe_applied: str = ""
    recipe_probe: dict[str, Any] = field(default_factory=dict)
    parameters_dense: int = 0
    parameters_pruned: int = 0
    macs_dense: int = 0
    macs_pruned: int = 0
    strategy: str = "joint"
    sequential_blocks: list[dict[str, Any]] = field(default_factory=list)
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
        if self.strategy == "sequential":
            parts = [b for b in self.sequential_blocks if b.get("returned_state")]
            better = sum(b["held_out_after"] < b["held_out_before"] for b in parts)
            carried = sum(b["inputs"] == "carried" for b in self.sequential_blocks)
            loss = (f"sequential: {len(self.sequential_blocks)} parts healed one at a time ({carried} fed the "
                    f"previous block's healed output); held-out objective lower in {better} of {len(parts)}, "
                    f"{sum(b['returned_state'] == 'start' for b in parts)} returned unchanged")
        elif len(self.epoch_losses) > 1:
            first, last, n = self.epoch_losses[0], self.epoch_losses[-1], len(self.epoch_losses)
            loss = f"loss {first:.4f} -> {last:.4f} over {n} epochs"
        else:
            loss = f"loss {self.epoch_losses[0]:.4f} (1 epoch)" if self.epoch_losses else "no epochs"
        lines = [
            f"healed {self.adapter} model: {shape}, {len(self.blocks)} blocks ({self.block_rule or 'given'}), "
            f"loss={self.loss}, {self.steps} steps on {self.n_samples} samples",
            loss,
            f"mean block cosine to the dense model {self.mean_cosine_before:.4f} -> {self.mean_cosine_after:.4f}"
            + (f" ({self.judged_on} samples)" if self.judged_on else ""),
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
            probe = self.recipe_probe
            cost = f" (probe {probe['seconds']:.1f} s)" if probe else ""
            lines.append(self.recipe_applied + cost)
        if self.judged_on:
            output = ""
            if self.output_cosine_before is not None and self.output_cosine_after is not None:
                output = f", final-output cosine {self.output_cosine_before:.4f} -> {self.output_cosine_after:.4f}"
            lines.append(f"judged on {self.held_out_samples} {self.judged_on} samples: objective "
                         f"{self.held_out_before:.5f} -> {self.held_out_after:.5f}{output}; returned: "
                         f"{self.returned_state}" + (f" (stopped early after epoch {self.stopped_early_after})"
                                                     if self.stopped_early_after else ""))
        if self.worse_restored:
            lines.append("nothing beat the pruned model on the judged samples: its weights were put back unchanged")
        elif self.healing_worsened:
            lines.append("WARNING: the last state is worse than the pruned model on the judged samples (see the notes)")
        return "\n".join(lines)


def _count(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return str(n)
