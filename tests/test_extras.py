"""A missing optional dependency is one clear line naming the extra that installs it, raised before
anything is written or timed. Absence is simulated by hiding the installed module
(``sys.modules[name] = None`` makes ``import name`` fail as it does when it is not installed)."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from helpers import l1_prune_, tiny_vit

import starfish_plugin as starfish
from starfish_plugin.errors import MissingDependencyError, StarfishError
from starfish_plugin.extras import EXTRAS, need


def hide(monkeypatch, *modules: str) -> None:
    for name in modules:
        for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            monkeypatch.setitem(sys.modules, loaded, None)
        monkeypatch.setitem(sys.modules, name, None)


@pytest.mark.parametrize("module", sorted(EXTRAS))
def test_every_optional_dependency_names_its_extra(module, monkeypatch):
    hide(monkeypatch, module)
    distribution, extra = EXTRAS[module]
    with pytest.raises(MissingDependencyError, match=rf'needs {distribution}, .*starfish-plugin\[{extra}\]'):
        need(module, "this feature")


def test_missing_error_is_a_starfish_error_and_an_import_error(monkeypatch):
    hide(monkeypatch, "onnxruntime")
    with pytest.raises(StarfishError) as info:
        need("onnxruntime", "ONNX Runtime")
    assert isinstance(info.value, ImportError)


def test_bench_plot_without_matplotlib_is_one_line_before_any_timing(monkeypatch, capsys, tmp_path):
    from starfish_plugin.cli.main import main

    hide(monkeypatch, "matplotlib")
    code = main(["bench", "--model", "starfish:vit_digits", "--dense", str(tmp_path / "absent.pt"), "--weights",
                 str(tmp_path / "absent.pt"), "--plot", str(tmp_path / "p.png")])
    err = capsys.readouterr().err
    assert code == 2 and 'pip install "starfish-plugin[bench]"' in err and "Traceback" not in err


def test_onnx_export_without_the_onnx_extra_writes_nothing(monkeypatch, tmp_path):
    hide(monkeypatch, "onnxscript")
    model = l1_prune_(copy.deepcopy(tiny_vit(depth=1)))
    with pytest.raises(MissingDependencyError, match=r"starfish-plugin\[onnx\]"):
        starfish.export(model, tmp_path / "out", format="onnx", example_inputs=torch.randn(1, 1, 8, 8))
    assert list(tmp_path.iterdir()) == []


def test_loading_a_hf_export_without_transformers_names_the_hf_extra(monkeypatch, tmp_path):
    (tmp_path / "starfish.json").write_text('{"format": "hf", "hf_architecture": "LlamaForCausalLM"}')
    hide(monkeypatch, "transformers")
    with pytest.raises(MissingDependencyError, match=r"starfish-plugin\[hf\]"):
        starfish.load_exported(tmp_path)
