"""The results tables of the README and docs are generated from benchmarks/results/*.json and
up to date; none is copied by hand."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from benchmarks import results_page
from benchmarks.results_page import PAGES, RESULTS, main, markdown_tables, render

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_marked_table_is_up_to_date(page):
    text = page.read_text()
    regenerated, changed = render(text)
    assert changed == [], f"{page.name}: run `python -m benchmarks.results_page` (stale: {changed})"
    assert regenerated == text


def test_no_results_table_is_typed_by_hand():
    unmarked = [line for line, marked in markdown_tables((ROOT / "docs" / "results.md").read_text()) if not marked]
    assert unmarked == [], f"docs/results.md: tables at lines {unmarked} have no generator marker"
    readme = (ROOT / "README.md").read_text()
    results_section = readme.split("\n## Results\n", 1)[1].split("\n## ", 1)[0]
    tables = markdown_tables(results_section)
    assert tables and all(marked for _, marked in tables)
    usage = (ROOT / "docs" / "usage.md").read_text()
    assert "<!-- table: targets_memory (python -m benchmarks.results_page) -->" in usage


def test_tables_follow_the_json(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(RESULTS, results)
    demo = json.loads((results / "demo.json").read_text())
    demo["healed_top1"] = 12.34
    (results / "demo.json").write_text(json.dumps(demo))
    main_09 = json.loads((results / "recovery_main_0.9.json").read_text())
    for run in main_09["runs"]:
        if run["loss"] == "kl":
            run["top1"] = 99.0 + run["seed"]  # KL becomes the best column at 0.9
    (results / "recovery_main_0.9.json").write_text(json.dumps(main_09))

    text, changed = render((ROOT / "docs" / "results.md").read_text(), results)
    assert changed == ["demo", "recovery_main", "recovery_variants"]  # the variants table shows KL too
    assert "| healed (STARFISH) | **12.34** |" in text
    row = next(line for line in text.splitlines() if line.startswith("| 0.9 | 11.98 |"))
    assert "**100.00 ± 1.00**" in row and row.count("**") == 2  # the best mean is bold, only it


def test_unknown_marker_is_refused():
    with pytest.raises(SystemExit, match="unknown table 'nope'"):
        render("<!-- table: nope (python -m benchmarks.results_page) -->\n| a |\n")


def test_check_mode_changes_nothing(capsys, monkeypatch, tmp_path):
    page = tmp_path / "page.md"
    stale = "<!-- table: demo (python -m benchmarks.results_page) -->\n| old |\n|---|\n\ntext\n"
    page.write_text(stale)
    monkeypatch.setattr(results_page, "PAGES", (page,))
    monkeypatch.setattr(results_page, "ROOT", tmp_path)
    assert main(["--check"]) == 1
    assert page.read_text() == stale
    assert "page.md: demo" in capsys.readouterr().out
    assert main([]) == 0
    assert "| healed (STARFISH) |" in page.read_text() and page.read_text().endswith("\n\ntext\n")
    assert main(["--check"]) == 0
