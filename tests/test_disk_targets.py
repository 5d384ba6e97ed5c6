"""Disk-backed dense targets: same heal as in memory, reuse only for the same model and data,
rebuild otherwise, clean failure when the disk cannot take the cache."""

from __future__ import annotations

import copy
import json
import resource
import signal

import pytest
import torch
from helpers import assert_state_equal, l1_prune_, state_copy

import starfish_plugin as starfish
from starfish_plugin import errors
from starfish_plugin.data.targets import plan_targets


def _heal(dense, images, cfg, **kw):
    model = l1_prune_(copy.deepcopy(dense))
    return model, starfish.heal(model, dense, images, cfg, **kw)


def test_disk_cache_heals_exactly_like_the_memory_cache(dense, images, fast, tmp_path):
    m_mem, r_mem = _heal(dense, images, fast, targets="memory")
    m_disk, r_disk = _heal(dense, images, fast, targets="disk", cache_dir=str(tmp_path))
    assert r_disk.targets_mode == "disk" and r_disk.target_cache_bytes == 0
    assert (r_disk.target_cache_action, r_disk.target_cache_reason) == ("built", "")
    assert r_mem.target_cache_action == ""
    assert r_disk.epoch_losses == r_mem.epoch_losses  # the same fp16 targets, read from files
    for a, b in zip(m_mem.parameters(), m_disk.parameters()):
        assert torch.equal(a, b)
    (cache,) = tmp_path.glob("targets-*")  # one subdirectory per fingerprint
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["n_samples"] == r_disk.n_samples and set(meta["fingerprint"]) == {  # the training part only
        "dense model", "calibration set", "block selection"}
    on_disk = sum(r_disk.n_samples * e["row_bytes"] for e in meta["entries"].values())
    assert on_disk == r_mem.target_cache_bytes


def test_a_matching_cache_is_reused_and_a_foreign_one_rebuilt(dense, images, fast, tmp_path):
    cfg = fast.replace(targets="disk", cache_dir=str(tmp_path))
    _heal(dense, images, cfg)
    _, again = _heal(dense, images, cfg)
    assert again.target_cache_action == "reused"
    _, other_data = _heal(dense, images.flip(0), cfg)
    assert (other_data.target_cache_action, other_data.target_cache_reason) == (
        "rebuilt", "it was built for another calibration set")
    other_dense = copy.deepcopy(dense)
    with torch.no_grad():
        other_dense.head.bias.add_(1.0)
    _, other_model = _heal(other_dense, images.flip(0), cfg)
    assert other_model.target_cache_reason == "it was built for another dense model"
    _, fewer_blocks = _heal(other_dense, images.flip(0), cfg, blocks=["blocks.1"])
    assert fewer_blocks.target_cache_reason == "it was built for another block selection"


def test_truncated_or_unfinished_cache_is_rebuilt(dense, images, fast, tmp_path):
    cfg = fast.replace(targets="disk", cache_dir=str(tmp_path))
    _heal(dense, images, cfg)
    victim = sorted(tmp_path.glob("targets-*/target_*.bin"))[0]
    victim.write_bytes(victim.read_bytes()[:100])
    _, report = _heal(dense, images, cfg)
    assert report.target_cache_action == "rebuilt" and "is missing or truncated" in report.target_cache_reason
    next(tmp_path.glob("targets-*/meta.json")).unlink()  # as if a build was interrupted before completing
    _, report = _heal(dense, images, cfg)
    assert report.target_cache_action == "built"


def test_an_altered_or_escaping_cache_is_rebuilt_never_read(dense, images, fast, tmp_path):
    cfg = fast.replace(targets="disk", cache_dir=str(tmp_path / "cache"))
    _, first = _heal(dense, images, cfg)
    (cache,) = (tmp_path / "cache").glob("targets-*")
    victim = sorted(cache.glob("target_*.bin"))[0]
    data = bytearray(victim.read_bytes())
    data[10] ^= 0xFF  # same size, other contents
    victim.write_bytes(bytes(data))
    model, report = _heal(dense, images, cfg)
    assert report.target_cache_action == "rebuilt" and "does not match the digest" in report.target_cache_reason
    assert report.epoch_losses == first.epoch_losses
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"secret")
    meta = json.loads((cache / "meta.json").read_text())
    next(iter(meta["entries"].values()))["file"] = "../outside.bin"
    (cache / "meta.json").write_text(json.dumps(meta))
    _, report = _heal(dense, images, cfg)
    assert report.target_cache_action == "rebuilt" and "names files outside the cache" in report.target_cache_reason
    assert outside.read_bytes() == b"secret"


def test_temporary_cache_is_removed_after_the_heal(dense, images, fast, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    _, report = _heal(dense, images, fast, targets="disk")
    assert report.targets_mode == "disk" and "temporary directory" in report.targets_reason
    assert list(tmp_path.iterdir()) == []


def test_write_failure_cleans_up_and_leaves_the_model_untouched(dense, images, fast, tmp_path):
    pruned = l1_prune_(copy.deepcopy(dense))
    saved, dense_saved = state_copy(pruned), state_copy(dense)
    # a real OS write failure: files may not grow past 4 KiB (the cache needs ~25 KiB)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, old_limit[1]))
    try:
        with pytest.raises(errors.TargetCacheError, match="the partial files were removed") as info:
            starfish.heal(pruned, dense, images, fast, targets="disk", cache_dir=str(tmp_path))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert "targets='online'" in str(info.value)
    assert list(tmp_path.iterdir()) == []
    assert_state_equal(pruned, saved)
    assert_state_equal(dense, dense_saved)


def test_auto_falls_back_to_online_when_the_disk_has_no_room(tmp_path):
    probe = {"blocks.0": torch.zeros(1, 17, 96)}
    plan = plan_targets(probe, 10**13, "auto", budget=0, cache_dir=str(tmp_path))
    assert plan.mode == "online" and "GiB free, so the dense model runs online" in plan.reason
    plan = plan_targets(probe, 1000, "auto", budget=0, cache_dir=str(tmp_path))
    assert plan.mode == "disk" and str(tmp_path) in plan.reason


def test_explicit_disk_without_room_is_refused_before_anything_changes(dense, images, fast, tmp_path):
    from starfish_plugin.data.disk_targets import DiskTargetCache

    cache = DiskTargetCache(tmp_path, {"dense model": "x"}, 10)
    with pytest.raises(errors.TargetCacheError, match="GiB free; pass another HealConfig.cache_dir"):
        cache.build(iter(()), estimate_bytes=10**18)
    assert list(tmp_path.iterdir()) == []


def test_a_fresh_build_is_never_taken_for_an_abandoned_one(dense, images, fast, tmp_path):
    """A concurrent builder creates its lock file a moment before locking it: a young unlocked build
    is left alone, an old one (its heal died) is removed."""
    import os
    import time

    young, old = tmp_path / ".building-young", tmp_path / ".building-old"
    for build in (young, old):
        build.mkdir()
        (build / ".lock").touch()
    hour_ago = time.time() - 3600
    os.utime(old, (hour_ago, hour_ago))
    _heal(dense, images, fast, targets="disk", cache_dir=str(tmp_path))
    assert young.exists() and not old.exists()
