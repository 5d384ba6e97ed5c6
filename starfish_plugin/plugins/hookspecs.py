"""Hook specifications of starfish-plugin. Hooks are always called with keyword arguments."""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("starfish")
hookimpl = pluggy.HookimplMarker("starfish")


# --- adapter hooks --------------------------------------------------------------------------


@hookspec(firstresult=True)
def starfish_find_masks(model, dense):
    """Fires when a model's sparsity must be read (``find_masks``, the start of ``heal``).

    :param model: the pruned ``nn.Module``.
    :param dense: the dense model it was pruned from when known (``heal`` passes it), else ``None``.

    Return a ``SparsityPlan`` if this adapter recognises the model's form, else ``None``.
    Stops at the first non-None result.
    """


@hookspec
def starfish_supported_forms():
    """Fires when no adapter recognised a model, to list what is supported in the error.

    Return a list of short descriptions of the forms this adapter reads.
    All implementations are called; the lists are concatenated.
    """


@hookspec(firstresult=True)
def starfish_write_back(model, plan):
    """Fires after healing, to leave the healed model in its toolkit's own form.

    :param model: the healed ``nn.Module``.
    :param plan: the ``SparsityPlan`` the adapter returned for it.

    Return ``True`` once the model is in its toolkit's form (also when nothing had to change),
    ``None`` if ``plan`` is not this adapter's. Stops at the first non-None result.
    """


@hookspec(firstresult=True)
def starfish_prepare_pruner(pruner, model, dense):
    """Fires when ``starfish.attach`` wraps a pruner, before its first step.

    :param pruner: the pruner being attached.
    :param model: ``pruner.model``.
    :param dense: the dense model given to ``attach``.

    Return a callable ``run(step, *args, **kwargs)`` that performs one pruning step by calling
    ``step`` (the pruner's own method) and records what the adapter needs, or ``None`` if this
    is not your toolkit's pruner. Stops at the first non-None result.
    """


# --- pipeline hook --------------------------------------------------------------------------


@hookspec
def starfish_after_prune(pruner, model, dense, calibration, config, step):
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
def starfish_heal_started(model, plan, config, total_steps):
    """Fires once the inputs are validated and the dense targets are ready, before step one.

    :param model: the pruned model about to be healed.
    :param plan: its ``SparsityPlan``.
    :param config: the effective ``HealConfig``.
    :param total_steps: optimizer steps the heal will take.

    Return value ignored. All implementations are called.
    """


@hookspec
def starfish_step_ended(step, total_steps, config):
    """Fires after every optimizer step (keep implementations cheap; no host sync is done).

    :param step: steps done so far (1-based).
    :param total_steps: steps in the whole heal.
    :param config: the effective ``HealConfig``.

    Return value ignored. All implementations are called.
    """


@hookspec
def starfish_epoch_ended(epoch, epochs, loss, lr, seconds, config):
    """Fires after every epoch.

    :param epoch: epochs done so far (1-based).
    :param epochs: epochs in the whole heal.
    :param loss: mean training loss of the epoch (a float).
    :param lr: learning rate after the epoch's last step.
    :param seconds: wall-clock seconds of the epoch.
    :param config: the effective ``HealConfig``.

    Return value ignored. All implementations are called.
    """


@hookspec
def starfish_heal_failed(model, error, config):
    """Fires when healing stops with an exception after it started (after ``starfish_heal_started``).

    :param model: the pruned model; its trained tensors are already restored when
        ``config.restore_on_error`` is set.
    :param error: the exception, re-raised once every implementation has run.
    :param config: the effective ``HealConfig``.

    Return value ignored. All implementations are called.
    """


@hookspec
def starfish_heal_finished(model, report, config):
    """Fires when a heal has finished and the model is back in its toolkit's form.

    :param model: the healed model.
    :param report: the ``HealReport``.
    :param config: the effective ``HealConfig``.

    Return value ignored. All implementations are called.
    """


HOOK_NAMES: tuple[str, ...] = tuple(name for name in dir() if name.startswith("starfish_"))
__all__ = ["hookspec", "hookimpl", "HOOK_NAMES"]
