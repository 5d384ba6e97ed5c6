"""``starfish heal / eval / bench`` end to end on real images (scikit-learn's digits written as
PNG folders) and the shipped digits ViT, plus the bad inputs a script must be able to trust."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from starfish_plugin.cli.main import main
from starfish_plugin.demo.datasets import load_digits_split
from starfish_plugin.demo.run import prune_vit_
from starfish_plugin.demo.zoo import load_checkpoint

MODEL = ["--model", "starfish:vit_digits", "--channels", "1", "--normalize", "none"]


def _write_folder(root, images, labels=None):
    for i, x in enumerate(images):
        sub = root / (str(int(labels[i])) if labels is not None else "")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray((x[0].numpy() * 255).round().astype(np.uint8), mode="L").save(sub / f"{i:04d}.png")
    return root


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    split = load_digits_split()
    dense = load_checkpoint("vit_digits")
    torch.save(dense.state_dict(), root / "dense.pt")
    pruned = prune_vit_(copy.deepcopy(dense), 0.9)
    torch.save(pruned.state_dict(), root / "pruned.pt")  # weight_orig + weight_mask keys
    masks = {f"{n}.weight": m.weight_mask.bool() for n, m in pruned.named_modules() if hasattr(m, "weight_mask")}
    torch.save(masks, root / "masks.pt")
    _write_folder(root / "calib", split["train"][0][:600])
    _write_folder(root / "test", *split["test"])
    return root


@pytest.mark.slow
def test_heal_end_to_end_then_eval(files, tmp_path, capsys):
    out, report = tmp_path / "healed.pt", tmp_path / "report.json"
    code = main(["heal", *MODEL, "--dense", str(files / "dense.pt"), "--pruned", str(files / "pruned.pt"),
                 "--calibration", str(files / "calib"), "--eval", str(files / "test"), "--out", str(out),
                 "--report", str(report), "--epochs", "5", "--quiet"])
    assert code == 0
    data = json.loads(report.read_text())
    assert data["pruned_format"] == "prune" and data["report"]["mask_unchanged"]
    assert data["report"]["n_samples"] + data["report"]["held_out_samples"] == 600
    assert data["healed_top1"] > data["pruned_top1"] + 15, data
    assert "healed in" in capsys.readouterr().out
    # the healed file keeps the torch.nn.utils.prune form and evaluates to the same top-1
    assert any(k.endswith("weight_orig") for k in torch.load(out, weights_only=True))
    assert main(["eval", *MODEL, "--weights", str(out), "--data", str(files / "test")]) == 0
    assert f"top-1 {data['healed_top1']:.2f} %" in capsys.readouterr().out


def test_heal_a_mask_dictionary_and_bench_it(files, tmp_path, capsys):
    out = tmp_path / "healed.pt"
    code = main(["heal", *MODEL, "--dense", str(files / "dense.pt"), "--pruned", str(files / "masks.pt"),
                 "--calibration", str(files / "calib"), "--calibration-size", "64", "--out", str(out),
                 "--epochs", "1", "--quiet"])
    assert code == 0 and "read as 'masks'" in capsys.readouterr().out
    bench_json = tmp_path / "bench.json"
    assert main(["bench", "--model", "starfish:vit_digits", "--channels", "1", "--dense", str(files / "dense.pt"),
                 "--weights", str(out), "--image-size", "8", "--repeats", "3", "--json", str(bench_json)]) == 0
    result = json.loads(bench_json.read_text())
    nonzero = result["nonzero_parameters"]
    assert nonzero["pruned"] < nonzero["dense"] and result["dense_ms"] > 0 and result["sparse_ms"] > 0


def test_eval_of_a_mask_dictionary_needs_the_dense_weights(files, capsys):
    args = ["eval", *MODEL, "--weights", str(files / "masks.pt"), "--data", str(files / "test")]
    assert main(args) == 2 and "pass --dense with the dense weights" in capsys.readouterr().err
    assert main(args + ["--dense", str(files / "dense.pt")]) == 0
    assert "read as 'masks'" in capsys.readouterr().out


def _heal_args(files, tmp_path, **change):
    args = {"--dense": files / "dense.pt", "--pruned": files / "pruned.pt", "--calibration": files / "calib",
            "--out": tmp_path / "out.pt"}
    args.update(change)
    return ["heal", *MODEL, *[str(v) for kv in args.items() for v in kv], "--epochs", "1", "--quiet"]


def test_bad_inputs_exit_2_with_a_clear_message_and_write_nothing(files, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes((files / "dense.pt").read_bytes()[:500])
    other = tmp_path / "other.pt"
    torch.save({"head.weight": torch.zeros(3, 3)}, other)
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"state_dict": load_checkpoint("vit_digits").state_dict(), "opts": argparse_like()}, unsafe)
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = _write_folder(tmp_path / "broken", torch.rand(3, 1, 8, 8))
    (broken / "zz.png").write_bytes(b"not an image")
    cases = [
        ({"--dense": tmp_path / "missing.pt"}, "does not exist"),
        ({"--dense": corrupt}, "not a readable torch checkpoint"),
        ({"--dense": other}, "for another architecture"),
        ({"--dense": unsafe}, "pass --unsafe-pickle"),
        ({"--calibration": empty}, "holds no images"),
        ({"--calibration": broken}, "cannot read image .*zz.png"),
    ]
    for change, message in cases:
        assert main(_heal_args(files, tmp_path, **change)) == 2, change
        err = capsys.readouterr().err
        assert err.startswith("starfish: error:") and __import__("re").search(message, err), (change, err)
        assert not (tmp_path / "out.pt").exists()


def test_mixed_sizes_are_fine_with_image_size(files, tmp_path):
    mixed = _write_folder(tmp_path / "mixed", torch.rand(40, 1, 8, 8))
    Image.new("L", (12, 10), 128).save(mixed / "big.png")
    assert main(_heal_args(files, tmp_path, **{"--calibration": mixed}) + ["--image-size", "8"]) == 0
    # without --image-size: the model's own size (8 px, from the shipped model's record)
    assert main(_heal_args(files, tmp_path, **{"--calibration": mixed})) == 0
    # a size the model cannot take is refused with the fix
    assert main(_heal_args(files, tmp_path, **{"--calibration": mixed}) + ["--image-size", "12"]) == 2


class argparse_like:  # noqa: N801 - any plain Python object needs full unpickling
    pass


def test_torch_pruning_state_dict_needs_the_unsafe_flag_then_heals(files, tmp_path, capsys):
    import torch_pruning as tp

    model = load_checkpoint("vit_digits")
    pruner = tp.pruner.MetaPruner(
        model, torch.rand(2, 1, 8, 8), importance=tp.importance.GroupMagnitudeImportance(), pruning_ratio=0.5,
        ignored_layers=[model.head] + [b.attn for b in model.blocks], root_module_types=[torch.nn.Linear],
    )
    pruner.step()
    assert model.blocks[0].mlp.fc1.out_features == 128 and model.patch_embed.proj.out_channels == 64
    torch.save(tp.state_dict(model), tmp_path / "tp.pt")  # pickles module objects: not weights-only
    args = _heal_args(files, tmp_path, **{"--pruned": tmp_path / "tp.pt", "--calibration-size": 64})
    assert main(args) == 2 and "pass --unsafe-pickle" in capsys.readouterr().err
    assert main(args + ["--unsafe-pickle"]) == 0
    assert "read as 'torch-pruning'" in capsys.readouterr().out
    healed = load_checkpoint("vit_digits")
    tp.load_state_dict(healed, state_dict=torch.load(tmp_path / "out.pt", weights_only=False))
    assert healed.blocks[0].mlp.fc1.out_features == 128


def _write_hub_dataset(root, splits):
    """A dataset directory as the Hub serves one: parquet files per split, PNG bytes, ClassLabel labels."""
    import io

    import datasets

    features = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=[str(i) for i in range(10)]))
    (root / "data").mkdir(parents=True)
    for split, (images, labels) in splits.items():
        encoded = []
        for x in images:
            buffer = io.BytesIO()
            Image.fromarray((x[0].numpy() * 255).round().astype(np.uint8), mode="L").save(buffer, format="PNG")
            encoded.append({"bytes": buffer.getvalue(), "path": None})
        ds = datasets.Dataset.from_dict({"image": encoded, "label": labels.tolist()}, features=features)
        ds.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


@pytest.mark.slow
def test_heal_from_a_dataset_by_name(files, tmp_path, capsys):
    """``hf:<dir>`` goes through ``datasets.load_dataset(name, streaming=True)``, the call a Hub name
    takes (no network here, so the Hub itself is not reached)."""
    split = load_digits_split()
    hub = _write_hub_dataset(tmp_path / "digits-hub", {"train": (split["train"][0][:600], split["train"][1][:600]),
                                                       "test": split["test"]})
    out, report = tmp_path / "healed.pt", tmp_path / "report.json"
    code = main(["heal", *MODEL, "--dense", str(files / "dense.pt"), "--pruned", str(files / "pruned.pt"),
                 "--calibration", f"hf:{hub}", "--calibration-size", "300", "--eval", f"hf:{hub}", "--out", str(out),
                 "--report", str(report), "--epochs", "3", "--lr", "4e-3", "--warm-start", "row_norm", "--quiet"])
    assert code == 0, capsys.readouterr().err
    data = json.loads(report.read_text())
    assert data["report"]["n_samples"] + data["report"]["held_out_samples"] == 300
    assert data["healed_top1"] > data["pruned_top1"] + 10, data
    # the Hub-format test split and the PNG test folder hold the same pixels: same top-1
    capsys.readouterr()
    assert main(["eval", *MODEL, "--weights", str(out), "--data", f"hf:{hub}", "--split", "test"]) == 0
    from_hub = capsys.readouterr().out
    assert main(["eval", *MODEL, "--weights", str(out), "--data", str(files / "test")]) == 0
    healed = f"top-1 {data['healed_top1']:.2f} %"
    assert healed in from_hub and healed in capsys.readouterr().out


@pytest.mark.slow
def test_bad_datasets_by_name_exit_2(files, tmp_path, capsys):
    import subprocess
    import sys

    split = load_digits_split()
    hub = _write_hub_dataset(tmp_path / "hub", {"train": (split["train"][0][:40], split["train"][1][:40])})
    cases = [
        (
            ["--calibration", f"hf:{hub}", "--calibration-split", "validation"],
            "cannot load split 'validation'.*Available splits",
        ),
        (["--calibration", f"hf:{hub}", "--image-column", "photo"], "no image column photo.*--image-column"),
        (
            ["--calibration", f"hf:{hub}", "--eval", f"hf:{hub}", "--eval-split", "train", "--label-column", "y"],
            "no label column y.*--label-column",
        ),
    ]
    for change, message in cases:
        args = _heal_args(files, tmp_path, **{"--calibration": files / "calib"})
        args[args.index("--calibration") + 1] = change[1]
        assert main(args + change[2:]) == 2, change
        err = capsys.readouterr().err
        assert __import__("re").search(message, err), (change, err)
        assert not (tmp_path / "out.pt").exists()
    # A Hub name that cannot be reached (offline here): exit 2 and what to do instead.
    args = _heal_args(files, tmp_path)
    args[args.index("--calibration") + 1] = "hf:starfish-tests/not-on-this-machine"
    result = subprocess.run(
        [sys.executable, "-m", "starfish_plugin.cli.main", *args],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert "cannot reach dataset 'starfish-tests/not-on-this-machine'" in result.stderr
    assert "pass the local copy" in result.stderr and not (tmp_path / "out.pt").exists()


def test_inputs_streamed_to_disk_heal_the_same_and_bad_images_still_exit_2(files, tmp_path, capsys):
    common = _heal_args(files, tmp_path, **{"--pruned": files / "masks.pt", "--calibration-size": 64})
    assert main(common + ["--out", str(tmp_path / "memory.pt")]) == 0  # the last --out counts
    report = tmp_path / "disk.json"
    assert main(common + ["--out", str(tmp_path / "disk.pt"), "--inputs", "disk", "--report", str(report)]) == 0
    assert "streamed to a file" in capsys.readouterr().out
    assert "calibration from a generator (inputs on disk)" in json.loads(report.read_text())["report"]["notes"]
    a, b = torch.load(tmp_path / "memory.pt", weights_only=True), torch.load(tmp_path / "disk.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    broken = _write_folder(tmp_path / "broken", torch.rand(3, 1, 8, 8))
    (broken / "zz.png").write_bytes(b"not an image")
    args = _heal_args(files, tmp_path, **{"--calibration": broken, "--out": tmp_path / "never.pt"})
    assert main(args + ["--inputs", "disk"]) == 2
    assert "cannot read image" in capsys.readouterr().err and not (tmp_path / "never.pt").exists()


def test_hub_rows_that_point_to_image_files(tmp_path):
    """Datasets may store a path instead of bytes; those files are opened through datasets' xopen."""
    import datasets

    from starfish_plugin.cli.hub_images import load_hub_images

    (tmp_path / "img").mkdir()
    (tmp_path / "ds" / "data").mkdir(parents=True)
    paths = []
    for i in range(6):
        paths.append(str(tmp_path / "img" / f"{i}.png"))
        Image.fromarray(np.full((8, 8), 30 * i, dtype=np.uint8), mode="L").save(paths[-1])
    features = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=["a", "b"]))
    datasets.Dataset.from_dict(
        {"image": [{"path": p, "bytes": None} for p in paths], "label": [0, 1] * 3}, features=features
    ).to_parquet(str(tmp_path / "ds" / "data" / "train-00000-of-00001.parquet"))
    x, y, names = load_hub_images(f"hf:{tmp_path / 'ds'}", "train", None, 1, "none", labeled=True)
    assert torch.equal(x[:, 0, 0, 0] * 255, torch.arange(6) * 30.0)
    assert y.tolist() == [0, 1] * 3 and names == ["a", "b"]


def test_bad_outputs_and_values_exit_2_before_any_work(files, tmp_path, capsys):
    """Reliability cases of the CLI: each exits 2 with one clear line, and nothing is written."""
    weights = tmp_path / "weights.pt"  # plain float weights, not masks
    torch.save(load_checkpoint("vit_digits").state_dict(), weights)
    bad_mask = tmp_path / "bad_mask.pt"  # a prune-format file whose mask has the wrong shape
    state = torch.load(files / "pruned.pt", weights_only=True)
    key = next(k for k in state if k.endswith("_mask"))
    state[key] = state[key][:1]
    torch.save(state, bad_mask)
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o500)
    cases = [
        ({"--pruned": weights, "--pruned-format": "masks"}, r"read as a mask dictionary but .* holds torch.float32"),
        ({"--pruned": bad_mask}, r"the mask .*_mask has shape \(1, .*for another architecture"),
        ({"--out": tmp_path}, r"--out .* is a directory"),
        ({"--out": files / "pruned.pt"}, r"--out .* is also an input"),
        ({"--out": files / "dense.pt"}, r"--out .* is also an input"),
        ({"--report": tmp_path}, r"--report .* is a directory"),
        ({"--calibration-size": -10}, r"--calibration-size: must be at least 1, got -10"),
        ({"--calibration-size": 0}, r"--calibration-size: must be at least 1, got 0"),
        ({"--mean": "0.5 0.5", "--std": "0.2 0.2"}, r"--mean has 2 values for 1-channel images"),
    ]
    if __import__("os").geteuid() != 0:  # root writes anywhere
        cases.append(({"--out": readonly / "out.pt"}, r"--out .* is not writable"))
    before = (files / "pruned.pt").read_bytes()
    for change, message in cases:
        change = dict(change)
        extra = []
        for flag in ("--pruned-format", "--mean", "--std", "--report", "--calibration-size"):
            if flag in change:
                extra += [flag, *str(change.pop(flag)).split()]
        try:
            code = main(_heal_args(files, tmp_path, **change) + extra)
        except SystemExit as exc:  # argparse's own refusals
            code = exc.code
        err = capsys.readouterr().err
        assert code == 2 and __import__("re").search(message, err), (change, extra, code, err)
        assert not (tmp_path / "out.pt").exists() and not list(tmp_path.glob(".*.tmp"))
    assert (files / "pruned.pt").read_bytes() == before


def test_a_decompression_bomb_is_refused_with_exit_2(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 30)  # so that the 8x8 digits count as bombs (> 2x the limit)
    code = main(_heal_args(files, tmp_path))
    err = capsys.readouterr().err
    assert code == 2 and "is too large to decode safely" in err and "decompression bomb" in err, err
    assert not (tmp_path / "out.pt").exists()


def test_mixed_sizes_for_a_model_of_any_size_are_refused_with_the_fix(tmp_path):
    from starfish_plugin.cli.image_folders import load_image_folder
    from starfish_plugin.errors import ImageFolderError

    mixed = _write_folder(tmp_path / "mixed", torch.rand(2, 1, 8, 8))
    Image.new("L", (9, 9)).save(mixed / "big.png")
    with pytest.raises(ImageFolderError, match="different sizes .* pass --image-size"):
        load_image_folder(mixed, None, 1, "none", None, False, 0, None)


def test_commands_take_image_settings_from_the_model(files, tmp_path, capsys):
    """No --channels / --normalize / --image-size: the shipped model's record gives them."""
    assert main(["eval", *MODEL, "--weights", str(files / "dense.pt"), "--data", str(files / "test")]) == 0
    explicit = capsys.readouterr().out
    assert main(["eval", "--model", "starfish:vit_digits", "--weights", str(files / "dense.pt"),
                 "--data", str(files / "test")]) == 0
    out = capsys.readouterr().out
    assert "1-channel images of 8 px; normalization mean (0), std (1) from the shipped vit_digits record" in out
    assert out.splitlines()[-1] == explicit.splitlines()[-1]  # the same top-1 as with the flags
    bench_json = tmp_path / "bench.json"
    assert main(["bench", "--model", "starfish:vit_digits", "--dense", str(files / "dense.pt"),
                 "--weights", str(files / "pruned.pt"), "--repeats", "3", "--json", str(bench_json)]) == 0
    assert json.loads(bench_json.read_text())["image_size"] == 8
    capsys.readouterr()
    assert main(["eval", "--model", "starfish:vit_digits", "--channels", "3", "--weights", str(files / "dense.pt"),
                 "--data", str(files / "test")]) == 2
    assert "takes 1-channel images but --channels is 3; drop --channels" in capsys.readouterr().err


def test_model_args_reach_the_constructor_and_version(tmp_path, capsys):
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, num_classes=10)
    torch.save(model.state_dict(), tmp_path / "vit.pt")
    spec = ["--model", "timm:vit_tiny_patch16_224", "--num-classes", "10"]
    bench = ["bench", *spec, "--dense", str(tmp_path / "vit.pt"), "--weights", str(tmp_path / "vit.pt"),
             "--repeats", "3", "--json", str(tmp_path / "b.json")]
    assert main(bench + ["--model-arg", "img_size=32", "--model-arg", "depth=2"]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["image_size"] == 32  # the size the model was built for
    capsys.readouterr()
    assert main(bench + ["--model-arg", "img_size=32", "--model-arg", "depth=2", "--image-size", "64"]) == 2
    assert "built for 32-pixel images but --image-size is 64" in capsys.readouterr().err
    assert main(bench + ["--model-arg", "no_such_arg=1"]) == 2
    assert "does not take the constructor arguments ['no_such_arg', 'num_classes']" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(bench + ["--model-arg", "img_size"])
    assert exit_info.value.code == 2 and "is not KEY=VALUE" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("starfish-plugin 0.")
