"""``HealConfig(inputs="disk")``: calibration inputs spilled to a file batch by batch, read back
per batch; the heal is the same as with inputs in memory, and the file never outlives it."""

from __future__ import annotations

import copy
import os
import resource
import signal

import pytest
import torch
from helpers import assert_state_equal, l1_prune_, state_copy
from torch.utils.data import TensorDataset

import starfish_plugin as starfish
from starfish_plugin import errors
from starfish_plugin.data.calibration import load_calibration
from starfish_plugin.runtime.distributed import DistContext


def _heal(dense, calibration, cfg, **kw):
    model = l1_prune_(copy.deepcopy(dense))
    return model, starfish.heal(model, dense, calibration, cfg, **kw)


@pytest.mark.parametrize("extra", [{}, {"loss": "cosine+ce", "warm_start": "row_norm", "targets": "disk"}],
                         ids=["cosine", "ce+warm-start+disk-targets"])
def test_disk_inputs_heal_exactly_like_memory(dense, images, labels, fast, tmp_path, extra):
    dataset = TensorDataset(images, labels)
    m_mem, r_mem = _heal(dense, dataset, fast, **extra)
    m_disk, r_disk = _heal(dense, dataset, fast, inputs="disk", cache_dir=str(tmp_path / "not" / "yet"), **extra)
    assert r_disk.calibration_source == "Dataset (inputs on disk)"
    assert r_disk.epoch_losses == r_mem.epoch_losses
    assert r_disk.block_cosine_after == r_mem.block_cosine_after
    for a, b in zip(m_mem.parameters(), m_disk.parameters()):
        assert torch.equal(a, b)
    assert not list((tmp_path / "not" / "yet").glob("starfish-inputs-*")), "the inputs' file outlived the heal"


def test_bad_input_found_while_spilling_removes_the_file(dense, images, fast, tmp_path):
    bad = images.clone()
    bad[-3, 0, 0, 0] = float("nan")
    pruned = l1_prune_(copy.deepcopy(dense))
    saved = state_copy(pruned)
    with pytest.raises(errors.CalibrationError, match=r"1 calibration inputs contain NaN or Inf \(first: sample 61\)"):
        starfish.heal(pruned, dense, TensorDataset(bad), fast, inputs="disk", cache_dir=str(tmp_path))
    assert list(tmp_path.iterdir()) == []
    assert_state_equal(pruned, saved)
    with pytest.raises(errors.NonFiniteError, match="the healing loss became"):  # while training: the file goes
        starfish.heal(pruned, dense, TensorDataset(images), fast, inputs="disk", cache_dir=str(tmp_path),
                      lr=1e30, min_lr=1e29, if_worse="warn")
    assert list(tmp_path.iterdir()) == []
    assert_state_equal(pruned, saved)


def test_write_failure_is_a_clear_error_and_nothing_changes(dense, images, fast, tmp_path):
    pruned = l1_prune_(copy.deepcopy(dense))
    saved, dense_saved = state_copy(pruned), state_copy(dense)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, old_limit[1]))  # the inputs need 16 KiB
    try:
        with pytest.raises(errors.CalibrationError, match="writing calibration inputs .* failed.*inputs='memory'"):
            starfish.heal(pruned, dense, TensorDataset(images), fast, inputs="disk", cache_dir=str(tmp_path))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert list(tmp_path.iterdir()) == []
    assert_state_equal(pruned, saved)
    assert_state_equal(dense, dense_saved)


def test_fingerprint_and_disk_cache_carry_over_between_modes(dense, images, fast, tmp_path):
    in_memory, on_disk = load_calibration(images), load_calibration(images.split(10), to_disk=True)
    try:
        assert on_disk.on_disk and len(on_disk) == len(images)
        assert on_disk.fingerprint() == in_memory.fingerprint()
        assert torch.equal(on_disk.head(64), images)
    finally:
        on_disk.close()
    cache = tmp_path / "targets"
    _heal(dense, images, fast, targets="disk", cache_dir=str(cache))
    _, report = _heal(dense, TensorDataset(images), fast, targets="disk", inputs="disk", cache_dir=str(cache))
    assert report.target_cache_action == "reused", report.notes


def test_a_rank_shard_on_disk_matches_the_shard_in_memory(images, labels):
    in_memory = load_calibration(TensorDataset(images, labels))
    on_disk = load_calibration(TensorDataset(images, labels), to_disk=True)
    try:
        for rank in (0, 1, 2):
            a, b = DistContext(rank, 3).shard(in_memory), DistContext(rank, 3).shard(on_disk)
            written = load_calibration(images.split(10), to_disk=True, shard=(rank, 3))  # its own rows only
            try:
                assert written.total == len(images) and len(written.inputs) == len(a) and written.on_disk
                assert written.fingerprint() == a.fingerprint() == b.fingerprint()
                assert DistContext(rank, 3).shard(written) is written  # not sharded twice
                idx = torch.tensor([4, 0, 2])
                for other in (b, written):
                    assert len(a) == len(other) and torch.equal(a.head(len(a)), other.head(len(other)))
                    assert torch.equal(a.inputs[idx], other.inputs[idx])
                assert torch.equal(a.labels, b.labels)
            finally:
                written.close()
        # views share the owner's read descriptor: closing the owner closes it and removes the file
        fd = on_disk.inputs._shared["fd"]
        assert fd is not None
    finally:
        on_disk.close()
    assert not on_disk.inputs.directory.exists()
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(fd)


@pytest.mark.parametrize("to_disk", [False, True], ids=["memory", "disk"])
def test_batches_of_another_dtype_are_refused(images, to_disk, tmp_path):
    batches = [images[:32], images[32:].double()]
    with pytest.raises(
        errors.CalibrationTypeError, match="batch 1 has dtype torch.float64 but earlier ones have torch.float32"
    ):
        load_calibration(batches, to_disk=to_disk, directory=str(tmp_path))
    assert list(tmp_path.iterdir()) == []
