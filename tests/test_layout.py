"""The package's layering, checked on the source: no import cycles (the plugin manager's
by-name imports of its built-in plugins counted), and a core that knows no toolkit or plugin."""

from __future__ import annotations

import ast
from pathlib import Path

from starfish_plugin.plugins.manager import DEFAULT_PLUGINS

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"starfish_plugin": ROOT / "starfish_plugin", "starfish_plugin.adapters": ROOT / "adapters"}
TOOLKITS = ("torch_pruning", "torchao", "torch.nn.utils.prune", "torch.ao.pruning", "transformers", "timm")


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def _imports(path: Path) -> set[str]:
    """Every module named by an import statement in ``path`` (function-level ones included, those
    under ``if TYPE_CHECKING:`` left out)."""
    tree = ast.parse(path.read_text())
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
               and getattr(node.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(node)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


def _graph() -> dict[str, set[str]]:
    modules = _modules()

    def own(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {m: {t for n in _imports(p) if (t := own(n)) and t != m and t != "starfish_plugin"}
             for m, p in modules.items()}
    graph["starfish_plugin.plugins.manager"] |= set(DEFAULT_PLUGINS)  # importlib.import_module(name)
    return graph


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == [], "\n".join(" -> ".join(c) for c in cycles)


def test_core_knows_no_toolkit_and_no_plugin_layer():
    modules = _modules()
    for name, path in modules.items():
        if not name.startswith(("starfish_plugin.base", "starfish_plugin.core", "starfish_plugin.data",
                                "starfish_plugin.runtime")):
            continue
        imported = _imports(path)
        assert not [n for n in imported if n.startswith(TOOLKITS)], (name, imported)
        assert not [n for n in imported if n.startswith(("starfish_plugin.plugins", "starfish_plugin.adapters",
                                                         "starfish_plugin.io", "starfish_plugin.cli"))], name


def test_adapters_import_only_types_and_helpers_from_the_package():
    allowed = ("starfish_plugin.core.plan", "starfish_plugin.core.nm_pattern", "starfish_plugin.errors",
               "starfish_plugin.plugins.hookspecs", "starfish_plugin.io.state_dicts", "starfish_plugin.base.model_io",
               "starfish_plugin.core.modes", "starfish_plugin.adapters")  # sibling adapter modules
    for name, path in _modules().items():
        if name.startswith("starfish_plugin.adapters"):
            own = [n for n in _imports(path) if n.startswith("starfish_plugin") and not n.startswith(name)]
            assert all(n.startswith(allowed) for n in own), (name, own)


def test_no_function_over_80_lines():
    long = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1 if node.end_lineno else 0
                if lines > 80:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert long == []


def test_pruning_toolkits_are_imported_only_by_the_adapters():
    """Torch-Pruning and torchao are known only behind ``adapters/``: the demos, deployment helpers
    and CLI call the adapters (``adapters/recipes.py``), never the toolkits themselves."""
    outside = {}
    for name, path in _modules().items():
        if name.startswith("starfish_plugin.adapters"):
            continue
        found = [n for n in _imports(path) if n.startswith(("torch_pruning", "torchao"))]
        if found:
            outside[name] = found
    assert outside == {}


def test_every_arrow_between_base_runtime_data_and_core_points_down():
    """``base`` (model calling, block outputs) <- ``runtime`` <- ``data`` <- ``core``: a lower layer
    never imports a higher one."""
    order = ["starfish_plugin.base", "starfish_plugin.runtime", "starfish_plugin.data", "starfish_plugin.core"]
    upward = []
    for name, path in _modules().items():
        layer = next((i for i, p in enumerate(order) if name == p or name.startswith(p + ".")), None)
        if layer is None:
            continue
        for imported in _imports(path):
            for higher in order[layer + 1:]:
                if imported == higher or imported.startswith(higher + "."):
                    upward.append(f"{name} -> {imported}")
    assert upward == []
