"""``strategy="sequential"``: heal one block at a time.

Each block heals like a small model of its own (``BlockCall``): its inputs are captured once for
every calibration sample, its dense target is the dense block's output on the dense model's inputs
to it, and everything a heal does (held-out judgement and the best state kept, the recipe probe,
warm starts, per-epoch checkpoints, the storage rules for targets and inputs) applies to it. Only
that block trains, so gradients and AdamW state exist for one block at a time. Its healed outputs
become the next block's inputs (``sequential_inputs="pruned"``, the default) or the dense model's
inputs are used throughout (``"dense"``). Where something runs between two blocks (a stage's
downsampling), the next block's inputs are captured by running the model up to it.

The whole model is judged on the held-out samples before and after, like a joint heal: if the
healed blocks together leave the model's blocks or final output further from the dense model's,
the pruned weights come back unchanged (``if_worse="restore"``).
"""

from __future__ import annotations

import math
import time
import warnings
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from starfish_plugin.base.model_io import attention_mask, call_model, kv_cache_off, main_output
from starfish_plugin.config import HealConfig
from starfish_plugin.core.best_state import BestState
from starfish_plugin.core.block_inputs import (
    BlockCall,
    CapturedInputs,
    capture_inputs,
    chained,
    run_block,
)
from starfish_plugin.core.blocks import OUTPUT_BLOCK, BlockChoice
from starfish_plugin.core.heal import HealRun
from starfish_plugin.core.holdout import HeldOutJudge, HeldOutScore, judged_facts
from starfish_plugin.core.losses import HealLoss
from starfish_plugin.core.masks import read_masks
from starfish_plugin.core.modes import eval_mode
from starfish_plugin.core.offload import DiskBlocks
from starfish_plugin.core.plan import SparsityPlan
from starfish_plugin.core.recipe import apply_warm_start
from starfish_plugin.core.trainable import trainable_parameters
from starfish_plugin.core.validation import same_output_shape
from starfish_plugin.data.calibration import load_calibration
from starfish_plugin.errors import BlockError, ConfigError, HealingWarning
from starfish_plugin.report import HealReport

BLOCK_LOSSES = ("cosine", "mse")


class _BlockHooks:
    """The hooks a block's heal calls: progress goes on to the plugins; the whole heal's start, end
    and failure are the outer heal's to announce, once, with the whole model."""

    def __init__(self, hooks: Any) -> None:
        self.hooks = hooks

    def starfish_heal_started(self, **_kwargs: Any) -> None:
        pass

    def starfish_heal_finished(self, **_kwargs: Any) -> None:
        pass

    def starfish_heal_failed(self, **_kwargs: Any) -> None:
        pass

    def starfish_step_ended(self, **kwargs: Any) -> None:
        self.hooks.starfish_step_ended(**kwargs)

    def starfish_epoch_ended(self, **kwargs: Any) -> None:
        self.hooks.starfish_epoch_ended(**kwargs)

    def starfish_write_back(self, **kwargs: Any) -> Any:
        return self.hooks.starfish_write_back(**kwargs)


def check_sequential(config: HealConfig, run: HealRun) -> None:
    """Refuse what block-by-block healing cannot do, before anything is touched."""
    terms = config.loss_terms()
    other = sorted(set(terms) - set(BLOCK_LOSSES))
    if other:
        raise ConfigError(
            f"strategy='sequential' aligns each block's output on its own, but loss term(s) {other} need the whole "
            f"model's output; use loss='cosine' (or 'mse') with it, or strategy='joint'"
        )
    if run.dist.active:
        raise ConfigError(
            "strategy='sequential' runs in one process; under torchrun use strategy='joint' (DDP) or heal in "
            "one process"
        )
    if OUTPUT_BLOCK in run.choice.names:
        raise BlockError(
            f"strategy='sequential' heals the blocks one by one and cannot align {OUTPUT_BLOCK!r} as a block of "
            "its own; leave it out of HealConfig.blocks, or use strategy='joint'"
        )


def _sub_plan(plan: SparsityPlan, block: nn.Module, prefix: str) -> SparsityPlan:
    """The entries of ``plan`` whose tensor lives in ``block``, named as in its ``BlockCall``."""
    inside = {id(p) for p in block.parameters()}
    entries = [e for e in plan if id(e.parameter) in inside]
    def inside_block(record: dict[str, Any]) -> dict[str, Any]:
        return {"block." + k[len(prefix) + 1:]: v for k, v in record.items() if k.startswith(prefix + ".")}

    return SparsityPlan(entries, plan.adapter, plan.structural, [], inside_block(plan.kept_out_channels),
                        inside_block(plan.original_out_channels), plan.hint)


@dataclass
class BlockRun(HealRun):
    """One part of a sequential heal: a block (the model is a ``BlockCall`` around it) or the pruned
    tensors outside every block; the plan is that part's share of the model's. The model's own
    masks are written back and read again once, by the sequential heal, at the end."""

    warm_blocks: list[str] = field(default_factory=lambda: ["block"])  # what a warm start solves block by block

    def write_back(self) -> SparsityPlan:
        self.hooks.starfish_write_back(model=self.pruned, plan=self.plan)  # refresh derived attributes
        return self.plan

    def _apply_warm_start(self, kind: str, samples: int | None = None) -> tuple[str, int]:
        return apply_warm_start(kind, self.plan, self.pruned, self.dense, self.data, self.config, self.device,
                                self.warm_blocks, samples)


@dataclass
class BlockResult:
    """One block's heal, as the outer report lists it."""

    block: str
    trained: bool
    inputs: str  # "carried" (the previous block's output) or "captured" (the model ran up to it)
    report: HealReport | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"block": self.block, "trained": self.trained, "inputs": self.inputs,
                               "seconds": round(self.seconds, 2)}
        if self.report is not None:
            r = self.report
            out.update(held_out_before=r.held_out_before, held_out_after=r.held_out_after,
                       returned_state=r.returned_state, epochs=len(r.epoch_losses),
                       recipe_applied=r.recipe_applied, resumed_after_epoch=r.resumed_after_epoch)
        return out


@dataclass
class SequentialHeal:
    """The block loop around a prepared ``HealRun`` (models checked, masks read, blocks chosen,
    calibration loaded); ``execute()`` heals and returns the report of the whole heal."""

    run: HealRun
    results: list[BlockResult] = field(default_factory=list)
    offload: DiskBlocks | None = None  # the dense model's blocks on disk (offload="disk")

    def execute(self) -> HealReport:
        run, config = self.run, self.run.config
        check_sequential(config, run)
        run._check_data()  # the held-out split the whole model is judged on
        run.params = trainable_parameters(run.pruned, run.plan, config.trainable, run.notes)
        mask_snapshot = run.plan.snapshot()
        blocks = list(run.choice.names)
        outside = self._outside_blocks(blocks)
        with ExitStack() as dense_files:  # the dense model whole again before its masks are read back
            if config.offload == "disk":
                self.offload = dense_files.enter_context(DiskBlocks(run.dense, blocks, config.cache_dir))
                size = self.offload.bytes_offloaded / 2**20
                run.notes.append(f"the dense model's blocks offloaded to disk ({size:.0f} MiB), each mapped back only "
                                 "while it runs (offload='disk')")
            self._heal(blocks, outside)
            run.hand_back()  # with the old plan, dropped before the masks are read again (one copy at a time)
            run.plan = SparsityPlan([], run.plan.adapter, run.plan.structural)
        reread = read_masks(run.hooks, run.pruned, run.dense)
        run.plan = reread  # the model as returned: its counts are the report's (the same when the masks held)
        run.facts.update(strategy="sequential", sequential_blocks=[r.to_dict() for r in self.results])
        run.epochs_run = config.epochs
        run.steps_per_epoch = sum(r.report.steps for r in self.results if r.report is not None) // max(1, config.epochs)
        run.blocks = blocks
        report = run.build_report(None, None, reread, mask_snapshot)
        run.hooks.starfish_heal_finished(model=run.pruned, report=report, config=config)
        return report

    def _heal(self, blocks: list[str], outside: list[str]) -> None:
        run, config = self.run, self.run.config
        budget = 0 if config.offload == "disk" else config.target_memory_budget
        with ExitStack() as stack, eval_mode(run.dense), eval_mode(run.pruned), kv_cache_off(run.pruned, run.dense):
            judge = self._judge(blocks)
            start = judge.score() if judge is not None else None
            run.before = start.block_cosine if start is not None else {}
            kept = run._kept_tensors()
            backup = BestState(kept, budget, config.cache_dir)  # on disk when it outgrows the budget
            stack.callback(backup.close)
            backup.keep("start")
            run.hooks.starfish_heal_started(model=run.pruned, plan=run.plan, config=config,
                                            total_steps=len(blocks) * self._steps_per_block() * config.epochs)
            began = time.perf_counter()
            try:
                self._heal_blocks(blocks)
                if outside:
                    self._heal_rest(blocks)
            except BaseException as exc:
                if config.restore_on_error:
                    backup.put_back()
                run.hooks.starfish_write_back(model=run.pruned, plan=run.plan)
                run.hooks.starfish_heal_failed(model=run.pruned, error=exc, config=config)
                raise
            run.train_seconds = time.perf_counter() - began
            end = judge.score() if judge is not None else None
            self._settle(start, end, backup)

    def _hold(self, *blocks: str) -> ExitStack:
        """The offloaded dense ``blocks`` kept in for the ``with`` (nothing without offload)."""
        stack = ExitStack()
        if self.offload is not None:
            for name in blocks:
                stack.enter_context(self.offload.hold(name))
        return stack

    # -- before -------------------------------------------------------------------------------------
    def _outside_blocks(self, blocks: list[str]) -> list[str]:
        run = self.run
        inside = {id(p) for b in blocks for p in run.pruned.get_submodule(b).parameters()}
        return [e.name for e in run.plan if id(e.parameter) not in inside and not bool(e.mask.all())]

    def _steps_per_block(self) -> int:
        return math.ceil(len(self.run.data) / self.run.config.batch_size)

    def _judge(self, blocks: list[str]) -> HeldOutJudge | None:
        """The whole model judged on the held-out samples (as a joint heal is)."""
        run = self.run
        if run.held is None:
            return None
        loss = HealLoss(run.config.loss_terms(), blocks, run.config.cosine_reduction, run.config.kl_temperature)
        x = run.held.head(1).to(run.device)
        with torch.no_grad():
            comparable = same_output_shape(run.pruned, main_output(call_model(run.dense, x)), x)
        return HeldOutJudge(run.pruned, run.plan, run.dense, run.held, loss, run.device, run.config.batch_size,
                            run.dist, {}, comparable)

    # -- the block loop -------------------------------------------------------------------------------
    def _heal_blocks(self, blocks: list[str]) -> None:
        run, config = self.run, self.run.config
        data, device, batch = run.loaded, run.device, config.batch_size
        probe = data.head(min(batch, len(data))).to(device)
        links = chained(run.dense, blocks, probe)
        mask = _attention_masks(data)
        pruned_in: CapturedInputs | None = None
        dense_in: CapturedInputs | None = None
        for i, name in enumerate(blocks):
            with self._hold(name):  # an offloaded dense block stays in while it heals and carries on
                began = time.perf_counter()
                how = "carried"
                if not links[i] or pruned_in is None or dense_in is None:
                    dense_in = capture_inputs(run.dense, name, data, batch, device)
                    pruned_in = capture_inputs(run.pruned, name, data, batch, device) if (
                        config.sequential_inputs == "pruned") else dense_in
                    how = "captured"
                dense_call = BlockCall(run.dense.get_submodule(name), dense_in, "d_", device)
                prefix = "p_" if config.sequential_inputs == "pruned" else "d_"
                pruned_call = BlockCall(run.pruned.get_submodule(name), pruned_in, prefix, device)
                fields = {**dense_in.fields("d_"), **(pruned_in.fields("p_") if prefix == "p_" else {}), **mask}
                sub = _sub_plan(run.plan, pruned_call.block, name)
                result = BlockResult(name, trained=bool(sub.entries), inputs=how)
                if sub.entries or config.trainable == "all":
                    result.trained = True
                    result.report = self._heal_one(i, name, pruned_call, dense_call, sub, fields)
                result.seconds = time.perf_counter() - began
                self.results.append(result)
                if i + 1 < len(blocks):  # carry both models' outputs on to the next block
                    dense_out = run_block(dense_call, dense_in.fields("d_"), batch, device)
                    dense_next = dense_in.with_hidden(dense_out)
                    if prefix == "p_":
                        pruned_out = run_block(pruned_call, pruned_in.fields("p_"), batch, device)
                        pruned_in = pruned_in.with_hidden(pruned_out)
                    else:
                        pruned_in = dense_next
                    dense_in = dense_next

    def _heal_one(self, i: int, name: str, pruned_call: BlockCall, dense_call: BlockCall, plan: SparsityPlan,
                  fields: dict[str, torch.Tensor]) -> HealReport:
        """Heal one block as a model of its own (a ``HealRun`` on its ``BlockCall``)."""
        run, config = self.run, self.run.config
        sub_dir = f"block{i:03d}"
        inner = config.replace(
            strategy="joint", blocks=[OUTPUT_BLOCK], align_output="never",
            checkpoint_dir=str(Path(config.checkpoint_dir) / sub_dir) if config.checkpoint_dir else None,
            cache_dir=str(Path(config.cache_dir) / sub_dir) if config.cache_dir else None,
        )
        # every sample in the model's order: the block's heal holds out the same rows (same count, same seed)
        data = load_calibration([fields], config.inputs == "disk", inner.cache_dir, None, model=dense_call)
        loss_fn = HealLoss(inner.loss_terms(), [OUTPUT_BLOCK], inner.cosine_reduction, inner.kl_temperature,
                           inner.block_weighting)
        block_run = BlockRun(_BlockHooks(run.hooks), pruned_call, dense_call, inner, run.device, plan,
                             BlockChoice([OUTPUT_BLOCK], f"block {name} (strategy='sequential')"), loss_fn, run.dist,
                             data, time.perf_counter(), data)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*holds a finished heal.*", category=HealingWarning)
                report = block_run.run()
        finally:
            data.close()
        run.notes.extend(f"block {name}: {note}" for note in report.notes if "healing did not improve" in note)
        return report

    def _heal_rest(self, blocks: list[str]) -> None:
        """The pruned tensors outside every block (a stem, a stage's downsampling, a classifier head),
        healed last with the blocks frozen: a joint heal of those tensors only, every block's loss
        and (where no block reaches them) the final output's training them, judged like any heal."""
        run, config = self.run, self.run.config
        began = time.perf_counter()
        names = set(self._outside_blocks(blocks))
        outside = [e for e in run.plan if e.name in names]
        plan = SparsityPlan(outside, run.plan.adapter, run.plan.structural, [], run.plan.kept_out_channels,
                            run.plan.original_out_channels, run.plan.hint)
        inner = config.replace(
            strategy="joint", trainable="pruned",
            checkpoint_dir=str(Path(config.checkpoint_dir) / "rest") if config.checkpoint_dir else None,
            cache_dir=str(Path(config.cache_dir) / "rest") if config.cache_dir else None,
        )
        loss_fn = HealLoss(inner.loss_terms(), blocks, inner.cosine_reduction, inner.kl_temperature,
                           inner.block_weighting)
        rest = BlockRun(_BlockHooks(run.hooks), run.pruned, run.dense, inner, run.device, plan, run.choice, loss_fn,
                        run.dist, run.loaded, time.perf_counter(), run.loaded, warm_blocks=blocks)
        with warnings.catch_warnings(), self._hold(*blocks):  # the whole model runs at every step here
            warnings.filterwarnings("ignore", message=".*holds a finished heal.*", category=HealingWarning)
            report = rest.run()
        run.notes.append(f"{len(outside)} pruned tensor(s) outside the blocks healed last, the blocks frozen: "
                         f"{[e.name for e in outside][:5]}{' ...' if len(outside) > 5 else ''}")
        self.results.append(BlockResult("(outside the blocks)", True, "the whole model", report,
                                        time.perf_counter() - began))

    # -- after ----------------------------------------------------------------------------------------
    def _settle(self, start: HeldOutScore | None, end: HeldOutScore | None, backup: BestState) -> None:
        run, config = self.run, self.run.config
        if start is None or end is None:
            run.after = {}
            return
        history = [("start", start), ("sequential", end)]
        returned = "sequential"
        if not end.improves_on(start) and config.if_worse == "restore":
            backup.put_back()
            run.plan.refresh()
            returned = "start"
            run.facts["worse_restored"] = True
            run.notes.append(
                f"the healed blocks together did not beat the pruned model on the {start.samples} held-out samples "
                f"(objective {start.objective:.5f} -> {end.objective:.5f}, final-output cosine "
                f"{start.output_cosine} -> {end.output_cosine}): its weights were put back unchanged"
            )
        elif not end.improves_on(start):
            run.facts["healing_worsened"] = True
            message = (f"sequential healing did not improve the held-out score (objective {start.objective:.5f} -> "
                       f"{end.objective:.5f}); the last weights stay (if_worse='warn')")
            warnings.warn(message, HealingWarning, stacklevel=4)
            run.notes.append(message)
        final = start if returned == "start" else end
        run.after = final.block_cosine
        run.facts.update(judged_facts(start, final, returned, history))


def _attention_masks(data: Any) -> dict[str, torch.Tensor]:
    """The calibration set's ``[N, T]`` attention mask, if any: the block losses leave padding out."""
    mask = attention_mask(data.inputs) if hasattr(data.inputs, "kwargs") else None
    return {"attention_mask": mask} if isinstance(mask, torch.Tensor) else {}
