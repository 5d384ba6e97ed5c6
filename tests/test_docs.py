"""Every Python code block of the README and docs/ runs, in order, one namespace per file (as a
reader would paste them); every ``starfish`` command line in their shell blocks parses with the
real command-line parser. ``pip``/``make`` lines are set-up, run by CI itself."""

from __future__ import annotations

import re
import shlex
import warnings
from pathlib import Path

import pytest

from starfish_plugin.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.M | re.S)


def blocks(page: Path, language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(page.read_text()) if lang == language]


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p, "python")], ids=lambda p: p.name)
def test_python_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks that write files (a cache_dir) write here
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for i, body in enumerate(blocks(page, "python")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # toolkits' own warnings are not the docs' business
            try:
                exec(compile(body, f"{page.name}[block {i}]", "exec"), namespace)  # noqa: S102
            except Exception as exc:
                raise AssertionError(f"{page.name} code block {i} fails:\n{body}") from exc


def _command_lines(body: str) -> list[str]:
    joined = body.replace("\\\n", " ")
    return [line.split("#")[0].strip() for line in joined.splitlines() if line.strip().startswith("starfish ")]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_command_lines_parse(page):
    parser = build_parser()
    lines = [line for body in blocks(page, "bash") for line in _command_lines(body)]
    for line in lines:
        words = shlex.split(re.sub(r"\[(.*?)\]", r"\1", line))[1:]  # optional parts shown in [...]
        try:
            parser.parse_args(words)
        except SystemExit as exc:
            raise AssertionError(f"{page.name}: `{line}` does not parse") from exc


def test_every_page_is_checked():
    assert sum(len(blocks(p, "python")) for p in PAGES) >= 12
    assert any(_command_lines(b) for p in PAGES for b in blocks(p, "bash"))


def test_hook_reference_is_generated_from_the_hookspecs():
    from starfish_plugin.plugins.reference import rewrite

    page = ROOT / "docs" / "plugins.md"
    assert page.read_text() == rewrite(page), "run: python -m starfish_plugin.plugins.reference docs/plugins.md"
