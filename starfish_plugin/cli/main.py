"""``starfish`` command line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from starfish_plugin.errors import CheckpointFileError, ConfigError, StarfishError
from starfish_plugin.io.model_files import pruned_formats
from starfish_plugin.runtime.atomic import write_atomically


def _demo(args: argparse.Namespace) -> int:
    from starfish_plugin.demo.run import format_table, run_demo, save

    if args.task == "text":
        from starfish_plugin.demo.text_demo import format_text_table, run_text_demo

        result = run_text_demo(args.epochs or 5, args.calibration or 256, seed=args.seed, quiet=args.quiet)
        print(format_text_table(result))
    else:
        result = run_demo(args.dataset, args.sparsity, args.epochs or 10, args.calibration or 1000, args.seed,
                          args.quiet)
        print(format_table(result))
    if args.json:
        save(result, args.json)
        print(f"\nsaved {args.json}")
    return 0


def _plugins(args: argparse.Namespace) -> int:
    from starfish_plugin.plugins.manager import plugin_manager

    pm = plugin_manager()
    for name, plugin in sorted(pm.list_name_plugin(), key=lambda item: item[0]):
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        print(f"{name}: {', '.join(hooks)}")
    return 0


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default, except where there is none (``None``: read from the model, or unset)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or "(default:" in text or not action.option_strings:
            return text
        if action.default in (None, False, [], argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)".lstrip()


def model_arg(text: str) -> tuple[str, Any]:
    """An argparse type for ``--model-arg KEY=VALUE``: the value as a Python literal when it is one
    (``img_size=32``, ``drop_rate=0.1``, ``global_pool='avg'``), else the string."""
    import ast

    key, sep, raw = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE (e.g. img_size=32)")
    try:
        return key, ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return key, raw


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", required=True, help="architecture: timm:<name>, torchvision:<name> or starfish:<shipped model>"
    )
    p.add_argument("--num-classes", type=int, help="classifier width, if not the architecture's default")
    p.add_argument(
        "--model-arg", type=model_arg, action="append", default=[], metavar="KEY=VALUE",
        help="keyword argument for the model's constructor (repeatable), e.g. --model-arg img_size=32",
    )
    p.add_argument(
        "--unsafe-pickle",
        action="store_true",
        help="allow checkpoints that need full unpickling (can run arbitrary code: trusted files only)",
    )


def _image_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--image-size", type=positive_int,
        help="resize (shorter side) and center-crop images to this size (default: the size the model requires; "
        "for models that take any size, the images' own size)",
    )
    p.add_argument("--channels", type=int, choices=[1, 3], help="image channels (default: read from the model)")
    p.add_argument(
        "--normalize",
        choices=["imagenet", "inception", "none"],
        help="mean/std preset applied after scaling pixels to [0, 1] (default: the model's own: a shipped "
        "model's record, timm's pretrained_cfg, else ImageNet)",
    )
    p.add_argument("--mean", type=float, nargs="+", help="per-channel mean (overrides --normalize; with --std)")
    p.add_argument("--std", type=float, nargs="+", help="per-channel std (overrides --normalize; with --mean)")
    p.add_argument("--hf-config", help="configuration name of a hf:<dataset> (if it has several)")
    p.add_argument("--image-column", help="image column of a hf:<dataset> (default: its Image feature)")
    p.add_argument("--label-column", help="label column of a hf:<dataset> (default: its ClassLabel feature)")


def _normalization(args: argparse.Namespace):
    if (args.mean is None) != (args.std is None):
        raise ConfigError("pass --mean and --std together")
    if args.mean is None:
        return args.normalize
    channels = getattr(args, "channels", None)
    for flag, values in (("--mean", args.mean), ("--std", args.std)):
        if len(values) not in (1, channels):
            raise ConfigError(
                f"{flag} has {len(values)} values for {channels}-channel images; give one value, or one per channel"
            )
    if any(not v > 0 for v in args.std):
        raise ConfigError(f"--std values must be > 0, got {args.std}")
    return tuple(args.mean), tuple(args.std)


def check_output_path(path: str, flag: str, inputs: list[str]) -> None:
    """``path`` can be written: not a directory, not one of the input files, in a directory that
    exists (or can be made) and is writable. Checked before any work, so a heal is never wasted."""
    target = Path(path)
    if target.is_dir():
        raise ConfigError(f"{flag} {path} is a directory; give a file name inside it")
    for source in inputs:
        if Path(source).exists() and target.exists() and target.resolve() == Path(source).resolve():
            raise ConfigError(f"{flag} {path} is also an input; write the result to another file")
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{flag}: cannot create the directory {parent} ({exc.strerror or exc})") from exc
    if not os.access(parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise ConfigError(f"{flag} {path} is not writable; choose another path")


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1 (a bad value exits 2 with the flag named)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _load_dense(args: argparse.Namespace, stream: Any = None):
    from starfish_plugin.io.model_files import load_file, load_weights_, state_dict_of

    dense = _build(args, stream)
    load_weights_(dense, state_dict_of(load_file(args.dense, args.unsafe_pickle), args.dense), args.dense, "dense")
    return dense


def _build(args: argparse.Namespace, stream: Any = None):
    """The architecture of ``--model`` (with ``--num-classes`` and ``--model-arg``), and the image
    flags not given filled in from it."""
    from starfish_plugin.cli.model_defaults import apply_image_defaults
    from starfish_plugin.io.model_files import build_model

    model = build_model(args.model, args.num_classes, dict(args.model_arg))
    print(f"starfish: {apply_image_defaults(args, args.model, model)}", file=stream or sys.stdout)
    return model


def _images(
    args: argparse.Namespace,
    source: str,
    split: str,
    labeled: bool,
    limit: int | None = None,
    batch_size: int | None = None,
):
    """Images (and labels) from an image folder or a ``hf:<dataset>``, as ``(x, y)``; with
    ``batch_size``, ``x`` is an iterator of lazily decoded batches."""
    from starfish_plugin.cli.hub_images import is_hub_source, load_hub_images
    from starfish_plugin.cli.image_folders import load_image_folder

    seed = args.seed if getattr(args, "seed", None) is not None else 0
    if is_hub_source(source):
        x, y, _ = load_hub_images(
            source,
            split,
            args.image_size,
            args.channels,
            _normalization(args),
            limit,
            labeled,
            seed,
            args.hf_config,
            args.image_column,
            args.label_column,
            batch_size,
        )
    else:
        x, y, _ = load_image_folder(
            source, args.image_size, args.channels, _normalization(args), limit, labeled, seed, batch_size
        )
    return x, y


def _eval_set(args: argparse.Namespace, source: str, split: str = "test"):
    x, y = _images(args, source, split, labeled=True)
    return list(zip(x.split(256), y.split(256)))


def _heal(args: argparse.Namespace) -> int:
    import json

    from starfish_plugin.api import heal
    from starfish_plugin.core.evaluate import evaluate
    from starfish_plugin.io.model_files import load_pruned, save_pruned

    inputs = [args.dense, args.pruned]
    check_output_path(args.out, "--out", inputs)  # before anything is loaded or healed
    if args.report:
        check_output_path(args.report, "--report", inputs + [args.out])
    dense = _load_dense(args)
    pruned, fmt = load_pruned(dense, args.pruned, args.pruned_format, args.unsafe_pickle)
    stream = args.inputs == "disk"  # decoded batch by batch straight into heal's file
    images, _ = _images(
        args,
        args.calibration,
        args.calibration_split,
        labeled=False,
        limit=args.calibration_size,
        batch_size=256 if stream else None,
    )
    what = "streamed to a file as they are decoded" if stream else f"{len(images)}, {tuple(images.shape[1:])}"
    print(f"starfish: {args.model}, pruned checkpoint read as '{fmt}', calibration images: {what}", flush=True)
    evaluation = _eval_set(args, args.eval, args.eval_split) if args.eval else None
    figures = {}
    if evaluation:
        figures["dense_top1"], figures["pruned_top1"] = evaluate(dense, evaluation), evaluate(pruned, evaluation)
    overrides = heal_overrides(args)
    if args.device:
        dense.to(args.device)
        pruned.to(args.device)
    report = heal(pruned, dense, images, **overrides)
    pruned.to("cpu")
    if evaluation:
        figures["healed_top1"] = evaluate(pruned, evaluation)
    out_format = fmt if args.out_format == "same" else args.out_format
    save_pruned(pruned, out_format, args.out)
    out = {
        "model": args.model,
        "pruned_format": fmt,
        "out_format": out_format,
        "healed_checkpoint": str(args.out),
        **figures,
        "report": json.loads(report.to_json()),
    }
    if args.report:
        write_atomically(
            Path(args.report), lambda tmp: tmp.write_text(json.dumps(out, indent=2)),
            lambda reason: CheckpointFileError(f"writing {args.report} failed ({reason}); choose another path"),
        )
    line = ", ".join(f"{k} {v:.2f} %" for k, v in figures.items())
    print(
        f"starfish: healed in {report.seconds:.1f} s; mask unchanged: {report.mask_unchanged}"
        + (f"; {line}" if line else "")
        + f"; saved {args.out}"
        + (f" and {args.report}" if args.report else "")
    )
    return 0


def _eval(args: argparse.Namespace) -> int:
    from starfish_plugin.core.evaluate import evaluate
    from starfish_plugin.io.model_files import load_pruned

    model = _load_dense(args) if args.dense else _build(args)
    model, fmt = load_pruned(model, args.weights, args.format, args.unsafe_pickle, dense_has_weights=bool(args.dense))
    print(f"top-1 {evaluate(model, _eval_set(args, args.data, args.split)):.2f} % ({args.weights}, read as '{fmt}')")
    return 0


def _bench(args: argparse.Namespace) -> int:
    import json

    from starfish_plugin.cli.latency import bench_kernels, plot_layers
    from starfish_plugin.io.model_files import load_pruned

    if args.plot:  # before any timing: a missing matplotlib is one line, not a traceback at the end
        from starfish_plugin.extras import need

        need("matplotlib", "starfish bench --plot")
    dense = _load_dense(args, sys.stderr)
    pruned, fmt = load_pruned(dense, args.weights, args.format, args.unsafe_pickle)
    args.image_size = args.image_size or 224
    import torch

    if args.runtime == "onnxruntime":
        if (args.kernels != "auto" or args.device != "cpu" or args.dtype != "float32" or args.compile_baseline
                or args.plot):
            raise ConfigError("--runtime onnxruntime times the exported ONNX files on the CPU in float32: drop "
                              "--kernels, --device, --dtype, --compile-baseline and --plot (per-layer kernel "
                              "times): they apply to --runtime torch")
        from starfish_plugin.serve.ort_latency import bench_onnxruntime

        result, text = bench_onnxruntime(dense, pruned, args.batch_size, args.image_size, args.channels, args.repeats)
        print(text)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
            print(f"starfish: figures saved to {args.json}")
        return 0
    result, text = bench_kernels(dense, pruned, args.batch_size, args.image_size, args.channels, args.kernels,
                                 args.repeats, args.device, args.compile_baseline, getattr(torch, args.dtype))
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"starfish: figures saved to {args.json}")
    if args.plot:
        plot_layers(result, args.plot)
        print(f"starfish: plot saved to {args.plot}")
    return 0


def _export(args: argparse.Namespace) -> int:
    import torch

    from starfish_plugin.io.model_files import load_pruned
    from starfish_plugin.serve import export

    model = _load_dense(args, sys.stderr) if args.dense else _build(args, sys.stderr)
    model, fmt = load_pruned(model, args.weights, args.weights_format, args.unsafe_pickle,
                             dense_has_weights=bool(args.dense))
    example = None
    if args.format == "onnx":
        example = torch.randn(args.batch_size, args.channels, args.image_size or 224, args.image_size or 224)
    out = export(model, args.out, args.format, overwrite=args.overwrite, example_inputs=example,
                 model_spec=args.model, model_args={**dict(args.model_arg), **(
                     {"num_classes": args.num_classes} if args.num_classes is not None else {})})
    print(f"starfish: {args.weights} (read as '{fmt}') exported as {args.format} to {out}")
    return 0


def _add_export(sub: Any, formats: list[str]) -> None:
    from starfish_plugin.serve import FORMATS

    ex = sub.add_parser(
        "export", help="write a healed checkpoint as a Hugging Face folder, ONNX or a weights-only torch file",
        formatter_class=HelpFormatter,
        description="Export a pruned or healed checkpoint for serving: onnx (ONNX Runtime, OpenVINO, TensorRT; "
        "checked in ONNX Runtime), torch (weights-only file that rebuilds --model), hf (Hugging Face models "
        "through the Python API). Each export holds a model card (README.md) and starfish.json.",
    )
    _model_args(ex)
    ex.add_argument("--weights", required=True, help="pruned or healed checkpoint")
    ex.add_argument("--weights-format", default="auto", choices=formats, help="how to read --weights")
    ex.add_argument("--dense", help="dense weights (needed when --weights is a mask dictionary)")
    ex.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    ex.add_argument("--out", required=True, help="directory to write (must be empty or new unless --overwrite)")
    ex.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    ex.add_argument("--batch-size", type=positive_int, default=1, help="batch of the ONNX trace (the file's "
                    "batch dimension stays dynamic)")
    ex.add_argument("--image-size", type=positive_int, help="input side for the ONNX trace (default: the model's)")
    ex.add_argument("--channels", type=int, choices=[1, 3], help="input channels (default: read from the model)")
    ex.set_defaults(func=_export)


def build_parser() -> argparse.ArgumentParser:
    formats = list(pruned_formats())  # the core's and the adapters' file formats
    from starfish_plugin import __version__

    parser = argparse.ArgumentParser(prog="starfish", description="Heal pruned PyTorch models with STARFISH.",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"starfish-plugin {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_demo(sub)
    heal = _add_heal(sub, formats)
    _add_heal_recipe(heal)
    _add_eval(sub, formats)
    _add_bench(sub, formats)
    _add_export(sub, formats)
    plugins = sub.add_parser("plugins", help="list registered plugins and the hooks they implement",
                             description="List the registered plugins and the hooks each implements.")
    plugins.set_defaults(func=_plugins)
    return parser


def _add_demo(sub: Any) -> None:
    demo = sub.add_parser(
        "demo", formatter_class=HelpFormatter,
        help="prune a shipped ViT at 0.8 with torch.nn.utils.prune (or the shipped LM with Wanda 2:4), heal it, "
        "print the table",
        description="Offline demo. --task image (default): a shipped ViT on real images, Fashion-MNIST if installed "
        "(apt-get install dataset-fashion-mnist), scikit-learn's digits otherwise. --task text: the shipped King "
        "James decoder LM pruned 2:4 with torchao's Wanda, healed on unlabeled token sequences, perplexity on "
        "held-out verses (apt-get install bible-kjv-text).",
    )
    demo.add_argument("--task", choices=["image", "text"], default="image", help="which demo")
    demo.add_argument("--dataset", choices=["auto", "fashion-mnist", "digits"], default="auto",
                      help="auto: Fashion-MNIST if installed, else digits")
    demo.add_argument("--sparsity", type=float, default=0.8, help="fraction of qkv/proj/fc1/fc2 weights pruned")
    demo.add_argument("--epochs", type=positive_int, help="healing epochs (default: 10 image, 5 text)")
    demo.add_argument("--calibration", type=positive_int,
                      help="unlabeled calibration images / token sequences (default: 1000 / 256)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the calibration sample and the heal")
    demo.add_argument("--json", help="also save the figures to this JSON file")
    demo.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    demo.set_defaults(func=_demo)


def _add_heal(sub: Any, formats: list[str]) -> argparse.ArgumentParser:
    """``starfish heal``: its files, data and output."""
    heal = sub.add_parser(
        "heal", formatter_class=HelpFormatter,
        help="heal a pruned checkpoint on an image folder or hf:<dataset> and save it",
        description="Heal a pruned checkpoint with STARFISH. The pruned file may be a torch.nn.utils.prune "
        "state dict (weight_orig/weight_mask), a Torch-Pruning state dict (tp.state_dict, a pickle: needs "
        "--unsafe-pickle), starfish's weights-only structured file (--out-format structured), a dictionary "
        "{parameter name: bool mask} applied to the dense weights, or plain weights holding N:M zeros. "
        "Exit codes: 0 healed, 2 bad input (nothing written), 1 unexpected failure, 130 interrupted.",
    )
    _model_args(heal)
    heal.add_argument("--dense", required=True, help="dense weights (state dict file)")
    heal.add_argument("--pruned", required=True, help="pruned checkpoint (see above)")
    heal.add_argument("--pruned-format", default="auto", choices=formats, help="how to read --pruned")
    heal.add_argument(
        "--calibration",
        required=True,
        help="folder of unlabeled images (subfolders allowed), or hf:<dataset name or local dataset dir>",
    )
    heal.add_argument("--calibration-split", default="train", help="split of a hf:<dataset> calibration set")
    heal.add_argument(
        "--calibration-size",
        type=positive_int,
        default=1000,
        help="images drawn at random (from a hf:<dataset>: streamed through a 10,000-row shuffle buffer)",
    )
    heal.add_argument(
        "--eval", help="labeled images for top-1 before/after: a folder with one subfolder per class, or hf:<dataset>"
    )
    heal.add_argument("--eval-split", default="test", help="split of a hf:<dataset> eval set")
    heal.add_argument("--out", required=True, help="where the healed checkpoint goes")
    heal.add_argument(
        "--out-format",
        default="same",
        choices=["same", "structured", "weights"],
        help="same: the form --pruned was read in; structured: weights-only file with the pruned "
        "shapes (and kept-channel record), readable without --unsafe-pickle; weights: a plain state dict "
        "with masks folded in as zeros",
    )
    heal.add_argument("--report", help="write the heal report and accuracies to this JSON file")
    return heal


# HealConfig fields ``starfish heal`` exposes as --options, with their help; types, choices and
# defaults are read from HealConfig itself.
HEAL_OPTIONS: dict[str, str] = {
    "recipe": "auto: warm start and lr chosen by a short probe on the held-out samples; paper: as given",
    "epochs": "passes over the calibration set (0 with --warm-start: the warm start alone)",
    "lr": "peak AdamW learning rate (cosine decay to min_lr)",
    "batch_size": "calibration images per optimizer step",
    "seed": "seed of the calibration shuffle",
    "loss": "cosine (STARFISH), mse, kl, ce or a mixture such as cosine+kl",
    "targets": "where dense block outputs are kept: auto picks memory, disk or online",
    "inputs": "disk: calibration images decoded batch by batch into a file, not held in RAM",
    "cache_dir": "directory of the disk cache of dense targets (reused when it matches)",
    "checkpoint_dir": "save state each epoch; rerun the same command to resume",
    "warm_start": "row_norm: rescale pruned rows to the dense output norms; lstsq: solve them in closed form",
    "precision": "auto: bf16 autocast on CUDA, fp32 elsewhere",
    "compile": "torch.compile mode for the pruned model's training forward",
    "compile_backend": "torch.compile backend",
    "device": "e.g. cuda:0 (default: the models' device, cpu here)",
    "holdout": "share of the calibration set held out to judge every state (at least 32 samples)",
    "if_worse": "restore: the best judged state, or the pruned weights if none beats them; warn: the last state",
    "patience": "stop after this many epochs without a better held-out state",
    "probe_budget": "share of the heal's cost the recipe=auto probe may spend",
    "strategy": ("joint: every block at once (the paper); sequential: one block at a time (memory of one block); "
                 "fsdp: joint, sharded over the torchrun ranks with FSDP2"),
    "offload": "disk: with --strategy sequential, the dense model's blocks wait on disk while they do not run",
    "sequential_inputs": "with --strategy sequential: feed each block the healed pruned outputs or the dense inputs",
}
CLI_TYPES: dict[str, type] = {"patience": int}  # fields whose default (None) says nothing of their type


def _add_heal_recipe(heal: argparse.ArgumentParser) -> None:
    """``starfish heal``: image handling and the healing recipe (``HealConfig`` overrides)."""
    import dataclasses

    from starfish_plugin.config import HealConfig

    _image_args(heal)
    fields = {f.name: f for f in dataclasses.fields(HealConfig)}
    for name, help_text in HEAL_OPTIONS.items():
        default = fields[name].default
        kind = CLI_TYPES.get(name) or (
            type(default) if isinstance(default, (int, float)) and not isinstance(default, bool) else str)
        heal.add_argument(
            "--" + name.replace("_", "-"), type=kind, choices=HealConfig.choices(name),
            help=help_text if default is None else f"{help_text} (default: {default})",
        )
    heal.add_argument("--quiet", action="store_true", default=None, help="no progress bar or per-epoch lines")
    heal.set_defaults(func=_heal)


def heal_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The ``HealConfig`` fields given on the command line."""
    given = {name: getattr(args, name) for name in [*HEAL_OPTIONS, "quiet"]}
    return {k: v for k, v in given.items() if v is not None}


def _add_eval(sub: Any, formats: list[str]) -> None:
    ev = sub.add_parser(
        "eval", help="top-1 of a checkpoint on a labeled image folder or hf:<dataset>", formatter_class=HelpFormatter,
        description="Top-1 accuracy of a checkpoint (any format heal reads or writes) on labeled images: a folder "
        "with one subfolder per class, or hf:<dataset>. Image size, channels and normalization come from the "
        "model unless given.",
    )
    _model_args(ev)
    ev.add_argument("--weights", required=True, help="checkpoint to evaluate (any format heal reads)")
    ev.add_argument("--format", default="auto", choices=formats, help="how to read --weights")
    ev.add_argument("--dense", help="dense weights (needed when --weights is a mask dictionary)")
    ev.add_argument("--data", required=True, help="labeled image folder, one subfolder per class, or hf:<dataset>")
    ev.add_argument("--split", default="test", help="split of a hf:<dataset>")
    _image_args(ev)
    ev.set_defaults(func=_eval)


def _add_bench(sub: Any, formats: list[str]) -> None:
    from starfish_plugin.deploy.selection import KERNEL_CHOICES

    bench = sub.add_parser(
        "bench", help="latency of a pruned checkpoint on sparse kernels against its dense model",
        formatter_class=HelpFormatter,
        description="Time every pruned Linear of a pruned (or healed) checkpoint on dense and sparse kernels (CSR, "
        "BSR, compact, 2:4 on CUDA) for the given batch, keep the fastest where it wins beyond noise, and time the "
        "result end to end against the dense model (medians over interleaved repeats, random inputs of the "
        "model's size).",
    )
    _model_args(bench)
    bench.add_argument("--dense", required=True, help="dense weights (state dict file)")
    bench.add_argument("--weights", required=True, help="pruned or healed checkpoint")
    bench.add_argument("--format", default="auto", choices=formats, help="how to read --weights")
    bench.add_argument("--runtime", default="torch", choices=["torch", "onnxruntime"],
                       help="torch: PyTorch with sparse kernels; onnxruntime: both models exported to ONNX and "
                       "timed in ONNX Runtime on the CPU")
    bench.add_argument("--kernels", default="auto", choices=KERNEL_CHOICES,
                       help="auto: per layer the fastest measured; dense: no swap; a kernel name: every layer it fits")
    bench.add_argument("--batch-size", type=positive_int, default=1, help="inputs per forward")
    bench.add_argument("--image-size", type=positive_int,
                       help="input side (default: the size the model requires, else 224)")
    bench.add_argument("--channels", type=int, choices=[1, 3], help="input channels (default: read from the model)")
    bench.add_argument("--repeats", type=_at_least_3, default=30, help="timed rounds (medians)")
    bench.add_argument("--device", default="cpu", help="where to time, e.g. cuda:0")
    bench.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                       help="weights and inputs (the 2:4 kernels take float16/bfloat16, on CUDA)")
    bench.add_argument("--compile-baseline", action="store_true",
                       help="also time the dense-kernel model under torch.compile")
    bench.add_argument("--json", help="save the figures (device, batch_size, dense_ms, sparse_ms, speedup, layers)")
    bench.add_argument("--plot", help="save per-layer speedup bars and the end-to-end figure to this PNG")
    bench.set_defaults(func=_bench)


def _at_least_3(text: str) -> int:
    value = positive_int(text)
    if value < 3:
        raise argparse.ArgumentTypeError(f"{value}: medians need at least 3 timed rounds")
    return value


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 success, 2 bad input or usage, 1 unexpected failure, 130 interrupted."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (StarfishError, FileNotFoundError) as exc:
        print(f"starfish: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("starfish: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
