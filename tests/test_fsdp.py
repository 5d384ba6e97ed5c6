"""strategy="fsdp": the joint heal on FSDP2-sharded copies, 2 CPU ranks under torchrun (gloo), and
one rank in this process for what needs no second one."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import assert_state_equal, l1_prune_, state_copy, tiny_vit

import starfish_plugin as starfish
from starfish_plugin import errors

WORKER = Path(__file__).with_name("fsdp_worker.py")


def _torchrun(out: Path, case: str, *extra: str, settings: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", FSDP_WORKER_HEAL_SETTINGS=json.dumps(settings or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
           str(out), case, *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _ranks(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def _healed(r: dict) -> None:
    """What every sharded heal must show on every rank."""
    assert r["strategy"] == "fsdp" and r["world_size"] == 2
    assert r["mask_unchanged"] and r["masked_weights_zero"] and r["masks_identical"]
    assert r["dense_untouched"]
    assert r["types"] == ["Parameter"]  # the user's model holds plain full tensors again, not DTensors
    assert r["returned_state"] != "start"
    assert r["held_out_after"] < r["held_out_before"]
    assert r["output_cosine_after"] > r["output_cosine_before"]
    mean = lambda d: sum(d.values()) / len(d)  # noqa: E731
    assert mean(r["cosine_after"]) > mean(r["cosine_before"])
    assert any("sharded with FSDP2 fully_shard over 2 ranks" in n for n in r["notes"])


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory) -> Path:
    """One two-rank heal of the worker's Llama, shared by the tests that compare with it."""
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("llama")
    done = _torchrun(out, "llama")
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.slow
def test_two_ranks_heal_a_hugging_face_llama_with_prune_hooks(llama_run):
    ranks = _ranks(llama_run)
    for r in ranks:
        _healed(r)
    # the gathered weights and the (globally averaged) losses are the same on both ranks
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert ranks[0]["epoch_losses"] == ranks[1]["epoch_losses"]
    # 96 samples, 33 held out: 63 train, 32 and 31 per rank, trimmed to 31 each (collective forwards)
    assert ranks[0]["n_samples"] == 31 and ranks[0]["held_out_samples"] == 32

    # the same heal, joint in one process: as close to the dense model, within a few per cent
    sys.path.insert(0, str(WORKER.parent))
    from fsdp_worker import llama

    dense, pruned, tokens = llama()
    single = starfish.heal(pruned, dense, tokens, epochs=3, lr=3e-3, batch_size=16, quiet=True, holdout=0.34)
    assert abs(ranks[0]["held_out_after"] - single.held_out_after) <= 0.15 * single.held_out_after
    for a, b in zip(ranks[0]["epoch_losses"], single.epoch_losses):
        assert abs(a - b) <= 0.15 * b, (ranks[0]["epoch_losses"], single.epoch_losses)


@pytest.mark.slow
def test_two_ranks_heal_torch_ao_2_4_parametrizations_and_keep_them_2_4(tmp_path):
    done = _torchrun(tmp_path, "vit_24")  # the worker raises if a healed weight is not 2:4
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = _ranks(tmp_path)
    for r in ranks:
        _healed(r)
    assert ranks[0]["weights"] == ranks[1]["weights"]


@pytest.mark.slow
def test_a_rank_that_dies_is_recovered_by_resuming_to_the_same_weights(tmp_path, llama_run):
    clean, crashed, ckpt = llama_run, tmp_path / "crashed", tmp_path / "ckpt"
    crashed.mkdir()
    died = _torchrun(crashed, "llama", str(ckpt), "6")  # rank 1 dies at step 6 (in epoch 2 of 3)
    assert died.returncode != 0
    assert sorted(p.name for p in ckpt.glob("*.pt")) == ["heal_checkpoint_rank0-of-2.pt",
                                                        "heal_checkpoint_rank1-of-2.pt"]
    resumed = _torchrun(crashed, "llama", str(ckpt))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got, want = _ranks(crashed), _ranks(clean)
    assert got[0]["resumed_after_epoch"] == 1
    assert got[0]["weights"] == got[1]["weights"] == want[0]["weights"]  # bit for bit
    assert got[0]["epoch_losses"] == want[0]["epoch_losses"]


@pytest.fixture
def one_rank(tmp_path):
    """A one-process gloo group (FSDP2 over a mesh of one), torn down after the test."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


SETTINGS = dict(strategy="fsdp", epochs=2, batch_size=16, quiet=True, recipe="paper")


def test_one_rank_heals_and_returns_plain_tensors(one_rank):
    dense = tiny_vit(depth=2)
    pruned = l1_prune_(copy.deepcopy(dense), amount=0.7)
    dense_state = state_copy(dense)
    images = torch.randn(96, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    report = starfish.heal(pruned, dense, images, **SETTINGS, lr=3e-3)
    assert report.strategy == "fsdp" and report.mask_unchanged and report.masked_weights_zero
    assert report.held_out_after < report.held_out_before
    assert all(type(p) is torch.nn.Parameter for p in pruned.parameters())
    assert_state_equal(dense, dense_state)


def test_a_sharded_heal_that_helps_nothing_returns_the_pruned_weights_bit_for_bit(one_rank):
    dense = tiny_vit(depth=2)
    pruned = l1_prune_(copy.deepcopy(dense), amount=0.7)
    before = state_copy(pruned)
    images = torch.randn(96, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    report = starfish.heal(pruned, dense, images, **SETTINGS, lr=50.0, min_lr=1.0)
    assert report.returned_state == "start" and report.worse_restored
    assert report.held_out_after == report.held_out_before
    assert_state_equal(pruned, before)


class Interrupt:
    @starfish.hookimpl
    def starfish_step_ended(self, step, total_steps, config):
        if step == 3:
            raise KeyboardInterrupt


def test_an_interrupted_sharded_heal_leaves_the_model_as_it_came(one_rank):
    dense = tiny_vit(depth=2)
    pruned = l1_prune_(copy.deepcopy(dense))
    before = state_copy(pruned)
    images = torch.randn(96, 1, 8, 8)
    manager = starfish.plugin_manager()
    plugin = Interrupt()
    manager.register(plugin)
    try:
        with pytest.raises(KeyboardInterrupt):
            starfish.heal(pruned, dense, images, **SETTINGS)
    finally:
        manager.unregister(plugin)
    assert_state_equal(pruned, before)


def test_warm_starts_are_refused_under_fsdp_before_anything_changes(one_rank):
    dense = tiny_vit(depth=2)
    pruned = l1_prune_(copy.deepcopy(dense))
    before = state_copy(pruned)
    with pytest.raises(errors.ConfigError, match="warm_start='lstsq' solves whole layers"):
        starfish.heal(pruned, dense, torch.randn(64, 1, 8, 8), **{**SETTINGS, "warm_start": "lstsq"})
    assert_state_equal(pruned, before)


def test_fsdp_without_a_process_group_names_torchrun():
    assert not dist.is_initialized()
    dense = tiny_vit(depth=2)
    pruned = l1_prune_(copy.deepcopy(dense))
    before = state_copy(pruned)
    with pytest.raises(errors.ConfigError, match="torchrun --nproc_per_node"):
        starfish.heal(pruned, dense, torch.randn(64, 1, 8, 8), **SETTINGS)
    assert_state_equal(pruned, before)
