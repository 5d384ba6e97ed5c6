"""``strategy="fsdp"``: a joint heal sharded over the ranks of a ``torchrun`` job with FSDP2.

The pruned and dense models are copied with every block (and the root) one ``fully_shard`` unit
(``core/sharding.py``), so each rank keeps ``1/world`` of the weights, gradients and AdamW state
on its device and gathers a block's weights only while that block runs. The masks are sharded
like their tensors, so holding them fixed stays a local multiply. Everything else is the joint
heal (``HealRun``): the same losses, dense targets (computed by the sharded dense copy), held-out
judgement and best state kept, per-epoch checkpoints and resume, the same report. The user's
models are not touched until the heal ends: then the returned state's full tensors are gathered
into the pruned model on every rank (a restore leaves it exactly as it came).
"""

from __future__ import annotations

import dataclasses
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn

from starfish_plugin.base.model_io import kv_cache_off
from starfish_plugin.core.blocks import OUTPUT_BLOCK
from starfish_plugin.core.heal import HealRun
from starfish_plugin.core.modes import eval_mode
from starfish_plugin.core.output_alignment import choose_output_alignment
from starfish_plugin.core.plan import SparsityPlan
from starfish_plugin.core.recipe import auto_applies
from starfish_plugin.core.sharding import gather_into, shadow_parameters, sharded_copy, sharded_plan
from starfish_plugin.core.trainable import trainable_parameters
from starfish_plugin.errors import ConfigError
from starfish_plugin.report import HealReport
from starfish_plugin.runtime.distributed import DistContext


def check_fsdp(run: HealRun) -> None:
    """Refuse what a sharded heal cannot do, before anything is touched."""
    config = run.config
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        raise ConfigError(
            "strategy='fsdp' shards the models over the ranks of a torch.distributed process group, and none is "
            "initialized: launch with `torchrun --nproc_per_node N script.py` and call "
            "torch.distributed.init_process_group() before heal(); in one process use strategy='joint' or "
            "'sequential'"
        )
    if config.warm_start != "none":
        raise ConfigError(
            f"warm_start={config.warm_start!r} solves whole layers and does not run on sharded weights; heal with "
            "warm_start='none' under strategy='fsdp' (or strategy='joint')"
        )
    device = fsdp_device(run)
    if device.type == "cuda" and torch_dist.get_backend() == "gloo":
        raise ConfigError(
            f"strategy='fsdp' on {device} needs the nccl backend, but the process group uses gloo: call "
            "torch.distributed.init_process_group('nccl') (gloo is for CPU shards, device='cpu')"
        )


def fsdp_device(run: HealRun) -> torch.device:
    """Where the shards live: ``config.device`` (``"cuda"`` meaning this rank's current GPU), else
    the models' device."""
    if run.config.device is None:
        return run.device
    device = torch.device(run.config.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class _ShadowHooks:
    """The plugin hooks as the sharded run calls them: the plugins see the user's model and plan,
    and nothing is written back into the shadow copies (the user's model is written back once,
    at the end)."""

    def __init__(self, hooks: Any, model: nn.Module, plan: SparsityPlan) -> None:
        self.hooks, self.model, self.plan = hooks, model, plan

    def starfish_heal_started(self, **kwargs: Any) -> None:
        self.hooks.starfish_heal_started(**{**kwargs, "model": self.model, "plan": self.plan})

    def starfish_heal_finished(self, **_kwargs: Any) -> None:
        pass

    def starfish_heal_failed(self, **kwargs: Any) -> None:
        self.hooks.starfish_heal_failed(**{**kwargs, "model": self.model})

    def starfish_step_ended(self, **kwargs: Any) -> None:
        self.hooks.starfish_step_ended(**kwargs)

    def starfish_epoch_ended(self, **kwargs: Any) -> None:
        self.hooks.starfish_epoch_ended(**kwargs)

    def starfish_write_back(self, **_kwargs: Any) -> bool:
        return True


@dataclass
class ShardedRun(HealRun):
    """A ``HealRun`` on the sharded copies; ``user_pruned`` and ``user_plan`` are the model it
    heals and the plan read on it."""

    user_pruned: nn.Module | None = None
    user_plan: SparsityPlan | None = None

    def _kept_tensors(self) -> list[torch.Tensor]:
        """This rank's shards (in place views): the best state and the backup are ``1/world`` each."""
        return [t.to_local() if hasattr(t, "to_local") else t for t in super()._kept_tensors()]

    def _choose_recipe(self, setup: Any, kept: list[torch.Tensor], backup: list[torch.Tensor],
                       state: Any) -> bool:
        if auto_applies(self.config):
            self.notes.append("recipe='auto' did not probe under strategy='fsdp' (its warm starts solve whole "
                              "layers): the paper's recipe is used")
        return False

    def _output_alignment(self, blocks: list[str], candidate: bool, probe_x: Any,
                          probe_out: dict[str, torch.Tensor]) -> tuple[list[str], str | None, list[str]]:
        """Which tensors get a training signal is read on the user's (whole) pruned model."""
        assert self.user_pruned is not None and self.user_plan is not None
        device = next(self.user_pruned.parameters()).device
        outs = {k: v.to(device) for k, v in probe_out.items()}
        return choose_output_alignment(self.user_pruned, self.user_plan, blocks, candidate, probe_x.to(device),
                                       outs, self.config, self.notes)


@dataclass
class FsdpHeal:
    """The sharded heal around a prepared ``HealRun``; ``execute()`` heals and reports."""

    run: HealRun

    def execute(self) -> HealReport:
        run, config = self.run, self.run.config
        check_fsdp(run)
        rank, world = torch_dist.get_rank(), torch_dist.get_world_size()
        fields = {f.name: getattr(run, f.name) for f in dataclasses.fields(run) if f.init}
        s = ShardedRun(**fields, user_pruned=run.pruned, user_plan=run.plan)
        s.device = fsdp_device(run)
        s.dist = DistContext(rank, world, sharded=True)
        s.hooks = _ShadowHooks(run.hooks, run.pruned, run.plan)
        s._check_data()
        self._equal_shards(s)
        params = trainable_parameters(run.pruned, run.plan, config.trainable, s.notes)
        s.params = params
        mask_snapshot = run.plan.snapshot()
        blocks = sorted((b for b in run.choice.names if b != OUTPUT_BLOCK), key=lambda b: -b.count("."))
        with ExitStack() as stack, eval_mode(run.dense), eval_mode(run.pruned), kv_cache_off(run.pruned, run.dense):
            checkpointing = s._checkpointing(stack)  # fingerprints of the user's models, as a joint heal
            s.pruned = sharded_copy(run.pruned, blocks, s.device)
            s.dense = sharded_copy(run.dense, blocks, s.device)
            s.plan = sharded_plan(run.plan, run.pruned, s.pruned)
            s.params = shadow_parameters(params, run.pruned, s.pruned)
            s.notes.append(f"strategy='fsdp': both models sharded with FSDP2 fully_shard over {world} ranks "
                           f"({len(blocks)} block units and the root) on {s.device}")
            with eval_mode(s.dense), eval_mode(s.pruned), kv_cache_off(s.pruned, s.dense):
                targets, target_plan = s.prepare_targets(stack)
                s.train(targets, checkpointing)
            if s.facts.get("returned_state") != "start":
                gather_into(s.pruned, run.pruned, params)
        s.pruned, s.dense, s.plan, s.params, s.hooks = run.pruned, run.dense, run.plan, params, run.hooks
        reread = s.write_back()
        s.facts["strategy"] = "fsdp"
        report = s.build_report(targets, target_plan, reread, mask_snapshot)
        run.hooks.starfish_heal_finished(model=run.pruned, report=report, config=s.config)
        return report

    @staticmethod
    def _equal_shards(s: ShardedRun) -> None:
        """Every forward of a sharded model is a collective: each rank must run the same number of
        batches, so every rank keeps as many training (and held-out) samples as the smallest share."""
        dropped = 0
        for attr in ("data", "held"):
            part = getattr(s, attr)
            if part is None:
                continue
            n = torch.tensor(len(part))
            torch_dist.all_reduce(n, op=torch_dist.ReduceOp.MIN)
            if int(n) < len(part):
                dropped += len(part) - int(n)
                trimmed = part.subset(torch.arange(int(n)))
                trimmed.total = None
                setattr(s, attr, trimmed)
        total = torch.tensor(dropped)
        torch_dist.all_reduce(total)
        if int(total):
            s.notes.append(f"{int(total)} calibration sample(s) left out so that every rank runs as many batches "
                           "(each forward of a sharded model is collective)")
        s.n_total = len(s.data) * s.dist.world
