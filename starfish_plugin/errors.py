"""Errors raised by starfish-plugin. Each names what is wrong and says what to do about it."""

from __future__ import annotations


class StarfishError(Exception):
    """Base class of every starfish-plugin error."""


class ConfigError(StarfishError, ValueError):
    """A ``HealConfig`` field or override has an invalid value."""


class ModelMismatchError(StarfishError, ValueError):
    """The pruned and dense models are not the same architecture, or live on different devices."""


class MaskNotFoundError(StarfishError, ValueError):
    """No adapter recognised any mask in the pruned model."""


class MaskShapeError(StarfishError, ValueError):
    """A mask does not have the shape of the tensor it masks."""


class AdapterError(StarfishError, ValueError):
    """No adapter wrote a healed model back into its toolkit's form."""


class BlockError(StarfishError, ValueError):
    """Blocks could not be discovered, or a named block does not exist."""


class NothingToTrainError(StarfishError, ValueError):
    """Every tensor healing would train is frozen (``requires_grad=False``) or pruned to nothing."""


class CalibrationError(StarfishError, ValueError):
    """The calibration data is empty, malformed or not finite."""


class CalibrationFileError(CalibrationError, OSError):
    """The file that holds calibration inputs on disk (``inputs="disk"``) cannot be written or read."""


class CalibrationTypeError(StarfishError, TypeError):
    """The calibration data has a type or dtype the models cannot take."""


class NonFiniteError(StarfishError, ValueError):
    """A model produced NaN or Inf (dense targets, or the loss during healing)."""


class TargetCacheError(StarfishError, OSError, ValueError):
    """The disk cache of dense targets cannot be written or read (no space, no permission)."""


class CheckpointError(StarfishError, OSError, ValueError):
    """A heal checkpoint is unreadable, or belongs to another heal."""


class CompileError(StarfishError, ValueError):
    """``HealConfig.compile`` cannot be used here: ``torch.compile`` failed on the training forward."""


class NMPatternError(StarfishError, ValueError):
    """A tensor that should be N:M sparse is not."""


class SemiStructuredError(StarfishError, ValueError):
    """A 2:4 sparse kernel cannot take this tensor, or this machine has no such kernel."""


class HealingWarning(UserWarning):
    """Healing finished but made things worse (the mean block cosine fell); the message says why."""


class PrunerError(StarfishError, ValueError):
    """The pruner failed, or left a model that cannot run its forward; the message says how to set it up."""


class ImageFolderError(CalibrationError):
    """An image folder is missing, empty, unreadable or inconsistent."""


class CheckpointFileError(StarfishError, OSError, ValueError):
    """A model file is missing, corrupt, unsafe to load, or for another architecture."""


class StructuredCheckpointError(StarfishError, ValueError):
    """A structured checkpoint does not fit the model it is read onto."""


class UsageError(StarfishError, TypeError):
    """An argument of the wrong kind: not an ``nn.Module``, not a ``HealConfig``, a pruner without ``step()``."""


class AttachError(StarfishError, ValueError):
    """``attach`` / ``track`` used out of order (after the pruner stepped, twice on one pruner)."""


class EvaluationError(StarfishError, ValueError):
    """``evaluate`` cannot score this model on this data (no batches, no classifier head)."""


class DemoError(StarfishError, ValueError):
    """The demo's data or a shipped model's name is not one the demo knows."""


class KernelError(StarfishError, ValueError):
    """A sparse inference kernel cannot be used for a layer, or an inference file does not fit a model."""


class ExportError(StarfishError, ValueError):
    """A model cannot be exported in the format asked for, or an export directory cannot be read."""


class MissingDependencyError(StarfishError, ImportError, ValueError):
    """An optional dependency a feature needs is not installed; the message names the extra."""
