"""SIGTERM and SIGHUP during a heal clean up like Ctrl-C: real processes, inputs and targets on
disk in a private temporary directory, the signal sent after a few optimizer steps."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent("""
    import copy, sys, torch
    sys.path.insert(0, {tests!r})
    from helpers import l1_prune_, state_copy, tiny_vit
    import starfish_plugin as starfish

    class Announce:
        @starfish.hookimpl
        def starfish_step_ended(self, step, total_steps, config):
            if step == 2:
                print("STEPPING", flush=True)

    starfish.plugin_manager().register(Announce())
    dense = tiny_vit()
    pruned = l1_prune_(copy.deepcopy(dense))
    before = state_copy(pruned)
    data = torch.utils.data.TensorDataset(torch.randn(256, 1, 8, 8))
    try:
        starfish.heal(pruned, dense, data, epochs=10000, batch_size=8, quiet=True, inputs="disk", targets="disk")
    except SystemExit:
        same = all(torch.equal(v, before[k]) for k, v in pruned.state_dict().items())
        print("RESTORED" if same else "CHANGED", flush=True)
        raise
""")


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_signal_restores_the_weights_and_removes_the_temporary_files(tmp_path, signum):
    env = dict(os.environ, TMPDIR=str(tmp_path))
    script = SCRIPT.format(tests=str(Path(__file__).parent))
    # the heal's process starts with the signal at its default action even when this one runs under
    # nohup (an ignored SIGHUP is inherited, and starfish rightly leaves a handler it did not set alone)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, preexec_fn=lambda: signal.signal(signum, signal.SIG_DFL))
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "STEPPING", proc.stderr.read() if proc.stderr else ""
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith("starfish-")], "nothing on disk to clean"
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signum, err[-2000:]
    assert "RESTORED" in out
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("starfish-")] == []
