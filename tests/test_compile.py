"""``HealConfig.compile``: the pruned model's training forward through the real ``torch.compile``."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from helpers import assert_state_equal, l1_prune_, state_copy, tiny_vit
from torch.ao.pruning import WeightNormSparsifier

import starfish_plugin as starfish
from starfish_plugin.errors import CompileError, ConfigError

CFG = dict(epochs=2, batch_size=16, quiet=True, diagnostic_samples=0, targets="memory")


class GraphRecorder:
    """A ``torch.compile`` backend that keeps every FX graph dynamo hands it and runs it as traced."""

    __name__ = "graph_recorder"

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.graphs.append(gm)
        return gm.forward


def nm_sparsify_(model: torch.nn.Module) -> torch.nn.Module:
    sparsifier = WeightNormSparsifier(sparsity_level=1.0, sparse_block_shape=(1, 4), zeros_per_block=2)
    config = [{"tensor_fqn": f"{n}.weight"} for n, m in model.named_modules() if n.endswith(("fc1", "fc2"))]
    sparsifier.prepare(model, config)
    sparsifier.step()
    return model


@pytest.mark.slow
@pytest.mark.parametrize("prune_", [l1_prune_, nm_sparsify_], ids=["prune-hooks", "ao-parametrizations"])
def test_compiled_heal_matches_eager(prune_):
    torch._dynamo.reset()
    dense = tiny_vit()
    calib = torch.randn(48, 1, 8, 8)
    eager_model, compiled_model = prune_(copy.deepcopy(dense)), prune_(copy.deepcopy(dense))
    eager = starfish.heal(eager_model, dense, calib, **CFG)
    recorder = GraphRecorder()
    compiled = starfish.heal(compiled_model, dense, calib, compile="default", compile_backend=recorder, **CFG)

    assert recorder.graphs, "torch.compile never handed a graph to the backend"
    if prune_ is l1_prune_:  # the whole forward is one graph: the block-output hooks were traced
        # into it, so it returns the two blocks' [B, T, D] outputs besides the logits. (With
        # parametrizations the forward splits at graph breaks; there the loss check is the evidence.)
        def block_outputs(gm: torch.fx.GraphModule) -> int:
            outputs = [n for n in gm.graph.nodes if n.op == "output"][0].args[0]
            shapes = [
                tuple(o.meta["example_value"].shape) for o in outputs if "example_value" in getattr(o, "meta", {})
            ]
            return sum(len(shape) == 3 and shape[-1] == 32 for shape in shapes)

        assert any(block_outputs(g) >= 2 for g in recorder.graphs)
    assert compiled.mask_unchanged and compiled.masked_weights_zero
    assert compiled.compiled == compiled.config["compile"] != "none" and eager.compiled == ""
    assert compiled.config["compile_backend"] == "graph_recorder"
    assert compiled.epoch_losses == pytest.approx(eager.epoch_losses, rel=1e-4)
    assert compiled.epoch_losses[-1] < compiled.epoch_losses[0]
    for (name, a), b in zip(eager_model.state_dict().items(), compiled_model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), name


@pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "c++", "clang++")), reason="inductor on CPU needs a C++ compiler"
)
@pytest.mark.slow
def test_inductor_heal_on_cpu():
    """The default backend, as users get it."""
    torch._dynamo.reset()
    dense = tiny_vit()
    calib = torch.randn(32, 1, 8, 8)
    eager_model, compiled_model = l1_prune_(copy.deepcopy(dense)), l1_prune_(copy.deepcopy(dense))
    eager = starfish.heal(eager_model, dense, calib, **(CFG | {"epochs": 1}))
    compiled = starfish.heal(compiled_model, dense, calib, compile="default", **(CFG | {"epochs": 1}))
    assert compiled.mask_unchanged and compiled.masked_weights_zero
    assert compiled.epoch_losses == pytest.approx(eager.epoch_losses, rel=1e-3)


def test_failing_compile_restores_weights():
    torch._dynamo.reset()

    def broken_backend(gm, example_inputs):
        raise RuntimeError("backend cannot handle this graph")

    dense = tiny_vit()
    pruned = l1_prune_(copy.deepcopy(dense))
    dense_before, pruned_before = state_copy(dense), state_copy(pruned)
    with pytest.raises(CompileError, match="RuntimeError: backend cannot handle this graph.*compile='none'.*aot_eager"):
        starfish.heal(pruned, dense, torch.randn(32, 1, 8, 8), compile="default", compile_backend=broken_backend, **CFG)
    assert_state_equal(dense, dense_before)
    assert_state_equal(pruned, pruned_before)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"compile": "fast"}, "compile must be one of"),
        ({"compile": "default", "compile_backend": "no_such_backend"}, "not a torch.compile backend; choose from"),
    ],
)
def test_bad_compile_settings_refused(overrides, message):
    dense = tiny_vit()
    pruned = l1_prune_(copy.deepcopy(dense))
    before = state_copy(pruned)
    with pytest.raises(ConfigError, match=message):
        starfish.heal(pruned, dense, torch.randn(32, 1, 8, 8), **overrides)
    assert_state_equal(pruned, before)


@pytest.mark.slow
def test_every_heal_compiles_even_past_dynamo_recompile_limit():
    """Dynamo stops compiling a code object after ``recompile_limit`` variants and silently runs
    it eagerly; each heal must compile its own forward however many heals came before."""
    torch._dynamo.reset()
    dense = tiny_vit()
    calib = torch.randn(32, 1, 8, 8)
    with torch._dynamo.config.patch(recompile_limit=1):
        for _ in range(3):
            recorder = GraphRecorder()
            starfish.heal(
                l1_prune_(copy.deepcopy(dense)),
                dense,
                calib,
                compile="default",
                compile_backend=recorder,
                **(CFG | {"epochs": 1}),
            )
            assert recorder.graphs, "this heal ran eagerly: the compiled forward hit the recompile limit"
