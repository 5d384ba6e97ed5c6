"""``attach``: heal after every ``pruner.step()`` through the ``starfish_after_prune`` hook."""

from __future__ import annotations

import functools
import inspect
import warnings
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from starfish_plugin.config import HealConfig, resolve_config
from starfish_plugin.core.validation import check_models
from starfish_plugin.errors import AttachError, HealingWarning, UsageError
from starfish_plugin.plugins.manager import plugin_manager
from starfish_plugin.report import HealReport


class Attachment:
    """The handle ``attach`` returns: what healing did so far, and ``detach()``.

    Attributes:
        reports: one ``HealReport`` per pruning step.
        results: every hook result of every step (your own implementations' included).
        stop_requested: ``True`` once any ``starfish_after_prune`` implementation returned ``False``.
        pending_error: the error of a heal run when an interactive loop was left early, until
            ``check()`` or the next ``step()`` raises it.
    """

    def __init__(self, pruner: Any, model: nn.Module, dense: nn.Module, calibration: object, config) -> None:
        self.pruner, self.model, self.dense = pruner, model, dense
        self.calibration, self.config = calibration, config
        self.steps = 0
        self.reports: list[HealReport] = []
        self.results: list[list[Any]] = []
        self.stop_requested = False
        self.pending_error: BaseException | None = None
        self._open_groups: weakref.ref[_HealingGroups] | None = None  # the last interactive step's groups
        self._instance_step = pruner.__dict__.get("step")  # a step set on the instance, if any
        # an adapter may take over running each step (e.g. to record which channels survive)
        self._runner = plugin_manager().hook.starfish_prepare_pruner(
            pruner=pruner, model=model, dense=dense, example=_first_input(calibration), repair=self._user_repair
        )
        self._wrapper = self._wrap(pruner.step)
        pruner.step = self._wrapper

    def _user_repair(self, step: int) -> None:
        """The ``starfish_repair_pruned`` hooks, for an adapter to call after its own repair."""
        plugin_manager().hook.starfish_repair_pruned(model=self.model, pruner=self.pruner, step=step)

    def _after_step(self) -> None:
        self.steps += 1
        results = plugin_manager().hook.starfish_after_prune(
            pruner=self.pruner,
            model=self.model,
            dense=self.dense,
            calibration=self.calibration,
            config=self.config,
            step=self.steps,
        )
        self.results.append(results)
        self.reports += [r for r in results if isinstance(r, HealReport)]
        self.stop_requested = self.stop_requested or any(r is False for r in results)

    def _wrap(self, step):
        @functools.wraps(step)
        def wrapped(*args: Any, **kwargs: Any):
            self.check()  # a heal that failed after an early break surfaces here at the latest
            result = self._runner(step, *args, **kwargs) if self._runner else step(*args, **kwargs)
            if inspect.isgenerator(result):  # interactive pruning: heal once the groups are applied
                return self._heal_after(result)
            self._after_step()
            return result

        wrapped.__starfish_attachment__ = self  # type: ignore[attr-defined]
        return wrapped

    def _heal_after(self, groups: Any) -> _HealingGroups:
        healing = _HealingGroups(groups, self)
        self._open_groups = weakref.ref(healing)
        return healing

    def _heal_left_open(self) -> None:
        """Heal the groups of an earlier interactive step that the caller still holds, unused up."""
        groups = self._open_groups() if self._open_groups is not None else None
        self._open_groups = None
        if groups is not None and not groups.done:
            warnings.warn(
                "the groups of an interactive pruner.step() were left before they were used up and are still "
                "referenced, so they were not healed at the break: healed now. To heal right at the break, write "
                "`with pruner.step(interactive=True) as groups:` or call groups.close()", HealingWarning, stacklevel=3,
            )
            groups.close()

    def check(self) -> None:
        """Heal an interactive step whose groups were left early but are still held (with a
        ``HealingWarning``); raise the error of a heal that ran when such a loop was left early (its
        generator closed by garbage collection, where Python cannot raise it); then forget it."""
        self._heal_left_open()
        if self.pending_error is not None:
            error, self.pending_error = self.pending_error, None
            raise error

    @property
    def attached(self) -> bool:
        return self.pruner.__dict__.get("step") is self._wrapper

    def detach(self) -> None:
        """Restore the pruner's own ``step``; healing no longer follows it.

        Raises:
            ValueError: another ``attach`` wrapped the pruner after this one; detach that one first.
        """
        current = self.pruner.__dict__.get("step")
        if current is not self._wrapper:
            if current is not None and current is not self._instance_step:
                raise AttachError("another attach() wrapped this pruner after this one; detach that handle first")
            return  # already detached
        if self._instance_step is None:
            del self.pruner.__dict__["step"]
        else:
            self.pruner.step = self._instance_step


class _HealingGroups:
    """The groups of an interactive pruning step; healing runs when they are used up, when
    ``close()`` is called or a ``with`` block around them ends, or when a loop left early drops
    them (then a failed heal's error is kept for ``Attachment.check()`` and the next ``step()``,
    since Python could only print it). Groups the caller still holds after leaving the loop early
    are healed by the next ``step()`` or ``check()``, with a ``HealingWarning``."""

    def __init__(self, groups: Any, attachment: Attachment) -> None:
        self.groups, self.attachment, self.done = groups, attachment, False

    def __iter__(self) -> _HealingGroups:
        return self

    def __enter__(self) -> _HealingGroups:
        return self

    def __exit__(self, kind: Any, error: Any, trace: Any) -> None:
        if kind is None:
            self.close()  # heal here, at the end of the block, however the loop inside ended
        else:
            self.done = True  # the body's own error is the one to see; the step is not healed
            self.groups.close()

    def __next__(self) -> Any:
        try:
            return next(self.groups)
        except StopIteration:
            self._heal()
            raise
        except BaseException:
            self.done = True  # the pruner's own error: nothing to heal, and its error is the one to see
            raise

    def close(self) -> None:
        self.groups.close()
        self._heal()

    def _heal(self) -> None:
        if not self.done:
            self.done = True
            self.attachment._after_step()

    def __del__(self) -> None:
        if self.done:
            return
        try:
            self.groups.close()
            self._heal()
        except BaseException as exc:  # noqa: BLE001 - kept and raised later, in the caller's code
            self.attachment.pending_error = exc
            warnings.warn(f"healing after an interrupted interactive step failed: {exc!r}; it is raised again "
                          "by the next pruner.step() or handle.check()", RuntimeWarning, stacklevel=2)


def attach(
    pruner: Any, dense: nn.Module, calibration: object, config: HealConfig | None = None, **overrides: Any
) -> Attachment:
    """Heal ``pruner.model`` after every ``pruner.step()``.

    Each step fires ``starfish_after_prune``; the built-in implementation runs ``heal`` with
    ``config``, and your own ``@starfish.hookimpl`` implementations run beside it.

    Args:
        pruner: an object with ``.model`` and ``.step()`` (a ``torch.ao.pruning`` sparsifier,
            a Torch-Pruning pruner).
        dense: the model before pruning; never modified.
        calibration: calibration data, as for ``heal``.
        config: a ``HealConfig`` for every heal; ``overrides`` replace single fields
            (``epochs=3``), as in ``heal``.

    Returns:
        An ``Attachment``; call ``.detach()`` to stop healing after steps.

    With a Torch-Pruning pruner, one calibration input is run through the model before it is pruned:
    kept channels are then known at the output of every module (concatenations such as DenseNet's,
    pooling layers of a plain ``Sequential``), and ``pruner.step()`` raises
    ``starfish_plugin.errors.PrunerError``, before any healing, when Torch-Pruning fails or leaves a
    model that no longer runs that input; the message says how to set the pruner up.

    Example:
        >>> handle = starfish.attach(sparsifier, dense, images)
        >>> sparsifier.step()          # prunes, then heals
        >>> handle.reports[-1].mask_unchanged
        True
    """
    if not callable(getattr(pruner, "step", None)):
        raise UsageError(f"attach() needs a pruner with a step() method, got {type(pruner).__name__}")
    model = getattr(pruner, "model", None)
    if not isinstance(model, nn.Module):
        raise UsageError(
            f"{type(pruner).__name__} has no .model to heal; for a torch.ao sparsifier call "
            "sparsifier.prepare(model, config) before attach()"
        )
    check_models(model, dense)
    if getattr(pruner.step, "__starfish_attachment__", None) is not None:
        raise AttachError(
            f"this {type(pruner).__name__} is already attached (each step would heal twice); use the first "
            "handle, or call its detach() before attaching again"
        )
    if isinstance(calibration, Iterator):
        raise UsageError(
            f"attach() heals after every pruning step and reads the calibration set each time, but a "
            f"{type(calibration).__name__} can be read only once; pass a tensor, list of batches, Dataset or "
            "DataLoader (e.g. list(batches))"
        )
    if config is not None or overrides:
        config = resolve_config(config, overrides)
    return Attachment(pruner, model, dense, calibration, config)


def _first_input(calibration: object) -> Any:
    """One calibration input as the model takes it (a batch of one), or ``None`` when it cannot be
    taken without consuming the data (a generator) or is of a form not recognised here."""

    def inputs_of(item: object, batched: bool) -> Any:
        if isinstance(item, (tuple, list)) and item:
            item = item[0]  # (inputs, labels)
        if isinstance(item, Mapping):
            item = {k: v for k, v in item.items() if k not in ("labels", "label")}
            if all(isinstance(v, torch.Tensor) for v in item.values()) and item:
                return {k: v[:1] if batched else v.unsqueeze(0) for k, v in item.items()}
            return None
        if isinstance(item, torch.Tensor) and item.dim() >= 1:
            return item[:1] if batched else item.unsqueeze(0)
        return None

    try:
        if isinstance(calibration, (torch.Tensor, Mapping)):
            return inputs_of(calibration, True)
        if isinstance(calibration, Dataset) and not isinstance(calibration, IterableDataset):
            return inputs_of(calibration[0], False) if len(calibration) else None  # type: ignore[arg-type]
        if isinstance(calibration, DataLoader) or isinstance(calibration, (list, tuple)):
            return inputs_of(next(iter(calibration)), True)
    except Exception:  # noqa: BLE001 - the heal itself reports unusable calibration data
        return None
    return None  # generators and other one-pass iterables are left for the heal to read
