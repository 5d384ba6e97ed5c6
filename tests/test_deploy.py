"""Sparse inference kernels: each kernel computes what the masked dense layer computes, the
selection keeps a kernel only where the measured gap is large, the input model is never changed,
and the swapped model saves and loads weights-only and runs under inference_mode and torch.compile."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.pruning import WeightNormSparsifier
from torch.nn.utils import prune

import starfish_plugin as starfish
from starfish_plugin.cli.main import main
from starfish_plugin.deploy.kernels import build_kernel, why_not
from starfish_plugin.errors import KernelError

GEN = torch.Generator().manual_seed(0)


def _linear(out_features: int, in_features: int) -> nn.Linear:
    layer = nn.Linear(in_features, out_features)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out_features, in_features, generator=GEN) * in_features**-0.5)
        layer.bias.copy_(torch.randn(out_features, generator=GEN))
    return layer


def _unstructured(layer: nn.Linear, sparsity: float) -> nn.Linear:
    with torch.no_grad():
        weight = layer.weight
        threshold = weight.abs().flatten().kthvalue(int(sparsity * weight.numel())).values
        weight[weight.abs() <= threshold] = 0
    return layer


def _zero_blocks(layer: nn.Linear, block: int, keep: float) -> nn.Linear:
    rows, cols = layer.weight.shape
    kept = torch.rand(rows // block, 1, cols // block, 1, generator=GEN) < keep
    with torch.no_grad():
        layer.weight.mul_(kept.expand(-1, block, -1, block).reshape(rows, cols))
    return layer


def _zero_lines(layer: nn.Linear, rows: float, columns: float) -> nn.Linear:
    with torch.no_grad():
        layer.weight[: int(rows * layer.out_features)] = 0
        layer.weight[:, : int(columns * layer.in_features)] = 0
    return layer


CASES = {
    "csr": lambda: _unstructured(_linear(96, 64), 0.9),
    "bsr": lambda: _zero_blocks(_linear(96, 64), 16, 0.3),
    "compact": lambda: _zero_lines(_linear(96, 64), 0.5, 0.25),
}


@pytest.mark.parametrize("kernel", CASES)
def test_each_cpu_kernel_computes_the_masked_dense_layer(kernel):
    layer = CASES[kernel]()
    assert why_not(kernel, layer) is None
    swapped = build_kernel(kernel, layer)
    x = torch.randn(3, 7, 64, generator=GEN)  # batch, tokens, features
    with torch.inference_mode():
        torch.testing.assert_close(swapped(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    assert swapped.kernel == kernel


def test_kernels_that_do_not_fit_say_why():
    unstructured = _unstructured(_linear(96, 64), 0.9)
    assert "all-zero blocks" in why_not("bsr", unstructured)
    assert "all-zero rows/columns" in why_not("compact", unstructured)
    assert "only on CUDA" in why_not("semi-structured-cusparselt", unstructured)
    with pytest.raises(KernelError, match="no zero-block structure"):
        build_kernel("bsr", unstructured)


def _model() -> nn.Sequential:
    """Layer 0: 95 % of its output rows zero (compact does 1/20 of the work); layer 2: 30 %
    unstructured on many rows (CSR is many times slower than dense there)."""
    model = nn.Sequential(_linear(1024, 512), nn.GELU(), _linear(512, 1024))
    _zero_lines(model[0], 0.95, 0.0)
    prune.l1_unstructured(model[2], "weight", amount=0.3)  # a prune hook: folded by the selection
    return model


def test_auto_keeps_a_kernel_only_where_it_is_far_faster_and_never_changes_the_model():
    model = _model()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(512, 512, generator=GEN)
    swapped, report = starfish.sparsify_for_inference(model, x, repeats=10)
    by_name = {layer.name: layer for layer in report.layers}
    assert by_name["0"].kernel == "compact" and by_name["0"].sparsity == pytest.approx(0.95, abs=0.01)
    assert by_name["2"].kernel == "dense" and "csr" in {**by_name["2"].candidates, **by_name["2"].skipped}
    assert by_name["2"].skipped["bsr"].startswith("fewer than")
    assert report.swapped == {"0": "compact"} and report.outputs_match and not report.reverted
    assert isinstance(swapped[0], nn.Module) and type(swapped[0]).__name__ == "CompactLinear"
    # the model given keeps its prune hook and its weights
    assert hasattr(model[2], "weight_mask") and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not hasattr(swapped[2], "weight_mask") and not swapped[2]._forward_pre_hooks
    with torch.inference_mode():
        torch.testing.assert_close(swapped(x), model(x), rtol=1e-4, atol=1e-4)
    data = report.to_dict()
    assert {"device", "batch_size", "dense_ms", "sparse_ms", "speedup", "layers"} <= set(data)
    assert data["batch_size"] == 512 and data["device"] == "cpu"
    assert "end to end on cpu" in report.summary()


def test_a_named_kernel_is_used_wherever_it_fits_and_dense_swaps_nothing():
    model = _model()
    x = torch.randn(4, 512, generator=GEN)
    swapped, report = starfish.sparsify_for_inference(model, x, kernels="csr", repeats=3)
    assert report.swapped == {"0": "csr", "2": "csr"} and report.outputs_match
    _, report = starfish.sparsify_for_inference(model, x, kernels="dense", repeats=3)
    assert report.swapped == {} and {layer.kernel for layer in report.layers} == {"dense"}
    assert report.sparse_ms == report.dense_ms and report.speedup == 1.0  # nothing swapped: nothing to compare


def test_stray_zeros_in_a_dense_weight_are_not_pruning():
    model = nn.Sequential(_unstructured(_linear(64, 64), 0.5), nn.ReLU(), _linear(64, 64))
    with torch.no_grad():
        model[2].weight[0, 0] = 0.0  # one exact zero in 4,096 weights
    _, report = starfish.sparsify_for_inference(model, torch.randn(4, 64), kernels="csr", repeats=3)
    assert [layer.name for layer in report.layers] == ["0"]
    _, report = starfish.sparsify_for_inference(model, torch.randn(4, 64), kernels="csr", repeats=3, min_sparsity=0)
    assert [layer.name for layer in report.layers] == ["0", "2"]


def test_parametrized_masks_are_folded():
    model = nn.Sequential(_linear(64, 64), nn.ReLU(), _linear(64, 64))
    sparsifier = WeightNormSparsifier(sparsity_level=1.0, sparse_block_shape=(1, 4), zeros_per_block=2)
    sparsifier.prepare(model, [{"tensor_fqn": "0.weight"}, {"tensor_fqn": "2.weight"}])
    sparsifier.step()
    x = torch.randn(8, 64, generator=GEN)
    swapped, report = starfish.sparsify_for_inference(model, x, kernels="csr", repeats=3)
    assert [layer.sparsity for layer in report.layers] == [0.5, 0.5]
    assert hasattr(model[0], "parametrizations") and not hasattr(swapped[0], "parametrizations")
    with torch.inference_mode():
        torch.testing.assert_close(swapped(x), model(x), rtol=1e-5, atol=1e-5)


def test_bad_arguments_are_refused_with_the_fix():
    model = _model()
    x = torch.randn(4, 512)
    with pytest.raises(KernelError, match="choose 'auto', 'dense' or from"):
        starfish.sparsify_for_inference(model, x, kernels="fastest")
    with pytest.raises(KernelError, match="at least 3"):
        starfish.sparsify_for_inference(model, x, repeats=1)
    with pytest.raises(KernelError, match="pass the batch to time with"):
        starfish.sparsify_for_inference(model, None)  # type: ignore[arg-type]


def test_interleaved_timing_drops_hopeless_candidates_and_keeps_rounds_aligned(monkeypatch):
    from starfish_plugin.deploy import timing

    clock = [0.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    calls: list[str] = []

    def costs(name: str, seconds: float):
        def run() -> None:
            calls.append(name)
            clock[0] += seconds
        return run

    candidates = {"dense": costs("dense", 1.0), "fast": costs("fast", 0.5), "slowish": costs("slowish", 3.0),
                  "hopeless": costs("hopeless", 10.0)}
    times = timing.interleaved_times(candidates, repeats=6, device=torch.device("cpu"))
    assert times["hopeless"] == [10.0]  # first call over 4x dense: timed once
    assert times["slowish"] == [3.0] * 3  # over 2x dense after 3 rounds: dropped
    assert times["dense"] == [1.0] * 6 and times["fast"] == [0.5] * 6
    assert timing.faster_beyond_noise(times["fast"], times["dense"], 0.05)
    assert not timing.faster_beyond_noise(times["dense"], times["fast"], 0.05)
    assert not timing.faster_beyond_noise(times["hopeless"], times["dense"], 0.05)  # one sample decides nothing
    assert calls[-6:] == ["fast", "dense", "dense", "fast", "fast", "dense"]  # rounds 4-6: the order rotates


def test_the_swapped_model_saves_and_loads_weights_only(tmp_path):
    model = nn.Sequential(CASES["csr"](), nn.ReLU(), _linear(64, 96), nn.ReLU(), CASES["compact"]())
    model[2] = _zero_blocks(model[2], 16, 0.3)
    x = torch.randn(5, 64, generator=GEN)
    swapped, report = starfish.sparsify_for_inference(model, x, kernels=["csr", "bsr", "compact"], repeats=3)
    assert set(report.swapped.values()) >= {"csr"}
    path = tmp_path / "inference.pt"
    starfish.save_for_inference(swapped, path)
    torch.load(path, weights_only=True)  # no pickled code in the file
    fresh = nn.Sequential(_linear(96, 64), nn.ReLU(), _linear(64, 96), nn.ReLU(), _linear(96, 64))
    loaded = starfish.load_for_inference(fresh, path)
    assert {n: type(m).__name__ for n, m in loaded.named_children()} == \
        {n: type(m).__name__ for n, m in swapped.named_children()}
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), swapped(x), rtol=0, atol=0)
    with pytest.raises(KernelError, match="build the model with the saved shapes"):
        starfish.load_for_inference(nn.Sequential(_linear(32, 64), nn.ReLU(), _linear(64, 32), nn.ReLU(),
                                                  _linear(96, 64)), path)
    torch.save(swapped.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(KernelError, match="not a file written by save_for_inference"):
        starfish.load_for_inference(fresh, tmp_path / "plain.pt")


@pytest.mark.slow
def test_the_swapped_model_runs_under_torch_compile():
    model = nn.Sequential(CASES["csr"](), nn.GELU(), CASES["compact"]().requires_grad_(False))
    model[2] = _zero_lines(_linear(32, 96), 0.5, 0.0)
    x = torch.randn(6, 64, generator=GEN)
    swapped, report = starfish.sparsify_for_inference(model, x, kernels=["csr", "compact"], repeats=3)
    assert report.swapped["0"] == "csr" and report.swapped["2"] in ("csr", "compact")  # layer 2 fits both
    compiled = torch.compile(swapped)
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x), swapped(x), rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="2:4 kernels need a CUDA GPU")
@pytest.mark.parametrize("backend", ["cusparselt", "cutlass"])
def test_semi_structured_kernels_on_cuda(backend, tmp_path):
    model = nn.Sequential(_linear(256, 128), nn.ReLU(), _linear(128, 256)).cuda().half()
    sparsifier = WeightNormSparsifier(sparsity_level=1.0, sparse_block_shape=(1, 4), zeros_per_block=2)
    sparsifier.prepare(model, [{"tensor_fqn": "0.weight"}, {"tensor_fqn": "2.weight"}])
    sparsifier.step()
    x = torch.randn(64, 128, device="cuda", dtype=torch.half)
    kernel = f"semi-structured-{backend}"
    swapped, report = starfish.sparsify_for_inference(model, x, kernels=kernel, repeats=5)
    assert report.swapped == {"0": kernel, "2": kernel} and report.outputs_match
    starfish.save_for_inference(swapped, tmp_path / "s.pt")
    fresh = nn.Sequential(_linear(256, 128), nn.ReLU(), _linear(128, 256)).cuda().half()
    loaded = starfish.load_for_inference(fresh, tmp_path / "s.pt")
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), swapped(x))


def test_bench_cli_writes_the_json_contract_and_a_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason='the plot needs the bench extra: pip install "starfish-plugin[bench]"')
    from starfish_plugin.demo.run import prune_vit_
    from starfish_plugin.demo.zoo import load_checkpoint

    dense = load_checkpoint("vit_digits")
    torch.save(dense.state_dict(), tmp_path / "dense.pt")
    torch.save(prune_vit_(copy.deepcopy(dense), 0.9).state_dict(), tmp_path / "pruned.pt")
    args = ["bench", "--model", "starfish:vit_digits", "--dense", str(tmp_path / "dense.pt"),
            "--weights", str(tmp_path / "pruned.pt"), "--repeats", "3", "--batch-size", "4"]
    assert main([*args, "--kernels", "csr", "--json", str(tmp_path / "b.json"), "--plot", str(tmp_path / "b.png")]) == 0
    data = json.loads((tmp_path / "b.json").read_text())
    assert {"device", "batch_size", "dense_ms", "sparse_ms", "speedup", "layers"} <= set(data)
    assert data["batch_size"] == 4 and data["device"] == "cpu" and data["layers"]
    for layer in data["layers"]:
        assert {"name", "sparsity", "kernel", "dense_ms", "kernel_ms"} <= set(layer)
        assert layer["kernel"] == "csr" and layer["sparsity"] == pytest.approx(0.9, abs=0.01)
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
    out = capsys.readouterr().out
    assert "end to end against the dense model" in out and "blocks.0.attn.qkv" in out
    assert main([*args, "--kernels", "dense", "--json", str(tmp_path / "d.json")]) == 0
    assert {layer["kernel"] for layer in json.loads((tmp_path / "d.json").read_text())["layers"]} == {"dense"}
    with pytest.raises(SystemExit) as exc:
        main([*args, "--repeats", "2"])
    assert exc.value.code == 2 and "medians need at least 3 timed rounds" in capsys.readouterr().err
