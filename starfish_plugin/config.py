"""``HealConfig``: every setting of a heal, validated before anything is touched."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch

from starfish_plugin.errors import ConfigError, UsageError

BlockSelector = Sequence[str] | Callable[[str, torch.nn.Module], bool] | None
LossName = Literal["cosine", "mse", "kl", "ce", "next_token"]
TargetMode = Literal["auto", "memory", "disk", "online"]
InputMode = Literal["memory", "disk"]
CosineReduction = Literal["auto", "token", "example"]
Trainable = Literal["pruned", "all"]
BlockWeighting = Literal["uniform", "adaptive"]
WarmStart = Literal["none", "row_norm", "lstsq"]
Precision = Literal["auto", "fp32", "bf16"]
AlignOutput = Literal["auto", "always", "never"]
IfWorse = Literal["restore", "warn"]
Recipe = Literal["auto", "paper"]
Strategy = Literal["joint", "sequential", "fsdp"]
SequentialInputs = Literal["pruned", "dense"]
Offload = Literal["none", "disk"]
CompileMode = Literal["none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]

LOSS_NAMES: tuple[str, ...] = get_args(LossName)
TARGET_MODES: tuple[str, ...] = get_args(TargetMode)
INPUT_MODES: tuple[str, ...] = get_args(InputMode)
COSINE_REDUCTIONS: tuple[str, ...] = get_args(CosineReduction)
TRAINABLE: tuple[str, ...] = get_args(Trainable)
BLOCK_WEIGHTINGS: tuple[str, ...] = get_args(BlockWeighting)
WARM_STARTS: tuple[str, ...] = get_args(WarmStart)
PRECISIONS: tuple[str, ...] = get_args(Precision)
ALIGN_OUTPUT: tuple[str, ...] = get_args(AlignOutput)
COMPILE_MODES: tuple[str, ...] = get_args(CompileMode)
IF_WORSE: tuple[str, ...] = get_args(IfWorse)
RECIPES: tuple[str, ...] = get_args(Recipe)
STRATEGIES: tuple[str, ...] = get_args(Strategy)
SEQUENTIAL_INPUTS: tuple[str, ...] = get_args(SequentialInputs)
OFFLOADS: tuple[str, ...] = get_args(Offload)

GROUPS = ("recipe", "storage", "runtime", "reporting")


def _check_int(name: str, value: object, minimum: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        wanted = "an integer" if minimum is None else f"an integer >= {minimum}"
        raise ConfigError(f"HealConfig.{name} must be {wanted}, got {value!r}")


def _check_number(name: str, value: object, positive: bool) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):  # type: ignore[operator]
        raise ConfigError(f"HealConfig.{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")


def _check_device(device: object) -> None:
    if device is None or isinstance(device, torch.device):
        return
    try:
        torch.device(device)  # type: ignore[call-overload]
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(
            f"HealConfig.device {device!r} is not a device torch knows ({exc}); pass e.g. 'cpu', 'cuda', "
            "'cuda:1', a torch.device, or None for the models' device"
        ) from None


def _setting(
    default: Any = dataclasses.MISSING,
    *,
    group: str,
    choices: tuple[str, ...] | None = None,
    resume_neutral: bool = False,
    experimental: bool = False,
    factory: Callable[[], Any] | None = None,
) -> Any:
    """A ``HealConfig`` field with what the rest of the package reads about it: its group, the
    values it takes (validation and the CLI use them), whether a resumed heal may change it
    (``resume_neutral``), and whether it is experimental."""
    metadata = {"group": group, "choices": choices, "resume_neutral": resume_neutral, "experimental": experimental}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True, kw_only=True)
class HealConfig:
    """Settings of one STARFISH heal. Defaults follow the paper. Frozen: ``replace`` (or
    ``heal(..., **overrides)``) makes a changed copy, validated. Fields come in four groups
    (``HealConfig.groups()``): the recipe, where data is kept, how it runs, what it reports.

    Args:
        recipe: ``"auto"`` (default): when ``lr`` and ``warm_start`` are left at the paper's
            values, a short probe chooses them by measurement on the held-out samples: the
            ``row_norm`` warm start is scored against none, then each learning rate of 6e-4, 2e-3
            and 4e-3 trains a few steps from the better start (or, on a small budget, one step is
            scaled to each: a line search); the winner heals. The probe costs about
            ``probe_budget`` of the heal; the report lists what it tried
            (``HealReport.recipe_probe``). ``"paper"``: exactly the fields as given.
        epochs: passes over the calibration set (paper: 10; 5 for large models). ``0`` with a
            warm start: the warm start alone, judged like any state (``warm_start="lstsq",
            epochs=0`` is closed-form recovery with no training).
        lr: peak AdamW learning rate, decayed per step by a cosine schedule to ``min_lr``.
        min_lr: final learning rate of the cosine schedule.
        batch_size: calibration images per optimizer step.
        weight_decay: AdamW weight decay (0 by default, as in the paper).
        loss: ``"cosine"`` (STARFISH), ``"mse"``, ``"kl"``, ``"ce"`` (labels needed),
            ``"next_token"`` (language models: cross-entropy of each next token of the calibration
            text itself, padding left out; a baseline, since text labels itself), a mixture such as
            ``"cosine+kl"`` (equal weights) or a mapping ``{"cosine": 1.0, "kl": 0.5}``.
        blocks: block names, a predicate ``(name, module) -> bool``, or ``None`` to discover them.
        targets: ``"auto"`` (memory if the cache fits ``target_memory_budget``, else disk if it has
            room, else online), ``"memory"`` (fp16 cache of dense block outputs in RAM), ``"disk"``
            (the same cache in files, read per batch; RAM stays flat) or ``"online"`` (a dense
            forward every step).
        inputs: ``"memory"`` (calibration inputs gathered into one tensor) or ``"disk"`` (each
            batch checked and appended to a file, read back per batch, removed after the heal:
            RAM does not grow with the calibration set when it comes as a Dataset, DataLoader
            or generator of batches).
        cache_dir: where a disk cache lives (and, with ``inputs="disk"``, the inputs' file). A cache
            built there for the same dense model, calibration set and blocks is reused (e.g. on
            resume); any other is rebuilt. ``None``: a temporary directory, removed after the heal.
        checkpoint_dir: if set, the heal's state is saved there after every epoch, and a heal
            started with the same settings, models and calibration set resumes from it (reaching
            the same weights as an uninterrupted run); a checkpoint of another heal is refused.
        device: where healing runs; both models must already be there. ``None``: the models' device.
        seed: seeds the calibration shuffle.
        cosine_reduction: ``"auto"`` (per token for ``[B, T, D]``, per example otherwise),
            ``"token"`` or ``"example"``.
        kl_temperature: softmax temperature of the ``kl`` term.
        target_memory_budget: bytes the in-memory target cache may take under ``targets="auto"``.
        offload: ``"none"`` (default); ``"disk"``, under ``strategy="sequential"``: the dense
            model's blocks wait in files in ``cache_dir`` (or a temporary directory) and are mapped
            back only while they run, and the backup of the starting weights is kept on disk, so
            the heal holds the pruned model and one dense block instead of both models. The dense
            model comes back as it was when the heal ends (the same tensors, bit-identical values);
            do not use it elsewhere meanwhile.
        diagnostic_samples: with ``holdout=0``, the training samples every state is judged on
            (0 switches the judgement off).
        train_mode: heal with the pruned model in ``train()`` mode (dropout, batch-norm updates);
            by default it heals in ``eval()`` mode so that every frozen buffer stays frozen.
        quiet: silence the default progress bar and per-epoch lines.
        restore_on_error: if healing fails part-way (e.g. the loss turns NaN), put the trainable
            weights back as they were before healing (buffers such as batch-norm statistics too).
        holdout: fraction of the calibration samples held out of training to judge every state
            on (at least 32 samples, or half of a set under 64; split by ``seed``). The healing
            objective and the final output's cosine to the dense model are measured there before
            healing, after the warm start and after every epoch. ``0``: judged on the first
            ``diagnostic_samples`` training samples instead.
        if_worse: ``"restore"`` (default): the heal returns the best judged state, one that
            lowers the held-out objective without moving the final output further from the dense
            model's; if none does, the pruned weights come back bit for bit (the report says
            which). ``"warn"``: the last state stays, with a ``HealingWarning`` if it is worse.
        patience: stop after this many epochs in a row without a better held-out state
            (``None``: run every epoch; the cosine schedule needs its tail).
        probe_budget: the share of the heal's cost ``recipe="auto"`` may spend probing (counted in
            sample forward passes); ``0`` skips the probe and heals with the paper's recipe.
        block_weighting: ``"uniform"`` (the paper: every block's term counts the same) or
            ``"adaptive"`` (each block's term weighted by its current mismatch, the paper's
            suggested next step; experimental, see the recovery benchmark).
        local_blocks: each block learns from its own output's loss only: every block's output
            reaches the next block detached, so a block's weights are fitted to reproduce the dense
            block's output from the pruned model's input to it (block-wise reconstruction as EBFT
            does it with ``loss="mse"``, here trained jointly rather than one block after another).
            ``False`` (the paper): every block's loss trains every weight before it.
        warm_start: ``"none"`` (the paper); ``"row_norm"``: before training, scale each output
            row of every pruned Linear/Conv weight so its output norm on calibration inputs
            matches the dense row's; ``"lstsq"``: solve each pruned layer's surviving weights in
            closed form (masked ridge regression from the layer's inputs in the pruned model to
            the dense layer's outputs, block by block; ``core/lstsq.py``).
        warm_start_samples: calibration samples the warm start measures on.
        precision: ``"bf16"``: the pruned model's forward under bf16 autocast (weights, optimizer
            and losses stay fp32); ``"fp32"``; ``"auto"``: bf16 on CUDA devices that support it,
            fp32 elsewhere (the recovery benchmark's bf16 rows: same accuracy as fp32).
        compile: ``"none"`` (eager), or a ``torch.compile`` mode (``"default"``, ``"max-autotune"``, ...):
            the pruned model's training forward (block-output hooks and autocast included) is
            compiled on its first batch; the diagnostics stay eager. Compiling takes time up front
            (tens of seconds) and pays off on long heals of big models.
        compile_backend: the ``torch.compile`` backend: a registered name (``"inductor"``;
            ``"aot_eager"`` needs no C++ compiler) or a backend callable.
        gradient_checkpointing: recompute each block's activations in the backward pass instead of
            keeping them (``torch.utils.checkpoint``): less memory for long sequences or large
            batches, about one more forward per step; the weights reached are the same.
        align_output: ``"auto"`` aligns the model's final output (its logits) as one more block
            when some pruned weights get no training signal from the blocks (a pruned classifier
            head after the last block); ``"always"``; ``"never"``.
        trainable: ``"pruned"`` trains the surviving entries of the pruned tensors (the paper);
            ``"all"`` trains every parameter (masked entries still held at zero).
        strategy: ``"joint"`` (default): every block trains at once, each block's loss reaching
            every weight before it (the paper). ``"sequential"``: one block at a time, each healed
            as a model of its own from the inputs that reach it (judged, probed, checkpointed like
            a heal), so gradients and optimizer state exist for one block only; the whole model is
            judged before and after, and comes back unchanged if it got worse. Block losses only
            (``cosine``, ``mse``); pruned tensors outside the blocks heal last, the blocks frozen.
            ``"fsdp"`` (under ``torchrun``): a joint heal on copies of both models sharded with
            PyTorch's FSDP2 ``fully_shard`` (one unit per block), so each rank holds its share of
            the weights, gradients and AdamW state on ``device``; the healed full weights are
            gathered back into the pruned model on every rank. The recipe probe and warm starts
            (which solve whole layers) are not run: the paper's recipe.
        sequential_inputs: under ``strategy="sequential"``, what each block is fed: ``"pruned"``
            (default): the outputs of the healed pruned blocks before it, so later blocks learn to
            correct what earlier ones could not; ``"dense"``: the dense model's inputs to it.
    """

    # recipe: what is trained, and how (changing any of these makes a different heal)
    recipe: Recipe = _setting("auto", group="recipe", choices=RECIPES)
    epochs: int = _setting(10, group="recipe")
    lr: float = _setting(6e-4, group="recipe")
    min_lr: float = _setting(1e-6, group="recipe")
    batch_size: int = _setting(32, group="recipe")
    weight_decay: float = _setting(0.0, group="recipe")
    loss: str | Mapping[str, float] = _setting("cosine", group="recipe")
    blocks: BlockSelector = _setting(None, group="recipe")
    seed: int = _setting(0, group="recipe")
    cosine_reduction: CosineReduction = _setting("auto", group="recipe", choices=COSINE_REDUCTIONS)
    kl_temperature: float = _setting(1.0, group="recipe")
    trainable: Trainable = _setting("pruned", group="recipe", choices=TRAINABLE)
    align_output: AlignOutput = _setting("auto", group="recipe", choices=ALIGN_OUTPUT)
    block_weighting: BlockWeighting = _setting("uniform", group="recipe", choices=BLOCK_WEIGHTINGS, experimental=True)
    local_blocks: bool = _setting(False, group="recipe")
    warm_start: WarmStart = _setting("none", group="recipe", choices=WARM_STARTS)
    warm_start_samples: int = _setting(256, group="recipe")
    train_mode: bool = _setting(False, group="recipe")
    precision: Precision = _setting("auto", group="recipe", choices=PRECISIONS)
    holdout: float = _setting(0.1, group="recipe")
    patience: int | None = _setting(None, group="recipe")
    probe_budget: float = _setting(0.15, group="recipe")
    strategy: Strategy = _setting("joint", group="recipe", choices=STRATEGIES)
    sequential_inputs: SequentialInputs = _setting("pruned", group="recipe", choices=SEQUENTIAL_INPUTS)
    # storage: where calibration inputs, dense targets and checkpoints are kept
    targets: TargetMode = _setting("auto", group="storage", choices=TARGET_MODES, resume_neutral=True)
    inputs: InputMode = _setting("memory", group="storage", choices=INPUT_MODES, resume_neutral=True)
    cache_dir: str | None = _setting(None, group="storage", resume_neutral=True)
    checkpoint_dir: str | None = _setting(None, group="storage", resume_neutral=True)
    target_memory_budget: int = _setting(2 * 1024**3, group="storage", resume_neutral=True)
    offload: Offload = _setting("none", group="storage", choices=OFFLOADS, resume_neutral=True)
    # runtime: where and how it runs (the weights it reaches do not depend on these)
    device: str | torch.device | None = _setting(None, group="runtime", resume_neutral=True)
    compile: CompileMode = _setting("none", group="runtime", choices=COMPILE_MODES, resume_neutral=True)
    compile_backend: str | Callable[..., Any] = _setting("inductor", group="runtime", resume_neutral=True)
    gradient_checkpointing: bool = _setting(False, group="runtime", resume_neutral=True)
    restore_on_error: bool = _setting(True, group="runtime", resume_neutral=True)
    if_worse: IfWorse = _setting("restore", group="runtime", choices=IF_WORSE, resume_neutral=True)
    # reporting: what it measures and prints
    diagnostic_samples: int = _setting(512, group="reporting", resume_neutral=True)
    quiet: bool = _setting(False, group="reporting", resume_neutral=True)

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def groups(cls) -> dict[str, list[str]]:
        """Field names by group: ``recipe``, ``storage``, ``runtime``, ``reporting``."""
        out: dict[str, list[str]] = {g: [] for g in GROUPS}
        for f in dataclasses.fields(cls):
            out[f.metadata["group"]].append(f.name)
        return out

    @classmethod
    def resume_neutral(cls) -> frozenset[str]:
        """Fields a resumed heal may change (storage, runtime, reporting): they do not change the
        weights an uninterrupted heal reaches."""
        return frozenset(f.name for f in dataclasses.fields(cls) if f.metadata["resume_neutral"])

    @classmethod
    def choices(cls, name: str) -> tuple[str, ...] | None:
        """The values field ``name`` takes, if it is a choice."""
        return next(f.metadata["choices"] for f in dataclasses.fields(cls) if f.name == name)

    def replace(self, **overrides: Any) -> HealConfig:
        """Return a copy with ``overrides`` applied; unknown names raise ``ConfigError``."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"unknown HealConfig field(s) {unknown}; known fields: {sorted(known)}")
        return dataclasses.replace(self, **overrides)

    def loss_terms(self) -> dict[str, float]:
        """The loss as ``{name: weight}``, e.g. ``"cosine+kl"`` -> ``{"cosine": 1.0, "kl": 1.0}``."""
        if isinstance(self.loss, str):
            names = [part.strip() for part in self.loss.split("+")]
            terms = {name: 1.0 for name in names}
            if len(terms) != len(names):
                raise ConfigError(f"loss {self.loss!r} names a term twice")
        elif isinstance(self.loss, Mapping):
            for key, weight in self.loss.items():
                if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                    raise ConfigError(f"loss weight of {key!r} must be a number, got {weight!r}")
            terms = {str(k): float(v) for k, v in self.loss.items()}
        else:
            raise ConfigError(f"loss must be a string like 'cosine+kl' or a mapping, got {type(self.loss).__name__}")
        bad = [name for name in terms if name not in LOSS_NAMES]
        if bad or not terms:
            raise ConfigError(f"unknown loss term(s) {bad} in {self.loss!r}; choose from {list(LOSS_NAMES)}")
        if any(not 0 <= w < math.inf for w in terms.values()) or not any(w > 0 for w in terms.values()):
            raise ConfigError(f"loss weights must be finite and >= 0 with at least one > 0, got {terms}")
        if terms.get("ce", 0) > 0 and terms.get("next_token", 0) > 0:
            raise ConfigError(f"loss {self.loss!r} mixes 'ce' (a classifier's labels) and 'next_token' (a language "
                              "model's own tokens); they cannot be mixed: keep one")
        return terms

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the first invalid field and the values it accepts."""
        for name in ("batch_size", "warm_start_samples"):
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("epochs", self.epochs, minimum=0)
        if self.epochs == 0 and self.warm_start == "none":
            raise ConfigError(
                "HealConfig.epochs=0 heals with the warm start alone, and warm_start is 'none'; pass "
                "warm_start='lstsq' (closed-form recovery) or 'row_norm', or epochs >= 1"
            )
        for name in ("lr", "min_lr", "kl_temperature"):
            _check_number(name, getattr(self, name), positive=True)
        if self.min_lr > self.lr:
            raise ConfigError(f"HealConfig.min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        _check_number("weight_decay", self.weight_decay, positive=False)
        _check_int("seed", self.seed, minimum=None)
        _check_int("diagnostic_samples", self.diagnostic_samples, minimum=0)
        _check_number("target_memory_budget", self.target_memory_budget, positive=False)
        for name in ("train_mode", "quiet", "restore_on_error", "local_blocks"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"HealConfig.{name} must be True or False, got {getattr(self, name)!r}")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices is not None and getattr(self, f.name) not in choices:
                raise ConfigError(f"HealConfig.{f.name} must be one of {choices}, got {getattr(self, f.name)!r}")
        for name in ("cache_dir", "checkpoint_dir"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise ConfigError(f"HealConfig.{name} must be a directory path (str or Path) or None, got {value!r}")
        _check_device(self.device)
        self._check_compile()
        self._check_blocks()
        _check_number("holdout", self.holdout, positive=False)
        if self.holdout > 0.5:
            raise ConfigError(f"HealConfig.holdout must be a fraction in [0, 0.5], got {self.holdout!r}")
        _check_number("probe_budget", self.probe_budget, positive=False)
        if self.probe_budget >= 1:
            raise ConfigError(f"HealConfig.probe_budget must be a fraction in [0, 1), got {self.probe_budget!r}")
        if self.patience is not None:
            _check_int("patience", self.patience, minimum=1)
        if self.if_worse == "restore" and self.holdout == 0 and self.diagnostic_samples == 0:
            raise ConfigError(
                "HealConfig.if_worse='restore' judges each state on held-out samples, which holdout=0 with "
                "diagnostic_samples=0 switches off; pass holdout > 0 (e.g. 0.1) or if_worse='warn'"
            )
        self.loss_terms()

    def _check_compile(self) -> None:
        if not isinstance(self.compile_backend, str) and not callable(self.compile_backend):
            raise ConfigError(
                f"HealConfig.compile_backend must be a backend name or callable, got {self.compile_backend!r}"
            )
        if self.compile != "none" and not callable(self.compile_backend):
            from torch._dynamo import list_backends

            backends = list_backends(exclude_tags=())
            if self.compile_backend not in backends:
                raise ConfigError(
                    f"HealConfig.compile_backend {self.compile_backend!r} is not a torch.compile backend; "
                    f"choose from {sorted(backends)}"
                )

    def _check_blocks(self) -> None:
        if self.blocks is not None and not callable(self.blocks):
            if isinstance(self.blocks, str) or not all(isinstance(b, str) for b in self.blocks):
                raise ConfigError(
                    "HealConfig.blocks must be a list of module names or a predicate (name, module) -> bool"
                )
            if len(self.blocks) == 0:
                raise ConfigError("HealConfig.blocks is an empty list; name at least one block or pass None")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly view (a predicate ``blocks`` is shown by its name)."""
        out = dataclasses.asdict(self)
        if callable(self.blocks):
            out["blocks"] = getattr(self.blocks, "__name__", repr(self.blocks))
        elif self.blocks is not None:
            out["blocks"] = list(self.blocks)
        if callable(self.compile_backend):
            out["compile_backend"] = getattr(self.compile_backend, "__name__", repr(self.compile_backend))
        out["device"] = None if self.device is None else str(self.device)
        out["cache_dir"] = None if self.cache_dir is None else str(self.cache_dir)
        out["checkpoint_dir"] = None if self.checkpoint_dir is None else str(self.checkpoint_dir)
        out["loss"] = self.loss if isinstance(self.loss, str) else dict(self.loss)
        return out


def resolve_config(config: HealConfig | None, overrides: dict[str, Any]) -> HealConfig:
    """``config`` (or the defaults) with ``overrides`` applied and validated."""
    if config is None:
        config = HealConfig()
    elif not isinstance(config, HealConfig):
        raise UsageError(f"config must be a starfish.HealConfig, got {type(config).__name__}")
    if overrides:
        return config.replace(**overrides)
    config.validate()  # cheap, and catches a config changed with object.__setattr__
    return config
