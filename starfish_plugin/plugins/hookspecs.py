"""Hook specifications of starfish-plugin. Hooks are always called with keyword arguments."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy
from torch import nn

if TYPE_CHECKING:
    from starfish_plugin.config import HealConfig
    from starfish_plugin.core.plan import SparsityPlan
    from starfish_plugin.report import HealReport

hookspec = pluggy.HookspecMarker("starfish")
hookimpl = pluggy.HookimplMarker("starfish")


# --- adapter hooks --------------------------------------------------------------------------


@hookspec(firstresult=True)
def starfish_find_masks(model: nn.Module, dense: nn.Module | None) -> SparsityPlan | None:
    """Fires when a model's sparsity must be read (``find_masks``, the start of ``heal``).

    :param model: the pruned ``nn.Module``.
    :param dense: the dense model it was pruned from when known (``heal`` passes it), else ``None``.

    Return a ``SparsityPlan`` if this adapter recognises the model's form, else ``None``.
    Stops at the first non-None result.
    """


@hookspec
def starfish_supported_forms() -> list[str]:
    """Fires when no adapter recognised a model, to list what is supported in the error.

    Return a list of short descriptions of the forms this adapter reads.
    All implementations are called; the lists are concatenated.
    """


@hookspec(firstresult=True)
def starfish_write_back(model: nn.Module, plan: SparsityPlan) -> bool | None:
    """Fires after healing, to leave the healed model in its toolkit's own form.

    :param model: the healed ``nn.Module``.
    :param plan: the ``SparsityPlan`` the adapter returned for it.

    Return ``True`` once the model is in its toolkit's form (also when nothing had to change),
    ``None`` if ``plan`` is not this adapter's. Stops at the first non-None result.
    """


@hookspec(firstresult=True)
def starfish_prepare_pruner(
    pruner: Any, model: nn.Module, dense: nn.Module, example: Any, repair: Callable[[int], None]
) -> Callable[..., Any] | None:
    """Fires when ``starfish.attach`` wraps a pruner, before its first step.

    :param pruner: the pruner being attached.
    :param model: ``pruner.model``.
    :param dense: the dense model given to ``attach``.
    :param example: one calibration input as the model takes it (a batch of one), or ``None``;
        an adapter may run it through the model before the first step (Torch-Pruning: to follow
        kept channels through every module, and to tell a model the pruner broke).
    :param repair: ``repair(step)`` runs the ``starfish_repair_pruned`` hooks; an adapter that
        repairs the pruned model after each step calls it after its own repair, before checking
        that the model runs.

    Return a callable ``run(step, *args, **kwargs)`` that performs one pruning step by calling
    ``step`` (the pruner's own method) and records what the adapter needs, or ``None`` if this
    is not your toolkit's pruner. Stops at the first non-None result.
    """


@hookspec
def starfish_repair_pruned(model: nn.Module, pruner: Any, step: int) -> None:
    """Fires after each pruning step of an attached pruner, once the adapter's own repair has run
    (Torch-Pruning's) and before the pruned model is checked and healed: the moment to bring a module of
    your own in line with its pruned parameters (a head count, a width kept as an attribute), as
    Torch-Pruning's examples do by hand after ``pruner.step()``.

    :param model: ``pruner.model``, pruned.
    :param pruner: the pruner that just stepped (Torch-Pruning: its ``num_heads`` are the head
        counts after the step).
    :param step: how many steps this pruner has taken (1 after the first).

    Return value ignored. All implementations are called; change ``model`` in place. If the model
    still cannot run its example input afterwards, attach raises a ``PrunerError`` naming the
    module that fails, and nothing is healed.
    """


# --- model-file hooks: the toolkit-specific parts of saving and loading ------------------------


@hookspec
def starfish_file_formats() -> list[str]:
    """Fires when the CLI lists the pruned-model file formats it can read and write.

    Return the names of the formats this plugin reads (``starfish_load_pruned``) and writes
    (``starfish_save_pruned``). All implementations are called; the lists are concatenated.
    """


@hookspec(firstresult=True)
def starfish_detect_format(obj: Any) -> str | None:
    """Fires when a loaded pruned-model file's format must be guessed (``--pruned-format auto``).

    :param obj: what ``torch.load`` returned.

    Return this plugin's format name if ``obj`` is in it, else ``None``. Stops at the first
    non-None result.
    """


@hookspec(firstresult=True)
def starfish_load_pruned(model: nn.Module, obj: Any, fmt: str, source: str) -> nn.Module | None:
    """Fires to build a pruned model from a loaded file in format ``fmt``.

    :param model: a copy of the dense model (the architecture), to be pruned in place.
    :param obj: what ``torch.load`` returned.
    :param fmt: the format name.
    :param source: where ``obj`` came from, for error messages.

    Return the pruned model if ``fmt`` is this plugin's (raise a ``StarfishError`` naming the
    problem if ``obj`` does not fit ``model``), else ``None``. Stops at the first non-None result.
    """


@hookspec(firstresult=True)
def starfish_save_pruned(model: nn.Module, fmt: str, path: Path) -> bool | None:
    """Fires to write a (healed) pruned model to ``path`` in format ``fmt``.

    Return ``True`` once written if ``fmt`` is this plugin's, else ``None``. Stops at the first
    non-None result.
    """


@hookspec
def starfish_fold_masks(model: nn.Module, state: dict[str, Any]) -> None:
    """Fires when a weights-only copy of ``model`` is made (``plain_state_dict``).

    :param model: the model, not to be changed.
    :param state: its state dict (CPU tensors), to edit in place: replace this toolkit's mask
        reparametrizations (``weight_orig`` + ``weight_mask``, parametrizations) by the plain
        tensor with the pruned entries zero.

    Return value ignored. All implementations are called.
    """


@hookspec
def starfish_remove_masks(model: nn.Module) -> None:
    """Fires to make ``model``'s masks permanent in place (deployment, latency measurements):
    remove this toolkit's prune hooks or parametrizations, keeping the masked weights.

    Return value ignored. All implementations are called.
    """


@hookspec
def starfish_export_state(model: nn.Module) -> dict[str, Any] | None:
    """Fires when a structured (weights-only) file is written: return the entries this adapter
    needs to restore its bookkeeping (plain types and tensors only), or ``None``. All
    implementations are called; the entries are merged into the file.
    """


@hookspec
def starfish_import_state(model: nn.Module, state: dict[str, Any], source: str) -> None:
    """Fires when a structured file has been loaded onto ``model``: restore this adapter's
    bookkeeping from its entries in ``state`` (the whole file), raising a ``StarfishError`` if
    they are malformed. Return value ignored. All implementations are called.
    """


# --- pipeline hook --------------------------------------------------------------------------


@hookspec
def starfish_after_prune(
    pruner: Any, model: nn.Module, dense: nn.Module, calibration: object, config: HealConfig | None, step: int
) -> Any:
    """Fires after a pruner integration (``starfish.attach``) finishes a pruning step.

    :param pruner: the pruner that just stepped.
    :param model: the pruned model.
    :param dense: the dense model it started from (never modified).
    :param calibration: the calibration data given to ``attach``.
    :param config: the ``HealConfig`` given to ``attach`` (or ``None``).
    :param step: how many pruning steps have run so far.

    The built-in implementation heals the model and returns its ``HealReport``; other
    implementations may evaluate, log, or return ``False`` to ask the pipeline to stop.
    All implementations are called; results are returned as a list.
    """


# --- progress hooks -------------------------------------------------------------------------


@hookspec
def starfish_heal_started(model: nn.Module, plan: SparsityPlan, config: HealConfig, total_steps: int) -> None:
    """Fires once the inputs are validated and the dense targets are ready, before step one.

    :param model: the pruned model about to be healed.
    :param plan: its ``SparsityPlan``.
    :param config: the effective ``HealConfig``.
    :param total_steps: optimizer steps the heal will take.

    Return value ignored. All implementations are called.
    """


@hookspec
def starfish_step_ended(step: int, total_steps: int, config: HealConfig) -> None:
    """Fires after every optimizer step (keep implementations cheap; no host sync is done).

    :param step: steps done so far (1-based).
    :param total_steps: steps in the whole heal.
    :param config: the effective ``HealConfig``.

    Return value ignored. All implementations are called.
    """


@hookspec
def starfish_epoch_ended(
    epoch: int, epochs: int, loss: float, lr: float, seconds: float, config: HealConfig, held_out: float | None
) -> None:
    """Fires after every epoch.

    :param epoch: epochs done so far (1-based).
    :param epochs: epochs in the whole heal.
    :param loss: mean training loss of the epoch (a float).
    :param lr: learning rate after the epoch's last step.
    :param seconds: wall-clock seconds of the epoch.
    :param config: the effective ``HealConfig``.
    :param held_out: the healing objective on the held-out samples after the epoch (lower is
        better), or ``None`` when the heal has no held-out judgement.

    Return value ignored. All implementations are called.
    """


@hookspec
def starfish_heal_failed(model: nn.Module, error: BaseException, config: HealConfig) -> None:
    """Fires when healing stops with an exception after it started (after ``starfish_heal_started``).

    :param model: the pruned model; its trained tensors are already restored when
        ``config.restore_on_error`` is set.
    :param error: the exception, re-raised once every implementation has run.
    :param config: the effective ``HealConfig``.

    Return value ignored. All implementations are called.
    """


@hookspec
def starfish_heal_finished(model: nn.Module, report: HealReport, config: HealConfig) -> None:
    """Fires when a heal has finished and the model is back in its toolkit's form.

    :param model: the healed model.
    :param report: the ``HealReport``.
    :param config: the effective ``HealConfig``.

    Return value ignored. All implementations are called.
    """


HOOK_NAMES: tuple[str, ...] = tuple(name for name in dir() if name.startswith("starfish_"))
__all__ = ["hookspec", "hookimpl", "HOOK_NAMES"]
