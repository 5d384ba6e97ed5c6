"""A STARFISH heal in phases (``HealRun``): masks fixed, surviving weights trained to align block
outputs. The plugin hooks come in as an argument: the core never imports the plugin manager."""

from __future__ import annotations

import json
import math
import resource
import time
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from starfish_plugin.config import HealConfig
from starfish_plugin.core.alignment import ChannelIndex, channel_index, select_channels
from starfish_plugin.core.blocks import OUTPUT_BLOCK, BlockChoice, capture_outputs, resolve_blocks
from starfish_plugin.core.costs import layer_macs, parameter_count
from starfish_plugin.core.loop import Checkpointing, TrainLoop, TrainSetup
from starfish_plugin.core.losses import HealLoss, cosine_distance
from starfish_plugin.core.masks import read_masks
from starfish_plugin.core.model_io import Inputs, attention_mask, call_model, describe_inputs, modules_called, token_ids
from starfish_plugin.core.modes import eval_mode
from starfish_plugin.core.plan import SparsityPlan
from starfish_plugin.core.recipe import resolve_recipe
from starfish_plugin.core.validation import (
    check_architecture,
    check_dtypes,
    check_finite_weights,
    check_input_dtype,
    check_models,
    probe_forward,
    resolve_device,
    unrelated_weights,
)
from starfish_plugin.core.warm_start import row_norm_warm_start_
from starfish_plugin.data.calibration import CalibrationData, load_calibration
from starfish_plugin.data.targets import LOGITS, DenseTargets, check_finite, dense_outputs, plan_targets
from starfish_plugin.errors import (
    AdapterError,
    BlockError,
    CalibrationError,
    CheckpointError,
    ConfigError,
    HealingWarning,
    ModelMismatchError,
    NothingToTrainError,
)
from starfish_plugin.report import HealReport
from starfish_plugin.runtime.atomic import directory_problem
from starfish_plugin.runtime.distributed import DistContext, dist_context
from starfish_plugin.runtime.fingerprint import model_fingerprint, weights_fingerprint
from starfish_plugin.runtime.locks import exclusive_lock
from starfish_plugin.runtime.resume import checkpoint_path, load_state, settings_of
from starfish_plugin.runtime.signals import signals_as_exceptions


@contextmanager
def trainable_only(model: nn.Module, params: list[nn.Parameter]) -> Iterator[None]:
    """Freeze every parameter of ``model`` except ``params``; restore the flags on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    keep = {id(p) for p in params}
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in keep)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@torch.no_grad()
def _put_back(
    params: list[nn.Parameter], backup: list[torch.Tensor], buffers: list[tuple[torch.Tensor, torch.Tensor]]
) -> None:
    """Copy the saved weights (and buffers) back in place."""
    for p, saved in zip(params, backup):
        p.copy_(saved)
    for b, saved in buffers:
        b.copy_(saved)


@torch.no_grad()
def block_cosines(
    model: nn.Module, plan: SparsityPlan, targets: DenseTargets, data: CalibrationData, samples: int,
    batch_size: int, reduction: str,
) -> dict[str, float]:
    """Mean cosine similarity of each block's output to its dense target on the first ``samples``."""
    if samples <= 0:
        return {}
    sums = {b: 0.0 for b in targets.blocks}
    seen = 0
    with eval_mode(model), capture_outputs(model, targets.blocks) as outputs:
        for idx, x, _ in data.batches(batch_size):
            if seen >= samples:
                break
            x = x.to(targets.device)
            plan.refresh()
            call_model(model, x)
            dense = targets.get(idx, x)
            for b in targets.blocks:
                cos = 1.0 - cosine_distance(outputs[b].float(), dense[b], reduction, attention_mask(x)).item()
                sums[b] += cos * len(idx)
            seen += len(idx)
    return {b: s / seen for b, s in sums.items()}


def probe_structural(
    pruned: nn.Module, blocks: list[str], x: Inputs, plan: SparsityPlan
) -> tuple[dict, list[str]]:
    """Block outputs of a structurally pruned model on one input and the order in which its
    modules finished, or a clear error if it cannot run."""
    order: list[str] = []
    handles = [
        module.register_forward_hook(lambda _m, _a, _o, name=name: order.append(name))
        for name, module in pruned.named_modules()
        if name in plan.kept_out_channels
    ]
    try:
        return dense_outputs(pruned, blocks, x, False, label="pruned"), order
    except (RuntimeError, ValueError, IndexError, AssertionError) as exc:
        raise ModelMismatchError(
            f"the pruned {type(pruned).__name__} fails a forward on a calibration input of "
            f"{describe_inputs(x)}: {exc}. If attention heads or widths were pruned, its attention modules' "
            f"num_heads / head_dim must match the new shapes. {plan.hint}"
        ) from exc
    finally:
        for handle in handles:
            handle.remove()


def check_logits(logits: object, data: CalibrationData, config: HealConfig, ids: torch.Tensor | None = None) -> None:
    """``kl`` needs ``[B, classes]`` or per-token ``[B, T, vocab]`` logits; ``ce`` needs ``[B, classes]``
    logits and labels below ``classes``; ``next_token`` needs ``[B, T, vocab]`` logits of the
    calibration tokens ``ids`` (a probe batch's), every id below ``vocab``."""
    terms = {name for name, weight in config.loss_terms().items() if weight > 0}
    ce, next_token = "ce" in terms, "next_token" in terms
    allowed = (2,) if ce else (3,) if next_token else (2, 3)
    if not isinstance(logits, torch.Tensor) or logits.dim() not in allowed:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        wanted = ("a classifier returning logits [B, classes]" if ce
                  else "a language model returning logits [B, T, vocab]" if next_token
                  else "logits [B, classes] or [B, T, vocab]")
        raise ConfigError(f"loss {config.loss!r} needs {wanted}, but the model returns {shape}; "
                          "use loss='cosine' or 'mse'")
    if ce and data.labels is not None:
        low, high = int(data.labels.min()), int(data.labels.max())
        if low < 0 or high >= logits.shape[1]:
            raise CalibrationError(
                f"calibration labels span {low}..{high} but the model has {logits.shape[1]} classes; "
                "labels must be class indices in [0, classes)"
            )
    if next_token and ids is not None:
        if ids.shape[1] < 2:
            raise CalibrationError(f"loss 'next_token' needs sequences of at least 2 tokens, got {tuple(ids.shape)}")
        if tuple(ids.shape) != tuple(logits.shape[:2]):
            raise CalibrationError(
                f"loss 'next_token' needs one logit row per input token, but token ids {tuple(ids.shape)} "
                f"gave logits {tuple(logits.shape)}; pass the model's input_ids as calibration inputs"
            )
        if int(ids.min()) < 0 or int(ids.max()) >= logits.shape[-1]:
            raise CalibrationError(
                f"calibration token ids span {int(ids.min())}..{int(ids.max())} but the model's vocabulary "
                f"has {logits.shape[-1]} entries; tokenize with the model's own tokenizer"
            )


def check_directories(config: HealConfig) -> None:
    """``cache_dir`` and ``checkpoint_dir``, when they will be used, can hold files (checked before
    any work, so a heal never fails on them after an epoch)."""
    uses_cache = config.inputs == "disk" or config.targets in ("disk", "auto")
    for name, path, used in (("cache_dir", config.cache_dir, uses_cache),
                             ("checkpoint_dir", config.checkpoint_dir, True)):
        problem = directory_problem(path) if path is not None and used else None
        if problem is not None:
            raise ConfigError(f"HealConfig.{name} {path} cannot hold files: {problem}; pass a writable directory")


def _peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS"


def heal_with(
    hooks: Any, pruned: nn.Module, dense: nn.Module, calibration: object, config: HealConfig
) -> HealReport:
    """``starfish.heal`` with the plugin hooks given (``plugin_manager().hook``): the core never
    reaches for the plugin manager itself."""
    with signals_as_exceptions():  # SIGTERM / SIGHUP clean up like Ctrl-C
        run = HealRun.prepare(hooks, pruned, dense, calibration, config)
        try:
            return run.run()
        finally:
            run.data.close()


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
    data: CalibrationData
    start: float
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
        device = resolve_device(pruned, dense, config.device)
        plan = read_masks(hooks, pruned, dense)
        config, recipe_note = resolve_recipe(config, plan)
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
        run = cls(hooks, pruned, dense, config, device, plan, choice, loss_fn, dist, data, start)
        if recipe_note:
            run.notes.append(recipe_note)
            run.facts["recipe_applied"] = recipe_note
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
        """Labels present when a loss needs them, inputs the model takes, the shard of this rank."""
        config, dist = self.config, self.dist
        if self.loss_fn.needs_labels and self.data.labels is None:
            raise CalibrationError("loss 'ce' needs labels; pass (inputs, labels) batches or a labeled Dataset")
        if self.loss_fn.needs_token_ids and token_ids(first := self.data.head(1)) is None:
            raise CalibrationError(
                f"loss 'next_token' needs calibration inputs of integer token ids [B, T] (a tensor, or dicts with "
                f"'input_ids'), but the inputs are {describe_inputs(first)}; use loss='cosine' for other models"
            )
        check_input_dtype(self.data, self.dense)
        self.n_total = self.data.total if self.data.total is not None else len(self.data)
        if dist.active:
            facts = {
                "settings": json.dumps(settings_of(config.to_dict()), sort_keys=True, default=str),
                "calibration samples": str(self.n_total),
            }
            if self.data.total is None:  # every rank holds the whole set (on disk each keeps its share only)
                facts["calibration set"] = self.data.fingerprint()
            dist.agree(facts)
            if self.n_total // dist.world < dist.steps_per_epoch(self.n_total, config.batch_size):
                raise CalibrationError(
                    f"{self.n_total} calibration samples are too few for {dist.world} ranks at batch_size "
                    f"{config.batch_size}: some rank would get an empty step; pass more samples or a larger "
                    "batch_size"
                )
            self.data = dist.shard(self.data)
            self.notes.append(dist.describe(len(self.data), self.n_total, config.batch_size))
        if self.data.labels is not None:
            self.data.labels = self.data.labels.to(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

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
        if plan.structural:  # e.g. Torch-Pruning: widths may differ from the dense model
            pruned_out, order = probe_structural(pruned, probe_blocks, probe_x[:1], plan)
            if candidate and pruned_out[OUTPUT_BLOCK].shape[1:] != probe_out[OUTPUT_BLOCK].shape[1:]:
                candidate, probe_blocks = False, blocks  # the output itself was narrowed: not comparable
            index, alignment = channel_index(plan, pruned, probe_blocks, probe_out, pruned_out, order)
            select_channels(probe_out, index)
        if loss_fn.needs_blocks:
            blocks, loss_fn.detach_at, untrained = _choose_output_alignment(
                pruned, plan, blocks, candidate, probe_x, probe_out, config, self.notes
            )
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
        self.before = self._cosines(targets)
        return targets, target_plan

    def _cosines(self, targets: DenseTargets) -> dict[str, float]:
        c = self.config
        return block_cosines(self.pruned, self.plan, targets, self.data, c.diagnostic_samples, c.batch_size,
                             c.cosine_reduction)

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
        """The optimizer loop (after the warm start, if any); on any failure the trained tensors are
        restored (``restore_on_error``) and ``starfish_heal_failed`` fires before the error goes on."""
        config, pruned, plan, dist = self.config, self.pruned, self.plan, self.dist
        if dist.active:
            self.steps_per_epoch = dist.steps_per_epoch(self.n_total, config.batch_size)
        else:
            self.steps_per_epoch = math.ceil(len(self.data) / config.batch_size)
        total_steps = self.steps_per_epoch * config.epochs
        self.hooks.starfish_heal_started(model=pruned, plan=plan, config=config, total_steps=total_steps)
        params = self.params
        setup = TrainSetup(pruned, plan, params, targets, self.data, self.loss_fn, config, self.device, self.hooks,
                           dist, checkpointing, self.n_total, self.steps_per_epoch)
        keep = config.restore_on_error or config.if_worse == "restore"
        backup = [p.detach().clone() for p in params] if keep else None
        # in train mode the forward also updates buffers (batch-norm running statistics)
        buffers = [(b, b.detach().clone()) for b in pruned.buffers()] if keep and config.train_mode else []
        train_start = time.perf_counter()
        try:
            if config.warm_start == "row_norm":
                note, self.facts["warm_start_rescaled"] = _warm_start(plan, self.dense, self.data, config, self.device)
                self.notes.append(note)
            loop = TrainLoop(setup, self.notes)
            with trainable_only(pruned, params), eval_mode(pruned, config.train_mode):
                self.epoch_losses, self.epochs_run = loop.run()
            self.facts.update(resumed_after_epoch=loop.first_epoch, compiled=loop.compiled,
                              autocast="bf16" if loop.use_bf16 else "")
        except BaseException as exc:
            if config.restore_on_error and backup is not None:
                _put_back(params, backup, buffers)
            self.hooks.starfish_write_back(model=pruned, plan=plan)  # refresh derived attributes
            self.hooks.starfish_heal_failed(model=pruned, error=exc, config=config)
            raise
        finally:
            for p in params:
                p.grad = None
        self.train_seconds = time.perf_counter() - train_start
        self.after = self._cosines(targets)
        if self.loss_fn.needs_blocks:  # kl / ce do not aim at block alignment
            worse = _warn_if_worse(self.before, self.after, config, self.choice, self.notes)
            self.facts["healing_worsened"] = worse
            if worse and config.if_worse == "restore" and backup is not None:
                _put_back(params, backup, buffers)
                self.hooks.starfish_write_back(model=pruned, plan=plan)
                self.after = self._cosines(targets)
                self.facts["worse_restored"] = True
                self.notes.append("if_worse='restore': the weights from before healing were put back")

    def write_back(self) -> SparsityPlan:
        """Leave the model in its toolkit's form, then read its masks again (to check them)."""
        if self.hooks.starfish_write_back(model=self.pruned, plan=self.plan) is None:
            raise AdapterError(
                f"no adapter wrote the healed model back for the plan read by '{self.plan.adapter}': its "
                "starfish_write_back must return True for its own plans (the weights are healed in place)"
            )
        return read_masks(self.hooks, self.pruned, self.dense)

    def build_report(
        self, targets: DenseTargets, target_plan: Any, reread: SparsityPlan, mask_snapshot: dict[str, torch.Tensor]
    ) -> HealReport:
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
            targets_mode=target_plan.mode,
            targets_reason=target_plan.reason,
            target_cache_bytes=targets.cache_bytes,
            target_cache_estimate_bytes=target_plan.estimate_bytes,
            mask_unchanged=reread.same_pattern(mask_snapshot),
            masked_weights_zero=reread.masked_weights_are_zero(),
            sparsity=plan.sparsity,
            adapter=plan.adapter,
            trainable_parameters=trainable,
            frozen_parameters=sum(p.numel() for p in self.pruned.parameters()) - trainable,
            device=str(self.device),
            target_alignment=self.alignment,
            calibration_source=data.source,
            target_cache_action=targets.cache_action,
            target_cache_reason=targets.cache_reason,
            world_size=self.dist.world if self.dist.active else 1,
            **self.facts,
            notes=list(plan.notes)
            + [f"calibration from a {data.source}"]
            + self.notes
            + ([targets.note] if targets.note else [])
            + ([f"blocks kept in fp32 (outside fp16 range): {targets.fp32_blocks}"] if targets.fp32_blocks else []),
            config=config.to_dict(),
        )


def _warm_start(
    plan: SparsityPlan, dense: nn.Module, data: CalibrationData, config: HealConfig, device: torch.device
) -> tuple[str, int]:
    """Run the row-norm warm start on the first ``warm_start_samples`` images; return a report note
    and the number of tensors rescaled."""
    n = min(config.warm_start_samples, len(data))
    result = row_norm_warm_start_(plan, dense, (x.to(device) for x in data.head(n).split(config.batch_size)))
    note = (
        f"warm start row_norm on {n} images: {len(result['rescaled'])} tensors rescaled, "
        f"median gain {result['median_gain']:.2f}"
    )
    if result["skipped"]:
        note += f"; not rescaled (not a same-shape Linear/Conv weight): {result['skipped']}"
    return note, len(result["rescaled"])


def params_without_signal(
    model: nn.Module,
    plan: SparsityPlan,
    params: list[nn.Parameter],
    blocks: list[str],
    x: Inputs,
    targets: dict[str, torch.Tensor],
    reduction: str,
) -> tuple[list[nn.Parameter], list[str]]:
    """The tensors of ``params`` that no block's output depends on (no gradient reaches them) on
    the batch ``x``, and the blocks in the order they ran; ``targets`` holds the dense outputs of
    ``blocks`` on ``x``."""
    with trainable_only(model, params), torch.enable_grad(), capture_outputs(model, blocks) as outputs:
        plan.refresh()
        call_model(model, x)
        order = list(outputs)
        loss = sum(cosine_distance(outputs[b].float(), targets[b], reduction) for b in blocks)
        if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
            return list(params), order
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [p for p, g in zip(params, grads) if g is None], order


def _names_of(plan: SparsityPlan, params: list[nn.Parameter]) -> list[str]:
    ids = {id(p) for p in params}
    return [e.name for e in plan if id(e.parameter) in ids]


def _choose_output_alignment(
    pruned: nn.Module,
    plan: SparsityPlan,
    blocks: list[str],
    candidate: bool,
    probe_x: Inputs,
    probe_out: dict[str, torch.Tensor],
    config: HealConfig,
    notes: list[str],
) -> tuple[list[str], str | None, list[str]]:
    """``blocks``, with the model's final output added when pruned weights would otherwise get no
    training signal (``align_output="auto"``) or when asked (``"always"``); and the block whose
    output is detached on its way to the rest of the model, so that the output's loss trains only
    the weights after the blocks and leaves the block alignment to the blocks' own losses.

    Raises:
        BlockError: no pruned weight gets any training signal from the chosen blocks.
    """
    params = plan.parameters()
    detach_at = None
    x = probe_x[: min(8, len(probe_x))]
    targets = {name: out[: len(x)] for name, out in probe_out.items()}
    silent, order = params_without_signal(pruned, plan, params, blocks, x, targets, config.cosine_reduction)
    if candidate and (config.align_output == "always" or silent):
        why = (
            "asked (align_output='always')"
            if not silent
            else (
                f"{len(silent)} pruned tensor(s) outside every block get no signal from the blocks: "
                f"{_names_of(plan, silent)[:5]}"
            )
        )
        last = order[-1] if order else None
        notes.append(
            f"the model's final output is aligned as one more block {OUTPUT_BLOCK!r}: {why}; its loss "
            f"trains only the weights after the last block ({last})"
        )
        blocks = blocks + [OUTPUT_BLOCK]
        silent, _ = params_without_signal(pruned, plan, params, blocks, x, targets, config.cosine_reduction)
        detach_at = last
    if silent and len(silent) == len(params):
        raise BlockError(
            f"none of the {len(params)} pruned tensors of {type(pruned).__name__} gets a training signal from the "
            f"blocks {blocks[:6]}: no block output depends on them (e.g. {_names_of(plan, silent)[:3]}). Choose "
            f"blocks that contain or follow the pruned layers (HealConfig.blocks), or align the final output "
            f"(align_output='auto' or 'always')"
        )
    if silent:
        notes.append(
            f"{len(silent)} pruned tensor(s) get no training signal and stay as pruned: {_names_of(plan, silent)[:5]}"
        )
    return blocks, detach_at, _names_of(plan, silent)


def _warn_if_worse(
    before: dict[str, float], after: dict[str, float], config: HealConfig, choice: BlockChoice, notes: list[str]
) -> bool:
    """Warn (and note) when healing lowered the mean block cosine; returns whether it did."""
    if not before or not after:
        return False
    mean_before, mean_after = sum(before.values()) / len(before), sum(after.values()) / len(after)
    if mean_after < mean_before - 1e-6:
        message = (
            f"healing lowered the mean block cosine from {mean_before:.4f} to {mean_after:.4f}. Likely causes: "
            f"a learning rate too high for this model (lr={config.lr}; try lr={config.lr / 4:g}), or blocks that "
            f"do not suit it (chosen by: {choice.rule}; pass HealConfig.blocks=[...]). "
            + ("The weights from before healing are put back (if_worse='restore')" if config.if_worse == "restore"
               else "The healed weights stay; HealConfig.if_worse='restore' keeps the better ones instead")
        )
        warnings.warn(message, HealingWarning, stacklevel=4)
        notes.append(message)
        return True
    return False


def trainable_parameters(
    model: nn.Module, plan: SparsityPlan, which: str, notes: list[str] | None = None
) -> list[nn.Parameter]:
    """The plan's tensors (``"pruned"``), or every floating parameter of ``model`` (``"all"``),
    less those the user froze (``requires_grad=False``): they stay as they are.

    Raises:
        NothingToTrainError: every pruned tensor is frozen, or has no surviving entry.
    """
    params = plan.parameters()
    if which == "all":
        seen = {id(p) for p in params}
        params += [p for p in model.parameters() if p.is_floating_point() and id(p) not in seen]
    frozen = [p for p in params if not p.requires_grad]
    if frozen and len(frozen) == len(params):
        raise NothingToTrainError(
            f"every tensor healing would train ({len(params)}) has requires_grad=False: nothing can be trained. "
            "If the pruned model is a copy of a frozen dense model, call pruned.requires_grad_(True) first; "
            "tensors you froze on purpose stay frozen"
        )
    if frozen:
        names = {id(p): n for n, p in model.named_parameters()}
        if notes is not None:
            notes.append(f"{len(frozen)} tensor(s) frozen by requires_grad=False stay as they are: "
                         f"{[names.get(id(p), '?') for p in frozen][:5]}")
        params = [p for p in params if p.requires_grad]
    in_plan = {id(e.parameter): e for e in plan}
    if all(id(p) in in_plan and not bool(in_plan[id(p)].mask.any()) for p in params):
        raise NothingToTrainError(
            f"every pruned tensor to train is pruned to nothing (no surviving entry in "
            f"{[e.name for e in plan][:5]}): there is no weight to heal. Prune less, or heal with trainable='all'"
        )
    return params
