"""Concurrent heals sharing a ``cache_dir`` or a ``checkpoint_dir``, in real processes."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import assert_state_equal, l1_prune_, state_copy

import starfish_plugin as starfish
from starfish_plugin import errors

WORKER = Path(__file__).with_name("concurrent_worker.py")


@pytest.mark.slow
def test_concurrent_heals_with_different_data_never_read_each_others_targets(tmp_path):
    start = tmp_path / "go"
    cache = tmp_path / "cache"
    procs = [
        subprocess.Popen([sys.executable, str(WORKER), str(tmp_path / f"out{seed}.json"), str(cache), str(seed), "4",
                          str(start)], stderr=subprocess.PIPE, text=True)
        for seed in (1, 2, 3)
    ]
    start.touch()
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    for seed in (1, 2, 3):
        result = json.loads((tmp_path / f"out{seed}.json").read_text())
        for run in result["runs"]:  # every heal trained on its own set's targets, exactly
            assert run["losses"] == result["reference"], run
    # nothing half-built, no trash left; at most one cache per calibration set
    leftovers = sorted(p.name for p in cache.iterdir())
    assert all(name.startswith("targets-") for name in leftovers), leftovers
    assert 1 <= len(leftovers) <= 3
    for directory in cache.iterdir():
        assert (directory / "meta.json").exists()


HOLDER = """
import copy, sys, time
from pathlib import Path
import torch
sys.path.insert(0, {tests!r})
from helpers import l1_prune_, tiny_vit
import starfish_plugin as starfish

class Slow:
    @starfish.hookimpl
    def starfish_step_ended(self, step, total_steps, config):
        Path({started!r}).touch()
        time.sleep(0.5)

starfish.plugin_manager().register(Slow())
dense = tiny_vit()
images = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(1))
starfish.heal(l1_prune_(copy.deepcopy(dense)), dense, images, epochs=3, lr=3e-3, batch_size=16, quiet=True,
              diagnostic_samples=64, checkpoint_dir={checkpoint_dir!r})
"""


@pytest.mark.slow
def test_a_checkpoint_dir_in_use_by_a_running_heal_is_refused(dense, images, fast, tmp_path):
    started = tmp_path / "started"
    checkpoint_dir = tmp_path / "ckpt"
    code = HOLDER.format(tests=str(Path(__file__).parent), started=str(started), checkpoint_dir=str(checkpoint_dir))
    holder = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    try:
        while not started.exists():
            assert holder.poll() is None, holder.communicate()[1][-3000:]
            time.sleep(0.05)
        model = l1_prune_(copy.deepcopy(dense))
        saved = state_copy(model)
        with pytest.raises(errors.CheckpointError, match=r"being written by another heal running now \(pid \d+\)"):
            starfish.heal(model, dense, images, fast, checkpoint_dir=str(checkpoint_dir))
        assert_state_equal(model, saved)
    finally:
        _, err = holder.communicate(timeout=120)
    assert holder.returncode == 0, err[-3000:]
    assert sorted(p.name for p in checkpoint_dir.iterdir()) == ["heal_checkpoint.pt"]  # the lock file went
    # once it has finished, the same heal resumes its finished checkpoint, and says so
    model = l1_prune_(copy.deepcopy(dense))
    with pytest.warns(errors.HealingWarning, match="finished heal"):
        report = starfish.heal(model, dense, images, fast, checkpoint_dir=str(checkpoint_dir))
    assert report.resumed_after_epoch == 3
