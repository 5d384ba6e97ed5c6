"""A STARFISH heal in phases (``HealRun``): masks fixed, surviving weights trained to align block
outputs. The plugin hooks come in as an argument: the core never imports the plugin manager."""

from __future__ import annotations

import json
import math
import resource
import time
import warnings
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from starfish_plugin.base.model_io import (
    describe_inputs,
    modules_called,
    token_ids,
)
from starfish_plugin.base.outputs import ChannelIndex, select_channels
from starfish_plugin.config import HealConfig
from starfish_plugin.core.alignment import channel_index
from starfish_plugin.core.best_state import BestState
from starfish_plugin.core.blocks import OUTPUT_BLOCK, BlockChoice, resolve_blocks
from starfish_plugin.core.costs import layer_macs, parameter_count
from starfish_plugin.core.holdout import HeldOutJudge, holdout_size, judged_facts, split_rows
from starfish_plugin.core.keep_best import KeepBest
from starfish_plugin.core.loop import Checkpointing, TrainLoop, TrainSetup, non_finite_cause
from starfish_plugin.core.losses import HealLoss
from starfish_plugin.core.masks import read_masks
from starfish_plugin.core.modes import eval_mode
from starfish_plugin.core.output_alignment import choose_output_alignment
from starfish_plugin.core.plan import SparsityPlan
from starfish_plugin.core.probe import ProbeContext, chosen_config, run_probe
from starfish_plugin.core.recipe import Candidate, apply_warm_start, auto_applies
from starfish_plugin.core.trainable import trainable_only, trainable_parameters
from starfish_plugin.core.validation import (
    check_architecture,
    check_directories,
    check_dtypes,
    check_finite_weights,
    check_input_dtype,
    check_logits,
    check_models,
    probe_forward,
    probe_structural,
    resolve_device,
    same_output_shape,
    unrelated_weights,
)
from starfish_plugin.data.calibration import CalibrationData, load_calibration
from starfish_plugin.data.targets import LOGITS, DenseTargets, check_finite, dense_outputs, plan_targets
from starfish_plugin.errors import (
    AdapterError,
    BlockError,
    CalibrationError,
    CheckpointError,
    HealingWarning,
    NonFiniteError,
)
from starfish_plugin.report import HealReport
from starfish_plugin.runtime.distributed import DistContext, dist_context
from starfish_plugin.runtime.fingerprint import model_fingerprint, weights_fingerprint
from starfish_plugin.runtime.locks import exclusive_lock
from starfish_plugin.runtime.resume import HealState, checkpoint_path, load_state, settings_of


@torch.no_grad()
def _put_back(tensors: list[torch.Tensor], backup: list[torch.Tensor]) -> None:
    """Copy the saved weights (and buffers) back in place."""
    for t, saved in zip(tensors, backup, strict=True):
        t.copy_(saved)


def _peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS"


@dataclass
class HealRun:
    """One heal, in phases: ``prepare`` (models checked, masks read, blocks chosen, calibration
    loaded), ``prepare_targets`` (probe, channel alignment, output block, dense targets),
    ``train``, ``write_back`` and ``build_report``. Nothing is modified before ``train``."""

    hooks: Any
    pruned: nn.Module
    dense: nn.Module
    config: HealConfig
    device: torch.device
    plan: SparsityPlan
    choice: BlockChoice
    loss_fn: HealLoss
    dist: DistContext
    data: CalibrationData  # the samples healing trains on (after the held-out split)
    start: float
    loaded: CalibrationData  # the whole calibration set as loaded (closed at the end)
    held: CalibrationData | None = None  # the held-out samples that judge each state
    keeper: KeepBest | None = None
    n_total: int = 0
    notes: list[str] = field(default_factory=list)
    blocks: list[str] = field(default_factory=list)
    alignment: dict[str, str] = field(default_factory=dict)
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    epoch_losses: list[float] = field(default_factory=list)
    epochs_run: int = 0
    train_seconds: float = 0.0
    steps_per_epoch: int = 0
    params: list[nn.Parameter] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)  # structured report fields gathered on the way

    @classmethod
    def prepare(
        cls, hooks: Any, pruned: nn.Module, dense: nn.Module, calibration: object, config: HealConfig
    ) -> HealRun:
        start = time.perf_counter()
        check_models(pruned, dense)
        check_dtypes(pruned, dense)
        # under strategy="fsdp" the models stay where they are and config.device is where the shards go
        device = resolve_device(pruned, dense, None if config.strategy == "fsdp" else config.device)
        plan = read_masks(hooks, pruned, dense)
        check_architecture(pruned, dense, plan)
        check_finite_weights(pruned)
        check_directories(config)
        choice = resolve_blocks(dense, pruned, config.blocks)
        loss_fn = HealLoss(
            config.loss_terms(), choice.names, config.cosine_reduction, config.kl_temperature,
            config.block_weighting,
        )
        dist = dist_context()
        shard = (dist.rank, dist.world) if dist.active else None  # on disk, each rank writes its own rows only
        data = load_calibration(calibration, config.inputs == "disk", config.cache_dir, shard, model=dense)
        run = cls(hooks, pruned, dense, config, device, plan, choice, loss_fn, dist, data, start, data)
        unrelated = unrelated_weights(pruned, dense, plan)
        if unrelated is not None:
            warnings.warn(unrelated, HealingWarning, stacklevel=4)
            run.notes.append(unrelated)
        return run

    def run(self) -> HealReport:
        self._check_data()
        self.params = trainable_parameters(self.pruned, self.plan, self.config.trainable, self.notes)
        mask_snapshot = self.plan.snapshot()
        with ExitStack() as stack, eval_mode(self.dense), eval_mode(self.pruned):
            checkpointing = self._checkpointing(stack)  # a checkpoint of another heal is refused here
            targets, target_plan = self.prepare_targets(stack)
            self.train(targets, checkpointing)
        reread = self.write_back()
        report = self.build_report(targets, target_plan, reread, mask_snapshot)
        self.hooks.starfish_heal_finished(model=self.pruned, report=report, config=self.config)
        return report

    def _check_data(self) -> None:
        """Labels present when a loss needs them, inputs the model takes, the shard of this rank,
        and the held-out split (each rank splits its own shard the same way)."""
        config, dist = self.config, self.dist
        if self.loss_fn.needs_labels and self.data.labels is None:
            raise CalibrationError("loss 'ce' needs labels; pass (inputs, labels) batches or a labeled Dataset")
        if self.loss_fn.needs_token_ids and token_ids(first := self.data.head(1)) is None:
            raise CalibrationError(
                f"loss 'next_token' needs calibration inputs of integer token ids [B, T] (a tensor, or dicts with "
                f"'input_ids'), but the inputs are {describe_inputs(first)}; use loss='cosine' for other models"
            )
        check_input_dtype(self.data, self.dense)
        n_all = self.data.total if self.data.total is not None else len(self.data)
        if dist.active:
            facts = {
                "settings": json.dumps(settings_of(config.to_dict()), sort_keys=True, default=str),
                "calibration samples": str(n_all),
            }
            if self.data.total is None:  # every rank holds the whole set (on disk each keeps its share only)
                facts["calibration set"] = self.data.fingerprint()
            dist.agree(facts)
        if dist.active and self.data.total is None:  # the whole set on every rank: split it, then share both parts
            self._split()
            self.data = dist.shard(self.data)
            self.held = dist.shard(self.held) if self.held is not None else None
        elif dist.active:  # this rank's share only (inputs on disk): hold out its share of the held-out count
            self._split(math.ceil(holdout_size(n_all, config.holdout) / dist.world))
        else:
            self._split()
        self.n_total = int(dist.sum(torch.tensor(len(self.data)))) if dist.active else len(self.data)
        if dist.active:
            if self.n_total // dist.world < dist.steps_per_epoch(self.n_total, config.batch_size):
                raise CalibrationError(
                    f"{n_all} calibration samples ({self.n_total} to train on after the held-out split) are too few "
                    f"for {dist.world} ranks at batch_size {config.batch_size}: some rank would get an empty step; "
                    "pass more samples or a larger batch_size"
                )
            self.notes.append(dist.describe(len(self.data), self.n_total, config.batch_size))
        for part in (self.data, self.held):
            if part is not None and part.labels is not None:
                part.labels = part.labels.to(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def _split(self, held: int | None = None) -> None:
        """Hold out ``config.holdout`` of the samples (at least ``MIN_HOLDOUT``; ``held`` samples if
        given) to judge every state on; they never train. Too small a set (or ``holdout=0``) is
        judged on its first ``diagnostic_samples`` training samples instead, and the report says so."""
        config, data = self.config, self.data
        train_rows, held_rows = split_rows(len(data), config.holdout, config.seed, held)
        if len(held_rows):
            self.held, self.data = data.subset(held_rows), data.subset(train_rows)
            self.data.total = self.held.total = None
            self.facts["judged_on"] = "held-out"
            self.notes.append(f"{len(held_rows)} of {len(data)} calibration samples held out to judge each state "
                              f"(holdout={config.holdout}, seed {config.seed}); {len(train_rows)} train")
        elif config.diagnostic_samples > 0:
            self.held = data.subset(torch.arange(min(config.diagnostic_samples, len(data))))
            self.held.total = None
            self.facts["judged_on"] = "training samples"
            why = "holdout=0" if config.holdout == 0 else f"{len(data)} sample(s) cannot be split"
            self.notes.append(f"judged on {len(self.held)} training samples ({why}): not held out, so a state that "
                              "over-fits them can look better than it is")

    def prepare_targets(self, stack: ExitStack) -> tuple[DenseTargets, Any]:
        """Probe both models on one batch, decide what each block is compared with (kept channels,
        the final output as one more block), and build the dense targets and the cosines before."""
        config, loss_fn, pruned, plan = self.config, self.loss_fn, self.pruned, self.plan
        probe_x = self.data.head(config.batch_size).to(self.device)
        try:
            dense_logits = probe_forward(self.dense, probe_x, "dense")
        except CalibrationError as exc:
            if self.data.source not in ("list", "tuple"):
                raise
            raise CalibrationError(
                f"{exc}. A {self.data.source} is read as a sequence of batches: if its items are single samples "
                "(e.g. [C, H, W] images), stack them into one batch with torch.stack(items)"
            ) from exc
        if loss_fn.needs_labels or loss_fn.needs_logits or loss_fn.needs_token_ids:
            check_logits(dense_logits, self.data, config, token_ids(probe_x))
        blocks = list(self.choice.names)
        candidate = loss_fn.needs_blocks and OUTPUT_BLOCK not in blocks and config.align_output != "never"
        probe_blocks = blocks + [OUTPUT_BLOCK] if candidate else blocks
        probe_out = dense_outputs(self.dense, probe_blocks, probe_x, loss_fn.needs_logits)
        check_finite(probe_out)
        if any(e.refresh is not None for e in plan):  # prune hooks: refresh only weights read without a call
            plan.skip_refresh_of_called(modules_called(pruned, probe_x[:1]))
        index: ChannelIndex = {}
        alignment = {b: "direct" for b in probe_blocks}
        output_comparable = True
        if plan.structural:  # e.g. Torch-Pruning: widths may differ from the dense model
            pruned_out, order = probe_structural(pruned, probe_blocks, probe_x[:1], plan)
            if not same_output_shape(pruned, dense_logits, probe_x[:1]):
                output_comparable = False  # the output itself was narrowed: not comparable
                candidate, probe_blocks = False, blocks
            index, alignment, left_out = channel_index(plan, pruned, probe_blocks, probe_out, pruned_out, order)
            if left_out:
                blocks, probe_blocks, candidate = self._leave_out(left_out, blocks, probe_blocks, candidate)
                for name in left_out:
                    del probe_out[name]
            select_channels(probe_out, index)
        if loss_fn.needs_blocks:
            blocks, loss_fn.detach_at, untrained = self._output_alignment(blocks, candidate, probe_x, probe_out)
            self.facts["untrained_tensors"] = untrained
            self.facts["output_aligned"] = OUTPUT_BLOCK in blocks and OUTPUT_BLOCK not in self.choice.names
            loss_fn.blocks = blocks
        for name in set(probe_out) - set(blocks) - {LOGITS}:
            del probe_out[name]
        self.blocks = blocks
        self.alignment = {b: alignment[b] for b in blocks if b in alignment}
        self.facts.update(parameters_dense=parameter_count(self.dense), parameters_pruned=parameter_count(pruned))
        if plan.structural:
            one = probe_x[:1]
            self.facts.update(macs_dense=layer_macs(self.dense, one), macs_pruned=layer_macs(pruned, one))
        cache_dir = config.cache_dir
        if cache_dir is not None and self.dist.active:  # each rank caches its own shard
            cache_dir = str(Path(cache_dir) / f"rank{self.dist.rank}-of-{self.dist.world}")
        target_plan = plan_targets(probe_out, len(self.data), config.targets, config.target_memory_budget, cache_dir)
        targets = DenseTargets(
            self.dense, blocks, self.data, target_plan, self.device, loss_fn.needs_logits, config.batch_size, index
        )
        stack.callback(targets.close)
        if self.held is not None:
            comparable = isinstance(dense_logits, torch.Tensor) and output_comparable
            judge = HeldOutJudge(pruned, plan, self.dense, self.held, loss_fn, self.device, config.batch_size,
                                 self.dist, index, comparable)
            best = BestState(self._kept_tensors(), config.target_memory_budget, config.cache_dir)
            stack.callback(best.close)
            self.keeper = KeepBest(judge, best, config.patience, config.if_worse == "restore")
            self.before = self.keeper.record("start").block_cosine
        return targets, target_plan

    def _leave_out(self, left_out: dict[str, str], blocks: list[str], probe_blocks: list[str],
                   candidate: bool) -> tuple[list[str], list[str], bool]:
        """Blocks whose pruned output cannot be compared with the dense one leave the loss; the others
        and the final output are aligned. Nothing comparable at all is a ``BlockError``."""
        kept_blocks = [b for b in blocks if b not in left_out]
        kept_probe = [b for b in probe_blocks if b not in left_out]
        if not kept_probe:
            first = next(iter(left_out))
            raise BlockError(
                f"no block of the pruned model can be compared with the dense one: {first!r} {left_out[first]}"
                + (f" (and {len(left_out) - 1} more)" if len(left_out) > 1 else "") + ", and the final output's "
                f"shape changed too. {self.plan.hint or 'Record the kept channels while pruning.'}"
            )
        shown = ", ".join(list(left_out)[:4]) + (f" and {len(left_out) - 4} more" if len(left_out) > 4 else "")
        why = next(iter(left_out.values()))
        aligned = f"{len(kept_blocks)} other block(s)" + (" and the final output" if OUTPUT_BLOCK in kept_probe else "")
        self.notes.append(f"left out of the loss, not comparable with the dense model: {shown} ({why}); aligned "
                          f"{aligned}. To align them too: {self.plan.hint or 'record the kept channels while pruning'}")
        return kept_blocks, kept_probe, candidate and OUTPUT_BLOCK in kept_probe

    def _output_alignment(self, blocks: list[str], candidate: bool, probe_x: Any,
                          probe_out: dict[str, torch.Tensor]) -> tuple[list[str], str | None, list[str]]:
        """``choose_output_alignment`` on the pruned model (which tensors get a training signal)."""
        return choose_output_alignment(self.pruned, self.plan, blocks, candidate, probe_x, probe_out, self.config,
                                       self.notes)

    def _kept_tensors(self) -> list[torch.Tensor]:
        """What a restore puts back: the trained tensors, and the buffers when healing in train mode
        (batch-norm statistics)."""
        return list(self.params) + (list(self.pruned.buffers()) if self.config.train_mode else [])

    def _checkpointing(self, stack: ExitStack) -> Checkpointing | None:
        """Lock this heal's checkpoint file (one heal at a time) and read the checkpoint there, if any."""
        config, dist = self.config, self.dist
        if config.checkpoint_dir is None:
            return None
        path = checkpoint_path(config.checkpoint_dir, dist.rank, dist.world)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            stack.enter_context(exclusive_lock(path.with_name(f".{path.name}.lock"), lambda holder: CheckpointError(
                f"{path} is being written by another heal running now ({holder}); give each concurrent heal "
                "its own checkpoint_dir"
            )))
        except OSError as exc:
            raise CheckpointError(
                f"checkpoint_dir {config.checkpoint_dir} cannot hold checkpoints ({exc.strerror or exc}); pass a "
                "writable directory as HealConfig.checkpoint_dir"
            ) from exc
        settings = settings_of(config.to_dict()) | {"world_size": dist.world}
        fingerprint = {
            "dense model": model_fingerprint(self.dense),
            "pruned model": model_fingerprint(self.pruned, skip=self.params),
            "pruned weights": weights_fingerprint(self.params),  # one heal's checkpoint is not another's
            "calibration set": self.data.fingerprint(),
        }
        return Checkpointing(path, settings, fingerprint, load_state(path, settings, fingerprint))

    def train(self, targets: DenseTargets, checkpointing: Checkpointing | None) -> None:
        """The recipe (probed under ``recipe="auto"``), the warm start and the optimizer loop, each
        state judged on the held-out samples; then the best state is left in the model. On any
        failure the trained tensors are restored (``restore_on_error``) and ``starfish_heal_failed``
        fires before the error goes on."""
        config, pruned, plan, dist = self.config, self.pruned, self.plan, self.dist
        if dist.active:
            self.steps_per_epoch = dist.steps_per_epoch(self.n_total, config.batch_size)
        else:
            self.steps_per_epoch = math.ceil(len(self.data) / config.batch_size)
        self.hooks.starfish_heal_started(model=pruned, plan=plan, config=config,
                                         total_steps=self.steps_per_epoch * config.epochs)
        params, kept = self.params, self._kept_tensors()
        setup = TrainSetup(pruned, plan, params, targets, self.data, self.loss_fn, config, self.device, self.hooks,
                           dist, checkpointing, self.n_total, self.steps_per_epoch, epoch_hook=self.keeper)
        backup = [t.detach().clone() for t in kept]
        state = checkpointing.state if checkpointing is not None else None
        train_start = time.perf_counter()
        try:
            with trainable_only(pruned, params), eval_mode(pruned, config.train_mode):
                warmed = self._choose_recipe(setup, kept, backup, state)
                if state is None and self.config.warm_start != "none" and not warmed:
                    self._warm_start()
                if self.config.epochs > 0:  # epochs=0: the warm start alone
                    loop = TrainLoop(setup, self.notes)
                    self.epoch_losses, self.epochs_run = loop.run()
                    self.facts.update(resumed_after_epoch=loop.first_epoch if state is not None else 0,
                                      compiled=loop.compiled, autocast="bf16" if loop.use_bf16 else "",
                                      stopped_early_after=loop.stopped_after)
                    self._check_divergence(loop.diverged)
        except BaseException as exc:
            if config.restore_on_error:
                _put_back(kept, backup)
            self.hooks.starfish_write_back(model=pruned, plan=plan)  # refresh derived attributes
            self.hooks.starfish_heal_failed(model=pruned, error=exc, config=self.config)
            raise
        finally:
            for p in params:
                p.grad = None
        self.train_seconds = time.perf_counter() - train_start
        self._settle(backup, current_is_last=not self.facts.get("diverged_in_epoch"))

    def _check_divergence(self, diverged_epoch: int) -> None:
        """A heal whose loss (or held-out score) became NaN/Inf: with ``if_worse="restore"`` it
        returns its best judged state with a ``HealingWarning`` naming the cause; otherwise a
        ``NonFiniteError`` (the weights are restored when ``restore_on_error``)."""
        keeper, config = self.keeper, self.config
        last = keeper.judgement.history[-1][1] if keeper is not None else None
        if not diverged_epoch and (last is None or math.isfinite(last.objective)):
            return
        cause = non_finite_cause(config, self.params, "")
        where = (f"the healing loss became NaN/Inf in epoch {diverged_epoch}" if diverged_epoch
                 else f"the held-out objective became {last.objective if last else 'NaN'}")
        if keeper is None or not keeper.keep:
            state_word = "restored" if config.restore_on_error else "left as they were (restore_on_error=False)"
            raise NonFiniteError(f"{where}; the weights were {state_word}. {cause}")
        self.facts["diverged_in_epoch"] = diverged_epoch or len(self.epoch_losses)
        message = f"{where}: healing diverged, so the best state judged before it is returned. {cause}"
        warnings.warn(message, HealingWarning, stacklevel=5)
        self.notes.append(message)

    def _choose_recipe(self, setup: TrainSetup, kept: list[torch.Tensor], backup: list[torch.Tensor],
                       state: HealState | None) -> bool:
        """Under ``recipe="auto"`` (lr and warm_start left as the paper has them), run the probe, or
        take its choice from the checkpoint a resumed heal continues. Returns whether the chosen
        warm start is already applied (the probe leaves its result in place)."""
        config = self.config
        if not auto_applies(config) or self.keeper is None or config.probe_budget == 0:
            if auto_applies(config):
                why = "probe_budget=0" if config.probe_budget == 0 else "no judgement (holdout=0, diagnostic_samples=0)"
                self.notes.append(f"recipe='auto' did not probe ({why}): the paper's recipe is used")
            return False
        warmed = False
        if state is not None and "recipe" in state.extra:
            choice = Candidate(**state.extra["recipe"])
            self.notes.append(f"recipe='auto': {choice.name}, as the probe chose before the interruption")
        else:
            context = ProbeContext(setup, self.keeper.judge, self.keeper.judgement.start, kept, backup,
                                   self._apply_warm_start, config.probe_budget)
            result = run_probe(context)
            choice = result.choice
            self.facts["recipe_probe"] = result.to_dict()
            self.notes.append(result.note())
            if result.warmed is not None and result.warm_score is not None:
                _put_back(kept, result.warmed)
                self.keeper.record("warm start", result.warm_score)
                self.notes.append(result.warm_note)
                self.facts["warm_start_changed"] = result.warm_changed
                warmed = True
        self.config = setup.config = chosen_config(config, choice)
        if setup.checkpointing is not None:
            setup.checkpointing.extra["recipe"] = {"warm_start": choice.warm_start, "lr": choice.lr}
        self.facts["recipe_applied"] = f"recipe='auto' chose warm_start={choice.warm_start!r}, lr={choice.lr:g}"
        return warmed

    def _apply_warm_start(self, kind: str, samples: int | None = None) -> tuple[str, int]:
        return apply_warm_start(kind, self.plan, self.pruned, self.dense, self.data, self.config, self.device,
                                [b for b in self.blocks if b != OUTPUT_BLOCK], samples)

    def _warm_start(self) -> None:
        """Apply the configured warm start and judge the state it leaves."""
        note, changed = self._apply_warm_start(self.config.warm_start)
        self.notes.append(note)
        self.facts["warm_start_changed"] = changed
        if self.keeper is not None:
            self.keeper.record("warm start")

    def _settle(self, backup: list[torch.Tensor], current_is_last: bool = True) -> None:
        """Leave the best judged state in the model (``if_worse="restore"``), or the last one with a
        warning when it is worse than the start (``"warn"``); fill the report's judgement."""
        keeper, config = self.keeper, self.config
        if keeper is None:
            return
        returned, copied = keeper.settle(backup, current_is_last)
        judgement = keeper.judgement
        start, last, final = judgement.start, judgement.history[-1][1], judgement.score_of(returned)
        if copied:
            self.plan.refresh()  # attributes derived from the weights (a prune hook's module.weight)
        self.after = final.block_cosine
        self.facts.update(judged_facts(start, final, returned, judgement.history))
        if returned == "start" and (len(judgement.history) > 1 or not current_is_last):
            self.facts["worse_restored"] = True
            self.notes.append(
                f"nothing beat the pruned model on the {start.samples} {self.facts.get('judged_on', '')} samples "
                f"(objective {start.objective:.5f}; best seen {min(sc.objective for _, sc in judgement.history):.5f}, "
                "or its final output was further from the dense model's): its weights were put back unchanged"
            )
        elif returned != judgement.history[-1][0]:
            self.notes.append(f"kept the best state ({returned}) of the {len(judgement.history)} judged; "
                              f"the last ({judgement.history[-1][0]}) scored {last.objective:.5f}")
        if config.if_worse == "warn" and not last.improves_on(start) and len(judgement.history) > 1:
            self.facts["healing_worsened"] = True
            if judgement.history[-1][0] == "warm start" and not self.facts.get("warm_start_changed"):
                causes = (f"the {config.warm_start} warm start changed no weight: no pruned layer here is one it "
                          "can solve (report.notes names those it skipped); heal with epochs >= 1")
            elif judgement.history[-1][0] == "warm start":  # no epoch trained: the warm start alone
                causes = (f"the {config.warm_start} warm start moved the judged blocks or the output away from the "
                          "dense model's; heal with epochs >= 1 from it, or use another warm start")
            else:
                causes = (f"a learning rate too high for this model (lr={config.lr:g}; try lr={config.lr / 4:g}), "
                          f"or blocks that do not suit it (chosen by: {self.choice.rule}; pass "
                          "HealConfig.blocks=[...])")
            message = (
                f"healing did not improve the held-out score (objective {start.objective:.5f} -> "
                f"{last.objective:.5f}, final-output cosine {start.output_cosine} -> {last.output_cosine}); the "
                f"last weights stay (if_worse='warn'). Likely cause: {causes}; if_worse='restore' keeps the best "
                "state"
            )
            warnings.warn(message, HealingWarning, stacklevel=5)
            self.notes.append(message)

    def write_back(self) -> SparsityPlan:
        """Leave the model in its toolkit's form, then read its masks again (to check them)."""
        self.hand_back()
        return read_masks(self.hooks, self.pruned, self.dense)

    def hand_back(self) -> None:
        """Leave the model in its toolkit's form (the adapter that read the plan writes it back)."""
        if self.hooks.starfish_write_back(model=self.pruned, plan=self.plan) is None:
            raise AdapterError(
                f"no adapter wrote the healed model back for the plan read by '{self.plan.adapter}': its "
                "starfish_write_back must return True for its own plans (the weights are healed in place)"
            )

    def build_report(
        self, targets: DenseTargets | None, target_plan: Any, reread: SparsityPlan,
        mask_snapshot: dict[str, str],
    ) -> HealReport:
        """The report; ``targets`` and ``target_plan`` are ``None`` for a sequential heal (each block
        kept its own targets: ``sequential_blocks``)."""
        config, plan, data = self.config, self.plan, self.data
        peak, peak_kind = _peak_memory(self.device)
        in_plan = {id(e.parameter) for e in plan}
        trained = {id(p) for p in self.params}
        trainable = sum(int(e.mask.sum()) for e in plan if id(e.parameter) in trained) + sum(
            p.numel() for p in self.params if id(p) not in in_plan
        )
        seconds = self.train_seconds
        return HealReport(
            loss=config.loss if isinstance(config.loss, str) else "+".join(f"{w}*{n}" for n, w in config.loss.items()),
            blocks=self.blocks,
            block_rule=self.choice.rule,
            epoch_losses=self.epoch_losses,
            block_cosine_before=self.before,
            block_cosine_after=self.after,
            seconds=time.perf_counter() - self.start,
            train_seconds=seconds,
            samples_per_second=len(data) * self.epochs_run / seconds if seconds > 0 else float("inf"),
            steps=self.steps_per_epoch * config.epochs,
            n_samples=len(data),
            peak_memory_bytes=peak,
            peak_memory_kind=peak_kind,
            targets_mode=target_plan.mode if target_plan is not None else "per block",
            targets_reason=target_plan.reason if target_plan is not None else "strategy='sequential'",
            target_cache_bytes=targets.cache_bytes if targets is not None else 0,
            target_cache_estimate_bytes=target_plan.estimate_bytes if target_plan is not None else 0,
            mask_unchanged=reread.same_pattern(mask_snapshot),
            masked_weights_zero=reread.masked_weights_are_zero(),
            sparsity=plan.sparsity,
            adapter=plan.adapter,
            trainable_parameters=trainable,
            frozen_parameters=sum(p.numel() for p in self.pruned.parameters()) - trainable,
            device=str(self.device),
            target_alignment=self.alignment,
            calibration_source=data.source,
            target_cache_action=targets.cache_action if targets is not None else "",
            target_cache_reason=targets.cache_reason if targets is not None else "",
            world_size=self.dist.world if self.dist.active else 1,
            **self.facts,
            notes=list(plan.notes)
            + [f"calibration from a {data.source}"]
            + self.notes
            + ([targets.note] if targets is not None and targets.note else [])
            + ([f"blocks kept in fp32 (outside fp16 range): {targets.fp32_blocks}"]
               if targets is not None and targets.fp32_blocks else []),
            config=config.to_dict(),
        )
