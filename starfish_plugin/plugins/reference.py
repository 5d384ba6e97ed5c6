"""The hook reference of docs/plugins.md, generated from the hook specifications so that it
cannot drift from them: ``python -m starfish_plugin.plugins.reference docs/plugins.md`` rewrites
the table between its ``hooks:start`` / ``hooks:end`` markers (a test checks it is current)."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

from starfish_plugin.plugins import hookspecs

START, END = "<!-- hooks:start (generated from hookspecs.py) -->", "<!-- hooks:end -->"


def _purpose(doc: str) -> str:
    """The first paragraph of a docstring and the one that says what to return, on one line."""
    paragraphs = inspect.cleandoc(doc).split("\n\n")
    chosen = paragraphs[:1] + [p for p in paragraphs[1:] if p.startswith("Return")][:1]
    return " ".join(" ".join(chosen).split()).replace("|", "\\|")


def hook_reference() -> str:
    """A markdown table: every hook, its arguments, how results are combined, what it is for."""
    rows = ["| hook | results | when it fires, what to return |", "|---|---|---|"]
    specs = [fn for name, fn in vars(hookspecs).items() if name.startswith("starfish_") and callable(fn)]
    for fn in sorted(specs, key=lambda f: inspect.getsourcelines(f)[1]):
        args = ", ".join(inspect.signature(fn).parameters)
        mode = "first non-None" if getattr(fn, "starfish_spec", {}).get("firstresult", False) else "all"
        rows.append(f"| `{fn.__name__}({args})` | {mode} | {_purpose(fn.__doc__ or '')} |")
    return "\n".join(rows)


def rewrite(path: Path) -> str:
    """``path``'s text with the generated table between the markers."""
    text = path.read_text()
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    return f"{head}{START}\n{hook_reference()}\n{END}{tail}"


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/plugins.md")
    target.write_text(rewrite(target))
