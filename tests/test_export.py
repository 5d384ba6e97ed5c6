"""Serving exports: Hugging Face folders reload with transformers bit for bit, ONNX files run in ONNX
Runtime like the PyTorch model, weights-only torch files rebuild their architecture; bad input
writes nothing. Real toolkits: torch.nn.utils.prune, torch.ao 2:4 parametrizations, Torch-Pruning."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import l1_prune_, sparsify_2_4_, tiny_vit
from test_language_models import VOCAB, tiny_gpt2, tiny_llama
from test_sequential import prune_decoder_
from torch import nn
from torch.nn.utils import prune

import starfish_plugin as starfish
from starfish_plugin import errors
from starfish_plugin.serve.export import plain_copy

transformers = pytest.importorskip("transformers")


def tokens(n: int = 64) -> torch.Tensor:
    return torch.randint(1, VOCAB, (n, 12), generator=torch.Generator().manual_seed(0))


def healed(make, **overrides) -> tuple[nn.Module, starfish.HealReport]:
    dense = make()
    pruned = prune_decoder_(copy.deepcopy(dense))
    report = starfish.heal(pruned, dense, tokens(), epochs=2, batch_size=16, quiet=True, **overrides)
    return pruned, report


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b), set(a) ^ set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_hf_export_reloads_with_transformers_bit_for_bit(make, tmp_path):
    pruned, report = healed(make)
    before = {k: v.clone() for k, v in pruned.state_dict().items()}
    out = starfish.export(pruned, tmp_path / "hf", format="hf", report=report)
    assert_same_tensors(pruned.state_dict(), before)  # the model itself is not changed
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    reloaded = type(pruned).from_pretrained(out).eval()
    want = plain_copy(pruned)
    assert_same_tensors(reloaded.state_dict(), want.state_dict())
    x = tokens(4)
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, pruned(x).logits)
    if make is tiny_gpt2:  # tied embeddings stay tied
        assert reloaded.lm_head.weight.data_ptr() == reloaded.transformer.wte.weight.data_ptr()
    facts = json.loads((out / "starfish.json").read_text())
    layer = "model.layers.0.mlp.up_proj.weight" if make is tiny_llama else "transformer.h.0.mlp.c_fc.weight"
    assert facts["layers"][layer]["pattern"] == "unstructured" and facts["layers"][layer]["zeros"] >= 0.6
    assert facts["heal"]["held_out_after"] == report.held_out_after and "torch" in facts["versions"]
    assert "healed with STARFISH" in (out / "README.md").read_text()
    loaded = starfish.load_exported(out)
    assert_same_tensors(loaded.state_dict(), want.state_dict())


def test_hf_export_of_2_4_parametrizations_stays_2_4(tmp_path):
    dense = tiny_llama()
    pruned = copy.deepcopy(dense)
    layers = sparsify_2_4_(pruned, ".layers.")
    report = starfish.heal(pruned, dense, tokens(), epochs=2, batch_size=16, quiet=True)
    out = starfish.export(pruned, tmp_path / "hf24", format="hf", report=report)
    reloaded = transformers.LlamaForCausalLM.from_pretrained(out)
    assert_same_tensors(reloaded.state_dict(), plain_copy(pruned).state_dict())
    facts = json.loads((out / "starfish.json").read_text())
    assert {facts["layers"][f"{n}.weight"]["pattern"] for n in layers} == {"2:4"}
    assert hasattr(pruned.get_submodule(layers[0]), "parametrizations")  # the user's model keeps its form


def test_hf_export_of_a_torch_pruning_mlp_cut_rebuilds_from_its_config(tmp_path):
    pytest.importorskip("torch_pruning")
    from starfish_plugin.adapters.recipes import prune_llama_mlp_width_

    dense = tiny_llama()
    pruned = copy.deepcopy(dense)
    prune_llama_mlp_width_(pruned, tokens(2), ratio=0.5)
    assert pruned.model.layers[0].mlp.up_proj.out_features == 32
    out = starfish.export(pruned, tmp_path / "tp", format="hf")
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 32
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert_same_tensors(reloaded.state_dict(), pruned.state_dict())


def shipped_vit() -> nn.Module:
    from starfish_plugin.demo.zoo import load_checkpoint

    return load_checkpoint("vit_fmnist")


@pytest.mark.slow
def test_onnx_export_of_the_shipped_vit_matches_pytorch_in_onnxruntime(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    dense = shipped_vit()
    pruned = copy.deepcopy(dense)
    linears = [(m, "weight") for m in pruned.blocks.modules() if isinstance(m, nn.Linear)]
    prune.global_unstructured(linears, pruning_method=prune.L1Unstructured, amount=0.9)
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    out = starfish.export(pruned, tmp_path / "onnx", format="onnx", example_inputs=x[:2])
    facts = json.loads((out / "starfish.json").read_text())
    assert facts["checks"]["onnxruntime max abs difference to PyTorch"] <= 1e-4
    session = starfish.load_exported(out)
    with torch.no_grad():
        want = pruned(x)
    assert (session(x) - want).abs().max() <= 1e-4  # a batch of 8 through a file traced at 2: dynamic batch


@pytest.mark.slow
def test_onnx_export_of_a_torch_pruning_resnet_is_smaller_and_matches(tmp_path):
    pytest.importorskip("onnxruntime")
    tp = pytest.importorskip("torch_pruning")
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    dense = torchvision.models.resnet18(num_classes=10).eval()
    pruned = copy.deepcopy(dense)
    x = torch.randn(2, 3, 64, 64)
    pruner = tp.pruner.MetaPruner(pruned, x, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=0.5, ignored_layers=[pruned.fc])
    pruner.step()
    small = starfish.export(pruned, tmp_path / "pruned", format="onnx", example_inputs=x)
    large = starfish.export(dense, tmp_path / "dense", format="onnx", example_inputs=x)
    assert json.loads((small / "starfish.json").read_text())["checks"]["onnxruntime max abs difference to PyTorch"] \
        <= 1e-4
    assert (small / "model.onnx").stat().st_size < 0.5 * (large / "model.onnx").stat().st_size


def test_torch_export_rebuilds_the_architecture_bit_for_bit(tmp_path):
    dense = shipped_vit()
    pruned = l1_prune_(copy.deepcopy(dense), amount=0.8)
    with pytest.raises(errors.ExportError, match="model_spec"):
        starfish.export(pruned, tmp_path / "nospec", format="torch")
    assert not (tmp_path / "nospec").exists()
    out = starfish.export(pruned, tmp_path / "torch", format="torch", model_spec="starfish:vit_fmnist")
    loaded = starfish.load_exported(out)
    assert_same_tensors(loaded.state_dict(), plain_copy(pruned).state_dict())
    # overwrite=True replaces it whole, and leaves nothing else beside it
    denser = l1_prune_(copy.deepcopy(dense), amount=0.3)
    starfish.export(denser, out, format="torch", model_spec="starfish:vit_fmnist", overwrite=True)
    assert_same_tensors(starfish.load_exported(out).state_dict(), plain_copy(denser).state_dict())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["torch"]


class Branchy(nn.Module):
    """Python control flow on a tensor's value: not traceable to one ONNX graph."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) if float(x.sum()) > 0 else -self.fc(x)


@pytest.mark.parametrize("case, message", [
    ("not hf", "needs a Hugging Face transformers model"),
    ("unknown format", "unknown export format 'tflite'"),
    ("untraceable", "could not be exported to ONNX"),
    ("not empty", "exists and is not empty"),
    ("onnx without input", "pass example_inputs"),
    pytest.param("torchao without cuda", "no CUDA device is available here",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
])
def test_bad_exports_name_the_problem_and_leave_the_disk_as_it_was(case, message, tmp_path):
    target = tmp_path / "out"
    model: nn.Module = tiny_vit(depth=1)
    kwargs: dict = {"format": "hf"}
    if case == "unknown format":
        kwargs = {"format": "tflite"}
    elif case == "untraceable":
        pytest.importorskip("onnxscript")
        model, kwargs = Branchy(), {"format": "onnx", "example_inputs": torch.randn(2, 4)}
    elif case == "not empty":
        target.mkdir()
        (target / "keep.txt").write_text("mine")
        kwargs = {"format": "torch", "model_spec": "starfish:vit_digits"}
    elif case == "onnx without input":
        kwargs = {"format": "onnx"}
    elif case == "torchao without cuda":
        kwargs = {"format": "torchao-2:4"}
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(errors.ExportError, match=message):
        starfish.export(model, target, **kwargs)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def llama_2_4_mlp() -> tuple[nn.Module, nn.Module, list[str]]:
    """A Llama wide enough for the 2:4 kernels' shapes, its MLP 2:4 by torch.ao parametrizations."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
    dense = transformers.LlamaForCausalLM(config).eval()
    pruned = copy.deepcopy(dense)
    return dense, pruned, sparsify_2_4_(pruned, ".mlp.")


def test_torchao_export_packs_exactly_the_2_4_linears():
    from starfish_plugin.serve.torchao_file import packable_layers

    _, pruned, mlp = llama_2_4_mlp()
    packed, dense = packable_layers(plain_copy(pruned), torch.float16)
    assert packed == mlp  # every 2:4 MLP layer, nothing else
    assert "model.layers.0.self_attn.q_proj" in dense and "lm_head" in dense
    assert all("2:4" in why for why in dense.values())


def test_a_packed_module_written_for_torchao_loads_back(tmp_path):
    """The file half of the torchao export, on CPU: a 2:4-packed weight (built from its parts, since
    packing needs CUDA) with the ``extra_repr`` torchao's ``sparsify_`` binds on the module."""
    import types

    from torch.sparse import SparseSemiStructuredTensorCUTLASS

    ao = pytest.importorskip("torchao.sparsity.sparse_api")
    from starfish_plugin.serve.torchao_file import write_packed

    half = torch.float16
    packed = SparseSemiStructuredTensorCUTLASS(torch.Size([32, 64]), torch.ones(32, 32, dtype=half),
                                               torch.zeros(32, 4, dtype=torch.int16), torch.ones(64, 16, dtype=half),
                                               torch.zeros(64, 2, dtype=torch.int16), None)
    model = nn.Sequential(nn.Linear(64, 32).half())
    model[0].weight = nn.Parameter(packed, requires_grad=False)
    model[0].extra_repr = types.MethodType(ao._linear_extra_repr, model[0])
    write_packed(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert isinstance(loaded[0].weight, SparseSemiStructuredTensorCUTLASS)
    assert torch.equal(loaded[0].weight.packed, packed.packed) and torch.equal(loaded[0].bias, model[0].bias)
    assert "in_features=64" in repr(loaded)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torchao's 2:4 kernels need a CUDA GPU")
def test_torchao_export_round_trips_on_cuda(tmp_path):
    pytest.importorskip("torchao")
    from torch.sparse import SparseSemiStructuredTensor

    dense, pruned, mlp = llama_2_4_mlp()
    report = starfish.heal(pruned, dense, tokens(), epochs=1, batch_size=16, quiet=True)
    x = tokens(4)
    out = starfish.export(pruned, tmp_path / "ao", format="torchao-2:4", report=report, example_inputs=x)
    facts = json.loads((out / "starfish.json").read_text())
    assert facts["packed_layers"] == mlp and facts["dtype"] == "float16"
    assert facts["checks"]["relative to the output's largest value"] <= 2e-2
    loaded = starfish.load_exported(out)
    assert all(isinstance(loaded.get_submodule(n).weight, SparseSemiStructuredTensor) for n in mlp)
    with torch.no_grad():
        want = plain_copy(pruned).to("cuda", torch.float16)(x.cuda()).logits.float()
        got = loaded(x.cuda()).logits.float()
    assert (got - want).abs().max() <= 2e-2 * want.abs().max()


@pytest.mark.slow
def test_cli_export_writes_onnx_and_torch_and_refuses_a_full_directory(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from starfish_plugin.cli.main import main
    from starfish_plugin.demo.zoo import load_checkpoint
    from starfish_plugin.io.model_files import save_pruned

    pruned = l1_prune_(load_checkpoint("vit_digits"), amount=0.8)
    weights = tmp_path / "healed.pt"
    save_pruned(pruned, "weights", weights)
    common = ["export", "--model", "starfish:vit_digits", "--weights", str(weights)]
    assert main([*common, "--format", "onnx", "--out", str(tmp_path / "onnx")]) == 0
    assert main([*common, "--format", "torch", "--out", str(tmp_path / "torch")]) == 0
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        want = pruned(x)
    assert (starfish.load_exported(tmp_path / "onnx")(x) - want).abs().max() <= 1e-4
    assert torch.equal(starfish.load_exported(tmp_path / "torch")(x), want)
    assert main([*common, "--format", "torch", "--out", str(tmp_path / "onnx")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "onnx" / "model.onnx").is_file()  # left as it was


@pytest.mark.slow
def test_cli_bench_on_onnxruntime_writes_the_bench_json_with_the_runtime(tmp_path):
    pytest.importorskip("onnxruntime")
    from starfish_plugin.cli.main import main
    from starfish_plugin.demo.zoo import load_checkpoint
    from starfish_plugin.io.model_files import save_pruned

    dense = load_checkpoint("vit_digits")
    torch.save(dense.state_dict(), tmp_path / "dense.pt")
    save_pruned(l1_prune_(copy.deepcopy(dense), amount=0.8), "weights", tmp_path / "healed.pt")
    out = tmp_path / "bench.json"
    args = ["bench", "--model", "starfish:vit_digits", "--dense", str(tmp_path / "dense.pt"), "--weights",
            str(tmp_path / "healed.pt"), "--runtime", "onnxruntime", "--batch-size", "4", "--repeats", "3"]
    assert main([*args, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["runtime"] == "onnxruntime" and result["batch_size"] == 4
    assert {"device", "dense_ms", "sparse_ms", "speedup", "layers"} <= set(result)
    assert {"name", "sparsity", "kernel", "dense_ms", "kernel_ms"} <= set(result["layers"][0])
    assert main([*args, "--kernels", "csr"]) == 2  # a torch-runtime option: refused, one line
