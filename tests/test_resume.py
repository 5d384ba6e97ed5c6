"""Checkpoint and resume: an interrupted heal resumes after its last completed epoch and reaches
exactly the weights of an uninterrupted one; a checkpoint of another heal is refused."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from helpers import assert_state_equal, l1_prune_, state_copy

import starfish_plugin as starfish
from starfish_plugin import errors
from starfish_plugin.plugins.manager import plugin_manager


class Interrupt:
    """A plugin that stops the heal like a Ctrl-C would, at a given step."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    @starfish.hookimpl
    def starfish_step_ended(self, step, total_steps, config):
        if step == self.at_step:
            raise KeyboardInterrupt


def _interrupted(dense, images, cfg, at_step):
    plugin = Interrupt(at_step)
    plugin_manager().register(plugin)
    model = l1_prune_(copy.deepcopy(dense))
    try:
        with pytest.raises(KeyboardInterrupt):
            starfish.heal(model, dense, images, cfg)
    finally:
        plugin_manager().unregister(plugin)
    return model


@pytest.mark.parametrize("targets", ["memory", "disk"])
def test_resume_reaches_the_weights_of_an_uninterrupted_heal(dense, images, fast, tmp_path, targets):
    cfg = fast.replace(epochs=4, targets=targets, cache_dir=str(tmp_path / "cache"))
    reference = l1_prune_(copy.deepcopy(dense))
    full = starfish.heal(reference, dense, images, cfg)

    resumable = cfg.replace(checkpoint_dir=str(tmp_path / "ckpt"))
    # 64 images, 32 held out: 2 steps per epoch at batch 16; stop in the middle of epoch 3
    model = _interrupted(dense, images, resumable, at_step=5)
    assert_state_equal(model, state_copy(l1_prune_(copy.deepcopy(dense))))  # restored on the interrupt
    report = starfish.heal(model, dense, images, resumable)
    assert report.resumed_after_epoch == 2
    assert report.epoch_losses == full.epoch_losses
    for (name, a), b in zip(reference.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_finished_checkpoint_resumes_to_the_same_result(dense, images, fast, tmp_path):
    cfg = fast.replace(checkpoint_dir=str(tmp_path))
    first = l1_prune_(copy.deepcopy(dense))
    starfish.heal(first, dense, images, cfg)
    second = l1_prune_(copy.deepcopy(dense))
    with pytest.warns(errors.HealingWarning, match="holds a finished heal of this model"):
        report = starfish.heal(second, dense, images, cfg)
    assert report.resumed_after_epoch == 3
    assert "nothing was left to train" in report.summary()  # never silent
    assert_state_equal(second, state_copy(first))
    with pytest.warns(errors.HealingWarning, match="finished heal"):  # the healed model itself: the same
        assert starfish.heal(first, dense, images, cfg).resumed_after_epoch == 3


@pytest.mark.parametrize(
    "change, message",
    [
        ({"lr": 1e-3}, r"other settings \(lr: 0.003 there, 0.001 now\)"),
        ({"epochs": 5}, "epochs: 3 there, 5 now"),
    ],
)
def test_a_checkpoint_with_other_settings_is_refused(dense, images, fast, tmp_path, change, message):
    cfg = fast.replace(checkpoint_dir=str(tmp_path))
    starfish.heal(l1_prune_(copy.deepcopy(dense)), dense, images, cfg)
    model = l1_prune_(copy.deepcopy(dense))
    saved = state_copy(model)
    with pytest.raises(errors.CheckpointError, match=message):
        starfish.heal(model, dense, images, cfg.replace(**change))
    assert_state_equal(model, saved)


def test_a_checkpoint_of_other_models_or_data_is_refused(dense, images, fast, tmp_path):
    cfg = fast.replace(checkpoint_dir=str(tmp_path))
    starfish.heal(l1_prune_(copy.deepcopy(dense)), dense, images, cfg)
    with pytest.raises(errors.CheckpointError, match="another calibration set"):
        starfish.heal(l1_prune_(copy.deepcopy(dense)), dense, images[:48], cfg)
    with pytest.raises(errors.CheckpointError, match="another pruned model"):
        starfish.heal(l1_prune_(copy.deepcopy(dense), 0.5), dense, images, cfg)
    other = copy.deepcopy(dense)
    with torch.no_grad():
        other.head.bias.add_(1)
    with pytest.raises(errors.CheckpointError, match="another dense model"):
        starfish.heal(l1_prune_(copy.deepcopy(other)), other, images, cfg)


def test_a_checkpoint_of_a_model_with_the_same_masks_but_other_weights_is_refused(dense, images, fast, tmp_path):
    cfg = fast.replace(checkpoint_dir=str(tmp_path))
    starfish.heal(l1_prune_(copy.deepcopy(dense)), dense, images, cfg)
    other = l1_prune_(copy.deepcopy(dense))
    with torch.no_grad():  # e.g. fine-tuned before healing: same masks, other surviving values
        other.blocks[0].mlp.fc1.weight_orig.mul_(1.01)
    saved = state_copy(other)
    with pytest.raises(errors.CheckpointError, match="started from other pruned weights"):
        starfish.heal(other, dense, images, cfg)
    assert_state_equal(other, saved)


def test_an_unusable_checkpoint_dir_is_refused_before_training(dense, images, fast, tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    model = l1_prune_(copy.deepcopy(dense))
    saved = state_copy(model)
    for setting in ({"checkpoint_dir": str(not_a_dir)}, {"checkpoint_dir": str(not_a_dir / "sub")},
                    {"cache_dir": str(not_a_dir), "targets": "disk"}, {"cache_dir": str(not_a_dir), "inputs": "disk"}):
        name = next(iter(setting))
        with pytest.raises(errors.ConfigError, match=f"HealConfig.{name} .* cannot hold files: .* is a file, not a "
                                                     "directory; pass a writable directory"):
            starfish.heal(model, dense, images, fast, **setting)
        assert_state_equal(model, saved)
    if os.geteuid() != 0:  # root writes anywhere
        read_only = tmp_path / "read_only"
        read_only.mkdir(mode=0o500)
        with pytest.raises(errors.ConfigError, match="is not writable"):
            starfish.heal(model, dense, images, fast, checkpoint_dir=str(read_only / "ckpt"))


def test_a_corrupt_checkpoint_is_refused_with_the_fix(dense, images, fast, tmp_path):
    (tmp_path / "heal_checkpoint.pt").write_bytes(b"not a checkpoint")
    model = l1_prune_(copy.deepcopy(dense))
    saved = state_copy(model)
    with pytest.raises(errors.CheckpointError, match="unreadable .* delete it to start over"):
        starfish.heal(model, dense, images, fast, checkpoint_dir=str(tmp_path))
    assert_state_equal(model, saved)


@pytest.mark.slow
def test_a_checkpoint_write_that_fails_is_a_clear_error_and_leaves_nothing(tmp_path):
    """A file-size limit (as a full disk would) stops the checkpoint write part-way: the heal ends
    with CheckpointError (also an OSError), the weights are restored, no temporary file is left."""
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    script = textwrap.dedent(f"""
        import copy, resource, signal, sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from helpers import l1_prune_, state_copy, tiny_vit
        import starfish_plugin as starfish
        from starfish_plugin import errors
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
        dense = tiny_vit()
        pruned = l1_prune_(copy.deepcopy(dense))
        before = state_copy(pruned)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            starfish.heal(pruned, dense, torch.randn(64, 1, 8, 8), epochs=2, quiet=True,
                          checkpoint_dir={str(tmp_path)!r})
        except errors.CheckpointError as exc:
            assert isinstance(exc, OSError)
            assert all(torch.equal(v, before[k]) for k, v in pruned.state_dict().items())
            print("REFUSED", exc)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "REFUSED writing the heal checkpoint" in out.stdout, out.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []


def test_resume_keeps_the_probes_choice_and_the_judgement(dense, tmp_path):
    """recipe="auto": the probe runs once; a resumed heal takes its choice from the checkpoint,
    judges alike, and ends with the weights, scores and returned state of an uninterrupted heal."""
    images = torch.randn(256, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    cfg = starfish.HealConfig(epochs=4, batch_size=16, quiet=True, probe_budget=0.9)
    reference = l1_prune_(copy.deepcopy(dense), 0.8)
    full = starfish.heal(reference, dense, images, cfg)
    assert full.recipe_probe["steps"] >= 1
    resumable = cfg.replace(checkpoint_dir=str(tmp_path / "ckpt"))
    plugin = Interrupt(at_step=35)  # 224 training images at batch 16: 14 steps per epoch, so in epoch 3
    plugin_manager().register(plugin)
    model = l1_prune_(copy.deepcopy(dense), 0.8)
    try:
        with pytest.raises(KeyboardInterrupt):
            starfish.heal(model, dense, images, resumable)
    finally:
        plugin_manager().unregister(plugin)
    report = starfish.heal(model, dense, images, resumable)
    assert report.resumed_after_epoch == 2 and report.recipe_probe == {}
    assert any("as the probe chose before the interruption" in n for n in report.notes)
    assert report.config["lr"] == full.config["lr"] and report.config["warm_start"] == full.config["warm_start"]
    assert report.held_out_history == full.held_out_history and report.returned_state == full.returned_state
    for (name, a), b in zip(reference.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_heal_stopped_early_resumes_to_the_same_result(dense, images, fast, tmp_path):
    cfg = fast.replace(lr=3.0, patience=1, epochs=5, checkpoint_dir=str(tmp_path))
    first = l1_prune_(copy.deepcopy(dense))
    report = starfish.heal(first, dense, images, cfg)
    assert report.stopped_early_after == 1 and report.worse_restored
    second = l1_prune_(copy.deepcopy(dense))
    with pytest.warns(errors.HealingWarning, match="finished heal"):
        again = starfish.heal(second, dense, images, cfg)
    assert again.worse_restored and again.held_out_history == report.held_out_history
    assert_state_equal(second, state_copy(first))
