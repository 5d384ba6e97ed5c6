"""The weights-only structured file: Torch-Pruning models saved without pickled modules, read back
onto a fresh architecture (shapes, attributes, kept-channel record), healed from the CLI."""

from __future__ import annotations

import copy
import io
import json

import pytest
import timm
import torch
import torch_pruning as tp
from tp_cases import deit_embed, deit_heads

import starfish_plugin as starfish
from starfish_plugin.adapters import tp_graph
from starfish_plugin.cli.main import main
from starfish_plugin.demo.zoo import load_checkpoint
from starfish_plugin.io.structured import (
    StructuredCheckpointError,
    load_structured_,
    plain_state_dict,
    structured_state,
)


def deit() -> torch.nn.Module:
    return timm.create_model("deit_tiny_patch16_224", img_size=32, num_classes=10).eval()


def tp_prune(model: torch.nn.Module, setup, example: torch.Tensor, ratio: float = 0.25) -> torch.nn.Module:
    pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.GroupMagnitudeImportance(),
                                  pruning_ratio=ratio, **setup(model))
    tp_graph.track(pruner)
    pruner.step()
    return model


@pytest.mark.slow
@pytest.mark.parametrize("setup", [deit_embed, deit_heads], ids=["residual+mlp", "heads"])
def test_round_trip_is_weights_only_and_heals_the_same(setup, tmp_path):
    torch.manual_seed(0)
    dense = deit()
    pruned = tp_prune(copy.deepcopy(dense), setup, torch.randn(2, 3, 32, 32))
    torch.save(structured_state(pruned), tmp_path / "pruned.pt")
    reloaded = load_structured_(deit(), torch.load(tmp_path / "pruned.pt", weights_only=True))

    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(pruned(x), reloaded(x))
    assert [b.attn.num_heads for b in reloaded.blocks] == [b.attn.num_heads for b in pruned.blocks]
    calib = torch.randn(64, 3, 32, 32)
    cfg = dict(epochs=2, batch_size=16, quiet=True, diagnostic_samples=0, targets="memory")
    a, b = starfish.heal(pruned, dense, calib, **cfg), starfish.heal(reloaded, dense, calib, **cfg)
    assert a.target_alignment == b.target_alignment  # the kept-channel record came back with the file
    assert a.epoch_losses == b.epoch_losses
    if setup is deit_embed:
        assert "kept channels of" in b.target_alignment["blocks.0"]


def test_wrong_architecture_is_refused_and_the_model_untouched(tmp_path):
    pruned = tp_prune(deit(), deit_embed, torch.randn(2, 3, 32, 32))
    obj = structured_state(pruned)
    vit = load_checkpoint("vit_digits")  # also a timm VisionTransformer, other depth and width
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    with pytest.raises(StructuredCheckpointError, match="lacks|different tensors"):
        load_structured_(vit, obj)
    resnet = timm.create_model("resnet18", num_classes=10)
    with pytest.raises(StructuredCheckpointError, match="holds a pruned VisionTransformer, not a ResNet"):
        load_structured_(resnet, obj)
    assert all(torch.equal(v, before[k]) for k, v in vit.state_dict().items())


def test_plain_state_dict_folds_prune_masks_without_touching_the_model():
    from starfish_plugin.demo.run import prune_vit_

    dense = load_checkpoint("vit_digits")
    pruned = prune_vit_(copy.deepcopy(dense), 0.9)
    pruned(torch.randn(2, 1, 8, 8))
    state = plain_state_dict(pruned)
    assert set(state) == set(dense.state_dict())
    assert any(k.endswith("weight_orig") for k in pruned.state_dict())  # still pruned in place
    plain = load_checkpoint("vit_digits")
    plain.load_state_dict(state)
    x = torch.randn(5, 1, 8, 8)
    assert torch.allclose(plain(x), pruned(x))


@pytest.mark.slow
def test_cli_heals_a_structured_file_without_unsafe_pickle(tmp_path, capsys):
    from test_cli_heal import MODEL, _write_folder

    from starfish_plugin.demo.datasets import load_digits_split

    dense = load_checkpoint("vit_digits")
    torch.save(dense.state_dict(), tmp_path / "dense.pt")
    pruned = tp_prune(copy.deepcopy(dense), deit_embed, torch.rand(2, 1, 8, 8), 0.5)
    assert pruned.patch_embed.proj.out_channels < dense.patch_embed.proj.out_channels  # residual pruned
    torch.save(structured_state(pruned), tmp_path / "pruned.pt")
    torch.save(tp.state_dict(pruned), tmp_path / "pruned_tp.pt")
    heads = tp_prune(copy.deepcopy(dense), deit_heads, torch.rand(2, 1, 8, 8), 0.5)  # residual kept
    torch.save(tp.state_dict(heads), tmp_path / "heads_tp.pt")
    calib = _write_folder(tmp_path / "calib", load_digits_split()["train"][0][:128])
    base = ["heal", *MODEL, "--dense", str(tmp_path / "dense.pt"), "--calibration", str(calib), "--epochs", "1",
            "--quiet"]

    report = tmp_path / "report.json"
    assert main(base + ["--pruned", str(tmp_path / "pruned.pt"), "--out", str(tmp_path / "healed.pt"),
                        "--report", str(report)]) == 0
    assert "read as 'structured'" in capsys.readouterr().out
    data = json.loads(report.read_text())
    assert data["out_format"] == "structured" and "kept channels of" in data["report"]["target_alignment"]["blocks.0"]
    healed = load_structured_(load_checkpoint("vit_digits"), torch.load(tmp_path / "healed.pt", weights_only=True))
    assert healed.patch_embed.proj.out_channels == pruned.patch_embed.proj.out_channels

    # The same model as a Torch-Pruning pickle carries no kept-channel record: its blocks (whose width
    # changed) leave the loss, the final output is aligned, and the report says how to align them too.
    tp_report = tmp_path / "tp_report.json"
    assert main(base + ["--pruned", str(tmp_path / "pruned_tp.pt"), "--unsafe-pickle",
                        "--out", str(tmp_path / "tp_out.pt"), "--report", str(tp_report)]) == 0
    notes = " ".join(json.loads(tp_report.read_text())["report"]["notes"])
    assert "left out of the loss" in notes and "torch.save(structured_state(model), 'pruned.pt')" in notes
    assert json.loads(tp_report.read_text())["report"]["blocks"] == ["(output)"]
    capsys.readouterr()

    # A heads-only Torch-Pruning pickle (trusted, --unsafe-pickle) converted on the way out to the safe form.
    assert main(base + ["--pruned", str(tmp_path / "heads_tp.pt"), "--unsafe-pickle", "--out-format", "structured",
                        "--out", str(tmp_path / "converted.pt")]) == 0
    saved = torch.load(tmp_path / "converted.pt", weights_only=True)
    converted = load_structured_(load_checkpoint("vit_digits"), saved)
    assert [b.attn.num_heads for b in converted.blocks] == [b.attn.num_heads for b in heads.blocks]
    assert converted.blocks[0].attn.qkv.out_features < dense.blocks[0].attn.qkv.out_features


def test_ao_sparsified_model_round_trips_as_plain_weights():
    from torch.ao.pruning import WeightNormSparsifier

    model = load_checkpoint("vit_digits")
    sparsifier = WeightNormSparsifier(sparsity_level=1.0, sparse_block_shape=(1, 4), zeros_per_block=2)
    sparsifier.prepare(model, [{"tensor_fqn": "blocks.0.mlp.fc1.weight"}])
    sparsifier.step()
    buffer = io.BytesIO()
    torch.save(structured_state(model), buffer)
    buffer.seek(0)
    plain = load_structured_(load_checkpoint("vit_digits"), torch.load(buffer, weights_only=True))
    x = torch.randn(4, 1, 8, 8)
    assert torch.allclose(plain(x), model(x))
    assert (plain.blocks[0].mlp.fc1.weight == 0).float().mean() == 0.5


def test_malformed_files_are_refused_before_the_model_changes():
    pruned = tp_prune(deit(), deit_embed, torch.randn(2, 3, 32, 32))
    good = structured_state(pruned)
    target = deit()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    for broken, message in [
        ({k: v for k, v in good.items() if k != "attributes"}, "not a complete"),
        (good | {"kept_channels": {"kept": {"blocks.0.mlp.fc2|out": [0, 1]}}}, "kept-channel record .* is malformed"),
    ]:
        with pytest.raises(StructuredCheckpointError, match=message):
            load_structured_(target, broken)
        assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
        assert target.patch_embed.proj.out_channels == 192
