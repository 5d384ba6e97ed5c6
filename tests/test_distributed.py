"""Distributed healing: 2 CPU processes launched by torchrun (gloo) against one process."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import l1_prune_

import starfish_plugin as starfish
from starfish_plugin.core.holdout import split_rows

WORKER = Path(__file__).with_name("ddp_worker.py")


def _torchrun(
    out: Path, *extra: str, settings: dict | None = None, rank_settings: dict | None = None
) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", DDP_WORKER_HEAL_SETTINGS=json.dumps(settings or {}),
               DDP_WORKER_RANK_SETTINGS=json.dumps(rank_settings or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
           str(out), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _ranks(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory) -> Path:
    """One two-rank heal with the worker's defaults, shared by the tests that compare with it."""
    out = tmp_path_factory.mktemp("clean")
    done = _torchrun(out)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.slow
def test_two_ranks_heal_like_one_process(dense, clean_run):
    ranks = _ranks(clean_run)

    # DDP keeps the ranks in lockstep: identical weights, identical (globally averaged) losses
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert ranks[0]["epoch_losses"] == ranks[1]["epoch_losses"]
    # both ranks judge alike: the held-out samples are split off the whole set, then shared out
    assert ranks[0]["held_out_history"] == ranks[1]["held_out_history"]
    for r in ranks:
        # 32 of 128 held out; half of the other 96 each: 6 steps of 8 per epoch
        assert r["n_samples"] == 48 and r["steps"] == 3 * 6 and r["held_out_samples"] == 32
        assert r["mask_unchanged"] and r["masked_weights_zero"]
        assert r["world_size"] == 2
        assert any(f"rank {r['rank']} of 2 (gloo), 48 of 96 calibration samples" in n for n in r["notes"])
        assert list((clean_run / "cache" / f"rank{r['rank']}-of-2").glob("targets-*/meta.json"))  # its shard's cache

    # the same heal in one process (batch 16 over the same 96 training samples, 6 steps per epoch)
    images = torch.randn(128, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    single = starfish.heal(l1_prune_(copy.deepcopy(dense)), dense, images, epochs=3, lr=3e-3, batch_size=16,
                           quiet=True, diagnostic_samples=64)
    # the same held-out samples and starting weights: the same starting score (summed over ranks)
    assert ranks[0]["held_out_history"][0]["objective"] == pytest.approx(single.held_out_before, rel=1e-5)
    ddp_losses = ranks[0]["epoch_losses"]
    # Same data, same number of steps (6 per epoch), different batch composition: within 10 % per epoch.
    for a, b in zip(ddp_losses, single.epoch_losses):
        assert abs(a - b) <= 0.1 * b, (ddp_losses, single.epoch_losses)
    mean_after = sum(ranks[0]["cosine_after"].values()) / len(ranks[0]["cosine_after"])
    mean_single = sum(single.block_cosine_after.values()) / len(single.block_cosine_after)
    assert abs(mean_after - mean_single) < 0.01
    assert mean_after > sum(ranks[0]["cosine_before"].values()) / len(ranks[0]["cosine_before"]) + 0.01


@pytest.mark.slow
def test_two_ranks_with_a_compiled_forward_and_inputs_on_disk(dense, tmp_path):
    """DDP wrapped by torch.compile (aot_eager: no C++ compiler needed), each rank reading its
    shard from its own inputs file; the batches are dicts passed as keyword arguments."""
    done = _torchrun(tmp_path, settings={"compile": "default", "compile_backend": "aot_eager", "inputs": "disk",
                                         "dict_batches": True})
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = _ranks(tmp_path)
    assert ranks[0]["weights"] == ranks[1]["weights"]
    for r in ranks:
        assert r["compiled"] != "" and r["calibration_source"] == "list (inputs on disk)"
        assert r["n_samples"] == 48 and r["mask_unchanged"] and r["masked_weights_zero"]
    assert not list((tmp_path / "cache").glob("starfish-inputs-*")), "an inputs file outlived the heal"
    # each rank held out 16 of its own 64 samples: one process trains on the same 96
    images = torch.randn(128, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    train = torch.cat([torch.arange(r, 128, 2)[split_rows(64, 0.1, 0, held=16)[0]] for r in (0, 1)])
    single = starfish.heal(l1_prune_(copy.deepcopy(dense)), dense, images[train], epochs=3, lr=3e-3, batch_size=16,
                           quiet=True, holdout=0, diagnostic_samples=0, if_worse="warn")
    # the same samples in other batches (each rank shuffles its own share), 6 steps per epoch: the same
    # curve within 25 % (a rank that trained on other data, or gradients not averaged, would be far off)
    for a, b in zip(ranks[0]["epoch_losses"], single.epoch_losses):
        assert abs(a - b) <= 0.25 * b, (ranks[0]["epoch_losses"], single.epoch_losses)
    assert ranks[0]["epoch_losses"][-1] < 0.5 * ranks[0]["epoch_losses"][0]


@pytest.mark.slow
def test_a_rank_that_dies_is_recovered_by_resuming(tmp_path, clean_run):
    clean, crashed = clean_run, tmp_path / "crashed"
    ckpt = str(tmp_path / "state")
    # rank 1 dies abruptly at step 9 (epoch 2 of 3, 6 steps per epoch): torchrun stops the job
    died = _torchrun(crashed, ckpt, "1", "9")
    assert died.returncode != 0 and not (crashed / "rank0.json").exists()
    assert sorted(p.name for p in Path(ckpt).glob("*.pt")) == [
        "heal_checkpoint_rank0-of-2.pt", "heal_checkpoint_rank1-of-2.pt"]
    # the same command again resumes both ranks after epoch 1 and ends where the clean run ended
    resumed = _torchrun(crashed, ckpt)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ranks, reference = _ranks(crashed), _ranks(clean)
    assert all(r["resumed_after_epoch"] == 1 for r in ranks)
    assert ranks[0]["weights"] == ranks[1]["weights"] == reference[0]["weights"]
    assert ranks[0]["epoch_losses"] == reference[0]["epoch_losses"]
    assert ranks[0]["held_out_history"] == reference[0]["held_out_history"]  # judged alike across the crash


@pytest.mark.slow
@pytest.mark.parametrize("rank_settings, differs", [
    ({"1": {"lr": 1e-3}}, "settings"),
    ({"1": {"images": 96}}, "calibration samples, calibration set"),
], ids=["lr", "sample-count"])
def test_ranks_that_disagree_are_refused_on_every_rank(tmp_path, rank_settings, differs):
    done = _torchrun(tmp_path, rank_settings=rank_settings)
    assert done.returncode != 0
    assert done.stderr.count(f"the 2 ranks do not heal the same way ({differs} differ)") == 2, done.stderr[-3000:]
    assert "SIGABRT" not in done.stderr and not list(tmp_path.glob("rank*.json"))
