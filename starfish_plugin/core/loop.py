"""The optimizer loop of a heal: masks held fixed, per-epoch checkpoints, one or several ranks."""

from __future__ import annotations

import math
import time
import types
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from starfish_plugin.base.model_io import Inputs, attention_mask, call_model, main_output, token_ids
from starfish_plugin.base.outputs import OUTPUT_BLOCK, capture_outputs
from starfish_plugin.config import HealConfig
from starfish_plugin.core.losses import HealLoss
from starfish_plugin.core.plan import SparsityPlan
from starfish_plugin.core.recompute import recompute_blocks
from starfish_plugin.data.calibration import CalibrationData
from starfish_plugin.data.targets import DenseTargets
from starfish_plugin.errors import CompileError, HealingWarning, NonFiniteError
from starfish_plugin.runtime.distributed import DistContext
from starfish_plugin.runtime.resume import HealState, save_state


class MaskKeeper:
    """Keeps the mask fixed: masks gradients, and re-applies the mask after every step."""

    def __init__(self, plan: SparsityPlan, weight_decay: float) -> None:
        sparse = [e for e in plan if not bool(e.mask.all())]  # all-ones masks need no keeping
        self.params = [e.parameter for e in sparse]
        self.grad_masks = [e.mask.to(e.parameter.dtype) for e in sparse]
        self.zero = [(e.parameter, m) for e, m in zip(sparse, self.grad_masks) if e.masked_entries == "zero"]
        # With weight decay, AdamW also shrinks masked entries that the toolkit keeps; restore them.
        self.keep = [
            (e.parameter, e.mask, e.parameter.detach().clone())
            for e in sparse
            if e.masked_entries == "keep" and weight_decay > 0
        ]

    def mask_grads(self) -> None:
        pairs = [(p.grad, m) for p, m in zip(self.params, self.grad_masks) if p.grad is not None]
        if pairs:
            torch._foreach_mul_([g for g, _ in pairs], [m for _, m in pairs])

    @torch.no_grad()
    def reapply(self) -> None:
        if self.zero:
            torch._foreach_mul_([p for p, _ in self.zero], [m for _, m in self.zero])
        for p, mask, original in self.keep:
            p.copy_(torch.where(mask, p, original))


def bf16(config: HealConfig, device: torch.device) -> bool:
    """Whether the pruned forward runs under bf16 autocast: ``precision="bf16"``, or ``"auto"`` on a
    CUDA device that supports bf16 (the recovery benchmark found bf16 heals as well as fp32)."""
    if config.precision == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return config.precision == "bf16"


def training_forward(forward: nn.Module, config: HealConfig, use_bf16: bool, device: torch.device):
    """The pruned model's forward for training: under bf16 autocast if asked, and compiled with
    ``torch.compile`` unless ``config.compile == "none"`` (hooks and autocast are traced with it)."""

    def run(x: Inputs):
        with torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext():
            return main_output(call_model(forward, x))

    if config.compile == "none":
        return run
    from torch._dynamo.exc import TorchDynamoException

    mode = None if config.compile == "default" else config.compile
    backend = getattr(config.compile_backend, "__name__", config.compile_backend)
    # Dynamo caches compiled frames per code object and stops compiling one after
    # ``recompile_limit`` variants; a fresh code object per heal keeps each heal's cache its own
    # (many heals in one process, e.g. attach over iterative steps, all compile) and frees it after.
    run = types.FunctionType(run.__code__.replace(), run.__globals__, run.__name__, None, run.__closure__)
    compiled = torch.compile(run, mode=mode, backend=config.compile_backend)

    def guarded(x: Inputs):
        try:
            return compiled(x)
        except TorchDynamoException as exc:  # BackendCompilerFailed among them
            cause = getattr(exc, "inner_exception", None) or exc  # the backend's own error
            first_line = next((line for line in str(cause).splitlines() if line.strip()), "")
            raise CompileError(
                f"torch.compile (mode={config.compile!r}, backend={backend!r}) failed on the "
                f"pruned model's training forward: {type(cause).__name__}: {first_line}. "
                "Heal without it (HealConfig.compile='none'), or try compile_backend='aot_eager' (no C++ "
                "compiler needed); the weights were restored unless restore_on_error=False"
            ) from exc

    return guarded


@dataclass
class Checkpointing:
    """Where the heal's state is saved after each epoch, and what it must match to be resumed."""

    path: Path
    settings: dict[str, Any]
    fingerprint: dict[str, str]
    state: HealState | None = None  # the checkpoint found there (checked to belong to this heal)
    extra: dict[str, Any] = field(default_factory=dict)  # saved with every epoch (the probe's choice)


@dataclass
class TrainSetup:
    """What the optimizer loop trains, on what, and whom it tells."""

    model: nn.Module
    plan: SparsityPlan
    params: list[nn.Parameter]
    targets: DenseTargets
    data: CalibrationData
    loss_fn: HealLoss
    config: HealConfig
    device: torch.device
    hooks: Any  # the plugin manager's hook relay (progress hooks)
    dist: DistContext
    checkpointing: Checkpointing | None
    n_total: int
    steps_per_epoch: int
    rows: torch.Tensor | None = None  # train on these samples only (positions in ``data``)
    epoch_hook: EpochHook | None = None  # judges each epoch; may stop the heal early


class EpochHook(Protocol):
    """What the loop asks after every epoch (the held-out judgement, ``core/keep_best.py``)."""

    def after_epoch(self, epoch: int) -> bool:
        """Score the state after ``epoch`` (1-based); return whether to stop here."""

    @property
    def last_score(self) -> float | None:
        """The last held-out objective, for the progress hooks."""

    @property
    def keeps_best(self) -> bool:
        """Whether the heal returns its best judged state (then a diverged loss stops it instead of raising)."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must hold to judge alike after a resume."""

    def load_state_dict(self, state: dict[str, Any]) -> bool:
        """Restore from a checkpoint; return whether that heal had stopped early."""


def non_finite_cause(config: HealConfig, params: list[nn.Parameter], targets_mode: str) -> str:
    """The likeliest reason a heal's loss became NaN or Inf, and its fix."""
    half = sorted({str(p.dtype) for p in params if p.dtype in (torch.float16, torch.bfloat16)})
    if half:
        return (
            f"The trained weights are {', '.join(half)}: AdamW's update and the loss overflow or lose precision "
            "there. Heal in fp32 (pruned.float() and dense.float(), with fp32 inputs) and cast back afterwards; "
            "precision='bf16' keeps fp32 weights and computes the forward in bf16"
        )
    if config.weight_decay * config.lr >= 1:
        return (
            f"weight_decay * lr = {config.weight_decay * config.lr:g} >= 1: each step's decay overshoots zero and the "
            f"weights grow without bound. Lower HealConfig.weight_decay (now {config.weight_decay}; the paper uses 0)"
        )
    diverged = sum(not bool(torch.isfinite(p).all()) for p in params)
    if diverged:
        return (
            f"{diverged} of {len(params)} trained tensors diverged to NaN/Inf: the learning rate is too high for "
            f"this model. Lower HealConfig.lr (now {config.lr:g}; try {config.lr / 10:g})"
        )
    online = (" (with targets='online' only the first batch is checked up front)" if targets_mode == "online" else "")
    return (
        "The weights stayed finite, so a forward produced it: check that the dense model's outputs are finite on "
        f"every calibration input{online}, or lower HealConfig.lr (now {config.lr})"
    )


class TrainLoop:
    """The optimizer loop: AdamW with a cosine schedule, the mask held fixed after every step,
    per-epoch checkpoints (and resuming from them), one or several ranks."""

    def __init__(self, setup: TrainSetup, notes: list[str]) -> None:
        self.s, self.notes = setup, notes
        config, device, params = setup.config, setup.device, setup.params
        self.total_steps = setup.steps_per_epoch * config.epochs
        self.keeper = MaskKeeper(setup.plan, config.weight_decay)
        fused = device.type == "cuda" and all(p.is_cuda for p in params)  # one kernel for the whole update
        self.optimizer = torch.optim.AdamW(  # the kernel not chosen is left at AdamW's default (None)
            params,
            lr=config.lr,
            weight_decay=config.weight_decay,
            fused=True if fused else None,
            foreach=None if fused else True,
        )
        self.use_bf16 = bf16(config, device)
        if self.use_bf16:
            notes.append(f"pruned forward under bf16 autocast (precision={config.precision!r})")
        self.schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=self.total_steps, eta_min=config.min_lr
        )
        self.generator = torch.Generator().manual_seed(config.seed)
        self.losses: list[float] = []
        self.first_epoch = 0
        self.stopped_after = 0  # the epoch after which the epoch hook stopped the heal (0: it did not)
        self.diverged = 0  # the epoch whose loss became NaN/Inf, when the epoch hook keeps the best state
        self.compiled = "" if config.compile == "none" else config.compile

    def run(self) -> tuple[list[float], int]:
        """Train; returns the mean loss of each epoch (over every rank's samples, resumed epochs
        included) and the number of epochs this call trained."""
        s = self.s
        self._resume()
        forward = training_forward(s.dist.wrap(s.model, s.device), s.config, self.use_bf16, s.device)
        if s.config.compile != "none":
            backend = getattr(s.config.compile_backend, "__name__", s.config.compile_backend)
            self.notes.append(
                f"training forward compiled (torch.compile mode={s.config.compile!r}, backend={backend!r})"
            )
        step = self.first_epoch * s.steps_per_epoch
        block_names = s.loss_fn.blocks if s.loss_fn.needs_blocks else []
        recomputed = [b for b in s.loss_fn.blocks if b != OUTPUT_BLOCK] if s.config.gradient_checkpointing else []
        trained = 0
        detach = {s.loss_fn.detach_at} if s.loss_fn.detach_at is not None else set()
        if s.config.local_blocks:  # each block learns from its own loss only (block-wise reconstruction)
            detach |= set(block_names) - {OUTPUT_BLOCK}
        with recompute_blocks(s.model, recomputed), \
                capture_outputs(s.model, block_names, detach=detach) as outputs:
            for epoch in range(self.first_epoch, s.config.epochs):
                epoch_start = time.perf_counter()
                running, step = self._epoch(forward, outputs, step)
                trained += 1
                if self._end_epoch(epoch, (s.dist.sum(running) / s.n_total).item(), epoch_start):
                    self.stopped_after = 0 if self.diverged else epoch + 1
                    break
        return self.losses, trained

    def _resume(self) -> None:
        s = self.s
        state = s.checkpointing.state if s.checkpointing is not None else None
        if state is None:
            return
        with torch.no_grad():
            for p, saved in zip(s.params, state.params, strict=True):
                p.copy_(saved)
        self.optimizer.load_state_dict(state.optimizer)
        self.schedule.load_state_dict(state.scheduler)
        self.generator.set_state(state.generator)
        self.first_epoch, self.losses = state.epoch, list(state.epoch_losses)
        if s.epoch_hook is not None and s.epoch_hook.load_state_dict(state.extra):
            self.stopped_after = state.epoch
            self.first_epoch = s.config.epochs  # that heal had stopped early: nothing is left to train
        assert s.checkpointing is not None
        self.notes.append(f"resumed from {s.checkpointing.path} after epoch {state.epoch} of {s.config.epochs}")
        if self.first_epoch >= s.config.epochs:
            warnings.warn(
                f"{s.checkpointing.path} holds a finished heal of this model: its weights are returned without "
                "training. Delete it, or pass another checkpoint_dir, to heal again", HealingWarning, stacklevel=6,
            )

    def _epoch(self, forward: Any, outputs: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, int]:
        """One pass over this rank's batches; returns the summed loss (on the device) and the step."""
        s = self.s
        batch_size = s.dist.batch_size(s.config.batch_size)
        n_batches = s.steps_per_epoch if s.dist.active else None  # ranks split shards into equal step counts
        running = torch.zeros((), device=s.device)
        for idx, x, y in s.data.batches(batch_size, self.generator, n_batches, s.rows):
            x = x.to(s.device, non_blocking=True)
            dense = s.targets.get(idx, x)
            s.plan.refresh()  # weights read without calling their module's prune hook
            logits = forward(x)
            ids = token_ids(x) if s.loss_fn.needs_token_ids else None
            loss = s.loss_fn(outputs, logits, dense, y, attention_mask(x), ids)  # in fp32 (the losses upcast)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.keeper.mask_grads()
            self.optimizer.step()
            self.schedule.step()
            self.keeper.reapply()
            running += loss.detach() * len(idx)
            step += 1
            s.hooks.starfish_step_ended(step=step, total_steps=self.total_steps, config=s.config)
        return running, step

    def _end_epoch(self, epoch: int, mean: float, epoch_start: float) -> bool:
        """Check the loss, judge the epoch, save the checkpoint, tell the hooks; return whether to stop."""
        s, config = self.s, self.s.config
        if not math.isfinite(mean):
            if s.epoch_hook is not None and s.epoch_hook.keeps_best:
                self.diverged = epoch + 1  # stop here: the heal returns its best judged state
                return True
            state_word = "restored" if config.restore_on_error else "left as they were (restore_on_error=False)"
            raise NonFiniteError(
                f"the healing loss became {mean} in epoch {epoch + 1}; the weights were {state_word}. "
                + non_finite_cause(config, s.params, s.targets.plan.mode)
            )
        self.losses.append(mean)
        hook = s.epoch_hook
        stop = hook.after_epoch(epoch + 1) if hook is not None else False
        if s.checkpointing is not None:
            save_state(s.checkpointing.path, HealState(
                epoch + 1, self.losses, list(s.params), self.optimizer.state_dict(), self.schedule.state_dict(),
                self.generator.get_state(), s.checkpointing.settings, s.checkpointing.fingerprint,
                {**s.checkpointing.extra, **(hook.state_dict() if hook is not None else {})},
            ))
        s.hooks.starfish_epoch_ended(
            epoch=epoch + 1,
            epochs=config.epochs,
            loss=mean,
            lr=self.schedule.get_last_lr()[0],
            seconds=time.perf_counter() - epoch_start,
            config=config,
            held_out=hook.last_score if hook is not None else None,
        )
        return stop
