"""Every hook is exercised by a plugin defined inline; plugin discovery and the env switches."""

import copy
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import assert_state_equal, l1_prune_, state_copy
from torch import nn

import starfish_plugin as starfish
from starfish_plugin import errors
from starfish_plugin.core.masks import MaskedTensor, SparsityPlan
from starfish_plugin.plugins.hookspecs import HOOK_NAMES
from starfish_plugin.plugins.manager import build_plugin_manager, reset_plugin_manager

# Which test exercises each hook; test_every_hook_has_a_test keeps this honest.
HOOK_TESTS = {
    "starfish_find_masks": "test_adapter_hooks_from_a_registered_plugin",
    "starfish_supported_forms": "test_adapter_hooks_from_a_registered_plugin",
    "starfish_write_back": "test_adapter_hooks_from_a_registered_plugin",
    "starfish_after_prune": "test_after_prune_hook_via_attach",
    "starfish_heal_started": "test_progress_hooks_fire_in_order",
    "starfish_step_ended": "test_progress_hooks_fire_in_order",
    "starfish_epoch_ended": "test_progress_hooks_fire_in_order",
    "starfish_heal_finished": "test_progress_hooks_fire_in_order",
    "starfish_heal_failed": "test_heal_failed_fires_after_the_weights_are_restored",
    "starfish_prepare_pruner": "test_prepare_pruner_hook_runs_each_step",
    "starfish_repair_pruned": "test_user_repair_hook_runs_after_the_step_and_before_the_check",
    "starfish_file_formats": "test_file_format_hooks_from_a_registered_plugin",
    "starfish_detect_format": "test_file_format_hooks_from_a_registered_plugin",
    "starfish_load_pruned": "test_file_format_hooks_from_a_registered_plugin",
    "starfish_save_pruned": "test_file_format_hooks_from_a_registered_plugin",
    "starfish_fold_masks": "test_state_hooks_from_a_registered_plugin",
    "starfish_remove_masks": "test_state_hooks_from_a_registered_plugin",
    "starfish_export_state": "test_state_hooks_from_a_registered_plugin",
    "starfish_import_state": "test_state_hooks_from_a_registered_plugin",
}


class Recorder:
    def __init__(self):
        self.calls = []

    @starfish.hookimpl
    def starfish_heal_started(self, model, plan, config, total_steps):
        self.calls.append(("started", total_steps))

    @starfish.hookimpl
    def starfish_step_ended(self, step, total_steps):
        self.calls.append(("step", step))

    @starfish.hookimpl
    def starfish_epoch_ended(self, epoch, epochs, loss, lr):
        self.calls.append(("epoch", epoch, loss, lr))

    @starfish.hookimpl
    def starfish_heal_finished(self, model, report):
        self.calls.append(("finished", report.mask_unchanged))


def test_progress_hooks_fire_in_order(pruned, dense, images, fast):
    recorder = Recorder()
    pm = starfish.plugin_manager()
    pm.register(recorder)
    try:
        report = starfish.heal(pruned, dense, images, fast)
    finally:
        pm.unregister(recorder)
    kinds = [c[0] for c in recorder.calls]
    assert kinds[0] == "started" and kinds[-1] == "finished"
    assert kinds.count("step") == report.steps and kinds.count("epoch") == 3
    epochs = [c for c in recorder.calls if c[0] == "epoch"]
    assert [e[2] for e in epochs] == report.epoch_losses
    assert epochs[-1][3] == pytest.approx(fast.min_lr)
    assert recorder.calls[-1] == ("finished", True)


class FailureRecorder:
    def __init__(self):
        self.seen = []

    @starfish.hookimpl
    def starfish_heal_failed(self, model, error, config):
        fc1 = model.blocks[0].mlp.fc1
        self.seen.append((type(error).__name__, torch.isfinite(fc1.weight_orig).all().item(),
                          torch.isfinite(fc1.weight).all().item()))


def test_heal_failed_fires_after_the_weights_are_restored(pruned, dense, images, capsys):
    recorder = FailureRecorder()
    pm = starfish.plugin_manager()
    pm.register(recorder)
    try:
        with pytest.raises(starfish_errors().NonFiniteError):
            starfish.heal(pruned, dense, images, lr=1e30, min_lr=1e29, epochs=1, batch_size=16, if_worse="warn")
    finally:
        pm.unregister(recorder)
    # restored before the hook ran, and the stale prune attribute refreshed too
    assert recorder.seen == [("NonFiniteError", True, True)]
    assert "[starfish] healing failed: the healing loss became" in capsys.readouterr().err
    assert all(p.grad is None for p in pruned.parameters())


def test_default_progress_prints_one_line_per_epoch_and_quiet_silences_it(pruned, dense, images, fast, capsys):
    starfish.heal(l1_prune_(copy.deepcopy(dense)), dense, images, fast.replace(quiet=False))
    err = capsys.readouterr().err
    assert err.count("[starfish] epoch ") == 3
    starfish.heal(pruned, dense, images, fast)
    assert capsys.readouterr().err == ""


def test_progress_plugin_can_be_unregistered(pruned, dense, images, fast, capsys):
    pm = starfish.plugin_manager()
    pm.unregister(name="progress")
    starfish.heal(pruned, dense, images, fast.replace(quiet=False))
    assert "[starfish]" not in capsys.readouterr().err


class FirstLinearOnly:
    """A third-party adapter: treats exact zeros of the first fc1 as its mask."""

    def __init__(self):
        self.wrote_back = 0

    @starfish.hookimpl(tryfirst=True)
    def starfish_find_masks(self, model):
        fc1 = model.blocks[0].mlp.fc1
        if not getattr(fc1, "zeros_are_mask", False):
            return None
        entry = MaskedTensor("blocks.0.mlp.fc1.weight", fc1.weight, fc1.weight != 0, "zeros", "zero")
        return SparsityPlan([entry], adapter="first-linear")

    @starfish.hookimpl
    def starfish_supported_forms(self):
        return ["zeros in blocks.0.mlp.fc1 (test adapter)"]

    @starfish.hookimpl
    def starfish_write_back(self, model, plan):
        if plan.adapter != "first-linear":
            return None
        self.wrote_back += 1
        return True


def test_adapter_hooks_from_a_registered_plugin(dense, images, fast):
    adapter = FirstLinearOnly()
    pm = starfish.plugin_manager()
    pm.register(adapter)
    try:
        pruned = copy.deepcopy(dense)
        fc1 = pruned.blocks[0].mlp.fc1
        with torch.no_grad():
            fc1.weight[fc1.weight.abs() < fc1.weight.abs().median()] = 0.0
        zeros = fc1.weight == 0
        fc1.zeros_are_mask = True
        report = starfish.heal(pruned, dense, images, fast)
        assert report.adapter == "first-linear" and adapter.wrote_back == 1
        assert report.mask_unchanged and report.masked_weights_zero
        assert torch.equal(fc1.weight == 0, zeros)  # "zero" entries re-zeroed after each step
        with pytest.raises(starfish_errors().MaskNotFoundError, match="test adapter"):
            starfish.find_masks(copy.deepcopy(dense))
    finally:
        pm.unregister(adapter)


class ForgetfulAdapter(FirstLinearOnly):
    @starfish.hookimpl
    def starfish_write_back(self, model, plan):
        return None


def test_an_adapter_that_never_writes_back_is_an_error(dense, images, fast):
    adapter = ForgetfulAdapter()
    pm = starfish.plugin_manager()
    pm.register(adapter)
    try:
        pruned = copy.deepcopy(dense)
        pruned.blocks[0].mlp.fc1.zeros_are_mask = True
        with pytest.raises(starfish_errors().AdapterError, match="read by 'first-linear'"):
            starfish.heal(pruned, dense, images, fast)
    finally:
        pm.unregister(adapter)


def starfish_errors():
    from starfish_plugin import errors

    return errors


class StopAfterFirst:
    @starfish.hookimpl
    def starfish_after_prune(self, pruner, model, step):
        return False if step >= 1 else None


def test_after_prune_hook_via_attach(dense, images, fast):
    from torch.ao.pruning import WeightNormSparsifier

    model = copy.deepcopy(dense)
    sparsifier = WeightNormSparsifier(sparsity_level=0.6, sparse_block_shape=(1, 4), zeros_per_block=4)
    sparsifier.prepare(model, [{"tensor_fqn": f"blocks.{i}.mlp.fc1.weight"} for i in range(2)])
    stopper = StopAfterFirst()
    starfish.plugin_manager().register(stopper)
    try:
        handle = starfish.attach(sparsifier, dense, images, fast)
        sparsifier.step()
        assert handle.steps == 1 and len(handle.reports) == 1 and handle.stop_requested
        assert handle.reports[0].mask_unchanged
        assert handle.reports[0].epoch_losses[-1] < handle.reports[0].epoch_losses[0]
        handle.detach()
        sparsifier.step()
        assert handle.steps == 1 and not handle.attached
    finally:
        starfish.plugin_manager().unregister(stopper)


class CountingRunner:
    def __init__(self):
        self.calls = 0

    @starfish.hookimpl(tryfirst=True)
    def starfish_prepare_pruner(self, pruner, model, dense):
        def run(step, *args, **kwargs):
            self.calls += 1
            return step(*args, **kwargs)

        return run


def test_prepare_pruner_hook_runs_each_step(dense, images, fast):
    from torch.ao.pruning import WeightNormSparsifier

    model = copy.deepcopy(dense)
    sparsifier = WeightNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 4), zeros_per_block=4)
    sparsifier.prepare(model, [{"tensor_fqn": "blocks.0.mlp.fc1.weight"}])
    runner = CountingRunner()
    starfish.plugin_manager().register(runner)
    try:
        handle = starfish.attach(sparsifier, dense, images, fast)
        sparsifier.step()
        sparsifier.step()
        assert runner.calls == 2 and handle.steps == 2
    finally:
        starfish.plugin_manager().unregister(runner)


class Grouped(nn.Module):
    """Keeps its group size as ``group_size``, a name the built-in rules do not know."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)
        self.groups, self.group_size = 4, 8

    def forward(self, x):
        h = self.fc1(x).view(x.shape[0], self.groups, self.group_size).relu().flatten(1)
        return x + self.fc2(h)


class GroupedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(Grouped(), Grouped())
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.blocks(x))


class RepairGroups:
    """A user's repair: the group size from the pruned layer."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    @starfish.hookimpl
    def starfish_repair_pruned(self, model, pruner, step):
        self.calls.append((step, len(pruner.num_heads)))
        for m in model.modules():
            if isinstance(m, Grouped):
                m.group_size = m.fc1.out_features // m.groups


def _grouped_pruner(model: nn.Module, x: torch.Tensor):
    tp = pytest.importorskip("torch_pruning")
    return tp.pruner.MetaPruner(model, x[:2], importance=tp.importance.GroupMagnitudeImportance(p=2),
                                pruning_ratio=0.5, ignored_layers=[model.head, *[b.fc2 for b in model.blocks]],
                                out_channel_groups={b.fc1: 4 for b in model.blocks})


def test_user_repair_hook_runs_after_the_step_and_before_the_check():
    torch.manual_seed(0)
    dense = GroupedNet().eval()
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    saved = state_copy(dense)
    model = copy.deepcopy(dense)
    pruner = _grouped_pruner(model, x)
    starfish.attach(pruner, dense, x, epochs=2, batch_size=16, quiet=True, blocks=["blocks.0", "blocks.1"])
    with pytest.raises(errors.PrunerError, match=r"(?s)cannot run its forward.*in module 'blocks.0' \(Grouped\)"):
        pruner.step()  # without the user's repair: group_size is stale
    repair = RepairGroups()
    starfish.plugin_manager().register(repair)
    try:
        model = copy.deepcopy(dense)
        pruner = _grouped_pruner(model, x)
        handle = starfish.attach(pruner, dense, x, epochs=2, batch_size=16, quiet=True,
                                 blocks=["blocks.0", "blocks.1"])
        pruner.step()
    finally:
        starfish.plugin_manager().unregister(repair)
    assert repair.calls == [(1, 0)]
    assert model.blocks[0].group_size == 4 and model.blocks[0].fc1.out_features == 16
    report = handle.reports[-1]
    assert report.held_out_after < report.held_out_before
    assert_state_equal(dense, saved)


def test_every_hook_has_a_test():
    assert set(HOOK_TESTS) == set(HOOK_NAMES)
    for test in HOOK_TESTS.values():
        assert callable(globals().get(test)), test


def test_entry_point_plugins_are_discovered(tmp_path, monkeypatch):
    (tmp_path / "starfish_demo_ext.py").write_text(textwrap.dedent("""
        import starfish_plugin as starfish

        @starfish.hookimpl
        def starfish_supported_forms():
            return ["demo-ext form"]
    """))
    dist = tmp_path / "starfish_demo_ext-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: starfish-demo-ext\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[starfish]\ndemo_ext = starfish_demo_ext\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        pm = build_plugin_manager()
        assert pm.has_plugin("demo_ext")
        assert "demo-ext form" in [f for forms in pm.hook.starfish_supported_forms() for f in forms]
        monkeypatch.setenv("STARFISH_PLUGINS", "torch_masks")
        pm = build_plugin_manager()
        assert [name for name, _ in pm.list_name_plugin()] == ["torch_masks"]
    finally:
        sys.modules.pop("starfish_demo_ext", None)


def test_misspelled_hook_fails_loudly():
    class Typo:
        @starfish.hookimpl
        def starfish_epoch_endd(self, epoch):
            pass

    pm = build_plugin_manager()
    pm.register(Typo())
    with pytest.raises(Exception, match="starfish_epoch_endd"):
        pm.check_pending()


def test_trace_env_prints_hook_calls(monkeypatch, pruned, capsys):
    monkeypatch.setenv("STARFISH_TRACE_HOOKS", "1")
    reset_plugin_manager()
    starfish.find_masks(pruned)
    trace = "[starfish] starfish_find_masks(dense, model) -> [nm_layouts, tp_graph, torch_masks]"
    assert trace in capsys.readouterr().err


def test_attaching_twice_is_refused_and_a_generator_too(dense, images, fast):
    from torch.ao.pruning import WeightNormSparsifier

    model = copy.deepcopy(dense)
    sparsifier = WeightNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 4), zeros_per_block=4)
    sparsifier.prepare(model, [{"tensor_fqn": "blocks.0.mlp.fc1.weight"}])
    first = starfish.attach(sparsifier, dense, images, fast)
    with pytest.raises(starfish.errors.AttachError, match="already attached \\(each step would heal twice\\)"):
        starfish.attach(sparsifier, dense, images, fast)
    sparsifier.step()
    assert first.steps == 1 and len(first.reports) == 1  # one heal per step
    first.detach()
    assert "step" not in sparsifier.__dict__
    first.detach()  # a second detach is harmless
    with pytest.raises(TypeError, match="can be read only once.*list\\(batches\\)"):
        starfish.attach(sparsifier, dense, (b for b in images.split(16)), fast)
    assert "step" not in sparsifier.__dict__  # nothing attached
    again = starfish.attach(sparsifier, dense, list(images.split(16)), fast)
    sparsifier.step()
    sparsifier.step()  # the list is read again at every step
    assert again.steps == 2 and len(again.reports) == 2


def test_attach_rejects_objects_without_step_or_model(dense, images):
    with pytest.raises(TypeError, match="step"):
        starfish.attach(object(), dense, images)

    class NoModel:
        def step(self):
            pass

    with pytest.raises(TypeError, match="no .model"):
        starfish.attach(NoModel(), dense, images)


class ToyFormat:
    """A third-party file format: ``{"toy": 1, "weights": state_dict}``, read and written by hooks."""

    def __init__(self):
        self.loaded = self.saved = 0

    @starfish.hookimpl
    def starfish_file_formats(self):
        return ["toy"]

    @starfish.hookimpl
    def starfish_detect_format(self, obj):
        return "toy" if isinstance(obj, dict) and obj.get("toy") == 1 else None

    @starfish.hookimpl
    def starfish_load_pruned(self, model, obj, fmt, source):
        if fmt != "toy":
            return None
        self.loaded += 1
        model.load_state_dict(obj["weights"])
        return model

    @starfish.hookimpl
    def starfish_save_pruned(self, model, fmt, path):
        if fmt != "toy":
            return None
        self.saved += 1
        torch.save({"toy": 1, "weights": model.state_dict()}, path)
        return True


def test_file_format_hooks_from_a_registered_plugin(dense, tmp_path):
    from starfish_plugin.io.model_files import load_pruned, pruned_formats, save_pruned

    plugin = ToyFormat()
    starfish.plugin_manager().register(plugin)
    model = copy.deepcopy(dense)
    with torch.no_grad():
        model.head.weight.zero_()
    save_pruned(model, "toy", tmp_path / "m.pt")
    loaded, fmt = load_pruned(dense, tmp_path / "m.pt")  # format detected by the plugin
    assert "toy" in pruned_formats() and fmt == "toy" and (plugin.saved, plugin.loaded) == (1, 1)
    assert torch.equal(loaded.head.weight, torch.zeros_like(dense.head.weight))
    assert not torch.equal(dense.head.weight, loaded.head.weight)  # built on a copy


class ToyState:
    @starfish.hookimpl
    def starfish_fold_masks(self, model, state):
        state["head.weight"] = state["head.weight"] * 0.5

    @starfish.hookimpl
    def starfish_remove_masks(self, model):
        model.removed = True

    @starfish.hookimpl
    def starfish_export_state(self, model):
        return {"toy_state": {"tag": getattr(model, "toy_tag", None)}}

    @starfish.hookimpl
    def starfish_import_state(self, model, state, source):
        model.toy_tag = state["toy_state"]["tag"]


def test_state_hooks_from_a_registered_plugin(dense):
    from starfish_plugin.deploy.fold import folded_copy
    from starfish_plugin.io.structured import load_structured_, plain_state_dict, structured_state

    starfish.plugin_manager().register(ToyState())
    dense.toy_tag = "kept"
    folded = plain_state_dict(dense)
    assert torch.equal(folded["head.weight"], dense.head.weight.detach() * 0.5)
    saved = structured_state(dense)
    assert saved["toy_state"] == {"tag": "kept"}
    restored = load_structured_(copy.deepcopy(dense), saved)
    assert restored.toy_tag == "kept"
    deployed = folded_copy(dense)
    assert deployed.removed and not hasattr(dense, "removed")  # on a copy


@pytest.mark.slow
def test_progress_bar_on_a_terminal_shows_samples_per_second_and_the_loss(tmp_path):
    import os
    import pty
    import subprocess

    code = textwrap.dedent(f"""
        import copy, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import torch
        from helpers import l1_prune_, tiny_vit
        import starfish_plugin as starfish
        dense = tiny_vit()
        images = torch.randn(64, 1, 8, 8)
        starfish.heal(l1_prune_(copy.deepcopy(dense)), dense, images, epochs=2, batch_size=16)
    """)
    import fcntl
    import struct
    import termios

    master, slave = pty.openpty()  # stderr is a real terminal (120 columns wide): the bar is drawn
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=slave, stdout=subprocess.DEVNULL)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=120) == 0
    text = b"".join(chunks).decode(errors="replace")
    assert "sample/s" in text and "epoch 1/2 loss" in text and "[starfish] epoch 2/2" in text, text[-2000:]
