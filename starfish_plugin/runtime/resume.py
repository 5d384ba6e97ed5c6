"""Checkpoint and resume: the heal's state after each completed epoch, and the check that a
checkpoint belongs to this heal (same settings, dense model, calibration set and pruned model)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from starfish_plugin.config import HealConfig
from starfish_plugin.errors import CheckpointError
from starfish_plugin.runtime.atomic import write_atomically
from starfish_plugin.runtime.fingerprint import weights_fingerprint

VERSION = 2  # 2: the held-out judgement (best state, scores) travels with the optimizer state
# Settings that change nothing the optimizer computes (compiling: only float rounding); a checkpoint
# resumes across them.


def settings_of(config_dict: dict[str, Any]) -> dict[str, Any]:
    """The settings a checkpoint must share with the heal that resumes it."""
    neutral = HealConfig.resume_neutral()  # marked on the fields themselves
    return {k: v for k, v in sorted(config_dict.items()) if k not in neutral}


@dataclass
class HealState:
    """What a checkpoint holds: enough to continue the optimizer loop exactly."""

    epoch: int
    epoch_losses: list[float]
    params: list[torch.Tensor]
    optimizer: dict
    scheduler: dict
    generator: torch.Tensor
    settings: dict[str, Any] = field(default_factory=dict)
    fingerprint: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # the epoch hook's state (held-out judgement)


def checkpoint_path(directory: str | os.PathLike, rank: int = 0, world: int = 1) -> Path:
    """``heal_checkpoint.pt``, or one file per rank under torch.distributed."""
    name = "heal_checkpoint.pt" if world == 1 else f"heal_checkpoint_rank{rank}-of-{world}.pt"
    return Path(directory) / name


def save_state(path: Path, state: HealState) -> None:
    """Write ``state`` atomically (a crash mid-write leaves the previous checkpoint intact); a write
    that fails (disk full, file-size limit, no permission) is a ``CheckpointError`` and leaves no
    temporary file behind."""
    payload = {
        "version": VERSION, "epoch": state.epoch, "epoch_losses": state.epoch_losses,
        "params": [p.detach().cpu() for p in state.params], "optimizer": state.optimizer,
        "scheduler": state.scheduler, "generator": state.generator, "settings": state.settings,
        "fingerprint": state.fingerprint, "extra": state.extra,
    }
    write_atomically(path, lambda tmp: torch.save(payload, tmp), lambda reason: CheckpointError(
        f"writing the heal checkpoint {path} failed ({reason}); free space there or pass another "
        "HealConfig.checkpoint_dir (the weights were restored when restore_on_error is set)"
    ))


def load_state(path: Path, settings: dict[str, Any], fingerprint: dict[str, str]) -> HealState | None:
    """The checkpoint at ``path`` if there is one; ``CheckpointError`` if it belongs to another heal."""
    if not path.exists():
        return None
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the file is unusable
        raise CheckpointError(
            f"the heal checkpoint {path} is unreadable (truncated, or not written by starfish: "
            f"{type(exc).__name__}); delete it to start over"
        ) from exc
    if not isinstance(raw, dict) or raw.get("version") != VERSION:
        raise CheckpointError(f"{path} is not a starfish heal checkpoint of format {VERSION}; delete it to start over")
    theirs = raw["settings"]
    changed = sorted(k for k in set(theirs) | set(settings) if theirs.get(k) != settings.get(k))
    if changed:
        detail = ", ".join(f"{k}: {theirs.get(k)!r} there, {settings.get(k)!r} now" for k in changed)
        raise CheckpointError(
            f"the heal checkpoint {path} was written with other settings ({detail}); resume with the same "
            "settings, or delete it / pass another checkpoint_dir to start over"
        )
    differ = [k for k in fingerprint if raw["fingerprint"].get(k) != fingerprint[k]]
    if differ == ["pruned weights"] and weights_fingerprint(raw["params"]) == fingerprint["pruned weights"]:
        differ = []  # the model holds the checkpoint's own weights (healed in this process already)
    if differ == ["pruned weights"]:
        raise CheckpointError(
            f"the heal checkpoint {path} belongs to a heal that started from other pruned weights (same masks, "
            "different values), or the weights changed since (a failed heal with restore_on_error=False); "
            "delete it or pass another checkpoint_dir to heal this model"
        )
    if differ:
        raise CheckpointError(
            f"the heal checkpoint {path} belongs to a heal of another {' and '.join(differ)}; resume with the "
            "same models and calibration set, or delete it / pass another checkpoint_dir to start over"
        )
    return HealState(raw["epoch"], list(raw["epoch_losses"]), raw["params"], raw["optimizer"], raw["scheduler"],
                     raw["generator"], theirs, raw["fingerprint"], raw.get("extra", {}))
