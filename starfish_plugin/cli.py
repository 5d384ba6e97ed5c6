"""``starfish`` command line."""

from __future__ import annotations

import argparse
import sys

from starfish_plugin.errors import StarfishError


def _demo(args: argparse.Namespace) -> int:
    from starfish_plugin.demo import format_table, run_demo, save

    result = run_demo(args.dataset, args.sparsity, args.epochs, args.calibration, args.seed, args.quiet)
    print(format_table(result))
    if args.json:
        save(result, args.json)
        print(f"\nsaved {args.json}")
    return 0


def _plugins(args: argparse.Namespace) -> int:
    from starfish_plugin.plugins import plugin_manager

    pm = plugin_manager()
    for name, plugin in sorted(pm.list_name_plugin(), key=lambda item: item[0]):
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        print(f"{name}: {', '.join(hooks)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="starfish", description="Heal pruned PyTorch models with STARFISH.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="prune a shipped ViT at 0.8 with torch.nn.utils.prune, heal it, print the accuracy table",
        description="Offline demo on real images: Fashion-MNIST if installed (apt-get install "
        "dataset-fashion-mnist), scikit-learn's digits otherwise.",
    )
    demo.add_argument("--dataset", choices=["auto", "fashion-mnist", "digits"], default="auto")
    demo.add_argument("--sparsity", type=float, default=0.8, help="fraction of qkv/proj/fc1/fc2 weights pruned")
    demo.add_argument("--epochs", type=int, default=10)
    demo.add_argument("--calibration", type=int, default=1000, help="unlabeled calibration images")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--json", help="also save the figures to this JSON file")
    demo.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    demo.set_defaults(func=_demo)
    plugins = sub.add_parser("plugins", help="list registered plugins and the hooks they implement")
    plugins.set_defaults(func=_plugins)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (StarfishError, FileNotFoundError) as exc:
        print(f"starfish: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
