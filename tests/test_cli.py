import json

import pytest

from starfish_plugin.cli.main import main


def test_plugins_command_lists_builtins(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    lines = dict(line.split(": ", 1) for line in out.strip().splitlines())
    assert {"torch_masks", "tp_graph", "nm_layouts", "progress", "pipeline"} <= set(lines)
    torch_masks = set(lines["torch_masks"].split(", "))
    assert {"starfish_find_masks", "starfish_load_pruned", "starfish_fold_masks"} <= torch_masks
    assert "starfish_export_state" in lines["tp_graph"] and lines["pipeline"] == "starfish_after_prune"


def test_demo_on_digits_prints_the_table(tmp_path, capsys):
    path = tmp_path / "demo.json"
    code = main(["demo", "--dataset", "digits", "--epochs", "2", "--calibration", "128", "--quiet",
                 "--json", str(path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "| healed (STARFISH) |" in out and "| pruned |" in out and "| dense |" in out
    result = json.loads(path.read_text())
    assert result["mask_unchanged"] and result["masked_weights_zero"]
    assert result["sparsity"] == 0.8 and result["calibration_images"] == 128
    assert 0 <= result["pruned_top1"] <= 100 and result["dense_top1"] > 90


def test_bad_dataset_is_a_clean_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--dataset", "cifar"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_every_command_has_working_help(capsys):
    """--help of the tool and of every subcommand prints (argparse formats '%' in help texts, so
    one unescaped percent sign crashed `starfish heal --help`)."""
    from starfish_plugin.cli.main import build_parser

    commands = next(a for a in build_parser()._actions if a.choices and "heal" in a.choices).choices
    assert {"heal", "eval", "bench", "demo"} <= set(commands)
    for argv in [["--help"]] + [[name, "--help"] for name in commands]:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0, argv
        out = capsys.readouterr().out
        assert out.startswith("usage: starfish"), argv
        if argv[0] in ("heal", "eval", "bench"):
            assert "(default:" in out, argv
