"""Every results table of the README and docs, generated from ``benchmarks/results/*.json``.

A table in a page is preceded by a marker line naming its builder::

    <!-- table: recovery_main (python -m benchmarks.results_page) -->
    | sparsity | pruned | ... |

and this script replaces the table under each marker with what the JSON says, so no number in a
table is copied by hand. ``--check`` changes nothing and exits 1 naming every stale table.

    python -m benchmarks.results_page            # rewrite the tables in place
    python -m benchmarks.results_page --check    # CI: are the pages up to date?
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PAGES = (ROOT / "README.md", ROOT / "docs" / "results.md", ROOT / "docs" / "usage.md")
MARKER = re.compile(r"^<!-- table: (\w+) \(python -m benchmarks\.results_page\) -->$")

SPARSITIES = ("0.5", "0.7", "0.8", "0.9", "0.95")
MAIN_LOSSES = {"cosine": "cosine (STARFISH)", "mse": "MSE (same blocks)", "kl": "KL (logits)",
               "ce": "CE (labels)", "cosine+kl": "cosine + KL"}
VARIANT_ORDER = ("adaptive", "row_norm", "lr_4e-3", "row_norm_lr_4e-3", "kl_lr_4e-3", "kl_row_norm",
                 "kl_row_norm_lr_4e-3", "bf16")
ARCH_TOOLKITS = ("global_l1", "ao_2_4", "torch_pruning")


def _load(name: str, results: Path) -> dict:
    return json.loads((results / name).read_text())


def _mean_std(values: list[float], digits: int = 2) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _top1(runs: list[dict], loss: str | None = None) -> list[float]:
    return [r["top1"] for r in runs if loss is None or r["loss"] == loss]


def _bold_best(cells: dict[str, list[float]]) -> dict[str, str]:
    """``mean ± std`` per column, the best mean in bold."""
    best = max(cells, key=lambda k: statistics.mean(cells[k]))
    return {k: (f"**{_mean_std(v)}**" if k == best else _mean_std(v)) for k, v in cells.items()}


def _row(cells: list[object]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def demo(results: Path) -> list[str]:
    d = _load("demo.json", results)
    sparsity = f"{d['sparsity'] * 100:.0f} %"
    return [
        "| model | top-1 % | retention | mean block cosine to dense | heal time |",
        "|---|---:|---:|---:|---:|",
        _row(["dense", f"{d['dense_top1']:.2f}", "100.0 %", "1", ""]),
        _row([f"pruned, {sparsity}", f"{d['pruned_top1']:.2f}", f"{100 * d['retention_pruned']:.1f} %",
              f"{d['mean_block_cosine_before']:.4f}", ""]),
        _row(["healed (STARFISH)", f"**{d['healed_top1']:.2f}**", f"**{100 * d['retention_healed']:.1f} %**",
              f"{d['mean_block_cosine_after']:.4f}", f"{d['heal_seconds']:.1f} s"]),
    ]


def _recovery_main(results: Path, losses: tuple[str, ...]) -> list[str]:
    lines = [_row(["sparsity", "pruned", *(MAIN_LOSSES[k] for k in losses)]),
             "|---:|---:|" + "---:|" * len(losses)]
    for s in SPARSITIES:
        path = results / f"recovery_main_{s}.json"
        if path.exists():
            data = json.loads(path.read_text())
            cells = _bold_best({k: _top1(data["runs"], k) for k in losses})
            lines.append(_row([s, f"{data['pruned_top1']:.2f}", *cells.values()]))
    return lines


def recovery_main(results: Path) -> list[str]:
    return _recovery_main(results, tuple(MAIN_LOSSES))


def recovery_main_readme(results: Path) -> list[str]:
    return _recovery_main(results, ("cosine", "mse", "kl", "ce"))


def recovery_variants(results: Path) -> list[str]:
    """Plain cosine and KL (main / small / 2:4 runs) against every saved variant run."""
    found: dict[tuple[str, int], dict[str, list[dict]]] = {}
    for path in sorted(results.glob("recovery_variant_*.json")):
        data = json.loads(path.read_text())
        found.setdefault((str(data["sparsity"]), data["calibration_images"]), {})[data["variant"]] = data["runs"]
    names = [v for v in VARIANT_ORDER if any(v in cell for cell in found.values())]
    lines = [_row(["sparsity", "images", "cosine (paper)", "kl", *names]), "|---" * (len(names) + 4) + "|"]
    for (sparsity, images), variants in sorted(found.items(), key=lambda kv: (kv[0][0] != "2:4", kv[0])):
        if sparsity == "2:4":
            source = "recovery_nm_2_4.json" if images == 1000 else None
        else:
            source = {1000: f"recovery_main_{sparsity}.json", 256: f"recovery_small_{sparsity}.json"}.get(images)
        base = _load(source, results)["runs"] if source and (results / source).exists() else []
        paper = _mean_std(_top1(base, "cosine")) if base else (
            _mean_std(_top1(variants["paper"])) if "paper" in variants else "")
        kl = _mean_std(_top1(base, "kl")) if base else ""
        cells = [_mean_std(_top1(variants[v])) if v in variants else "" for v in names]
        lines.append(_row([sparsity, images, paper, kl, *cells]))
    return lines


def heal_speed(results: Path) -> list[str]:
    s = _load("heal_speed.json", results)["speed"]

    def seconds(key: str) -> str:
        return ", ".join(f"{v:.2f}" for v in s[key])

    return [
        f"| | samples/s (median) | seconds per run ({s['repeats']} runs) |",
        "|---|---:|---|",
        _row(["hand-written loop", f"{s['manual_samples_per_second']:.0f}", seconds("manual_seconds")]),
        _row(["`starfish.heal` (diagnostics off)", f"{s['heal_samples_per_second']:.0f}", seconds("heal_seconds")]),
        _row(["`starfish.heal` (default: per-block cosine before/after on 512 images)", "—",
              seconds("heal_with_diagnostics_seconds")]),
    ]


def target_cache(results: Path) -> list[str]:
    lines = ["| calibration images | estimate | cache tensors | peak RSS increase |", "|---:|---:|---:|---:|"]
    for r in _load("heal_speed.json", results)["target_cache"]:
        lines.append(_row([f"{r['images']:,}", f"{r['estimate_bytes'] / 1e6:.1f} MB",
                           f"{r['cache_bytes'] / 1e6:.1f} MB", f"{r['peak_rss_increase_bytes'] / 1e6:.1f} MB"]))
    return lines


def targets_memory(results: Path) -> list[str]:
    rows: dict[int, dict[str, dict]] = {}
    for r in _load("targets_memory.json", results)["rows"]:
        rows.setdefault(r["images"], {})[r["mode"]] = r

    def cell(r: dict) -> str:
        return f"+{r['peak_rss_increase_bytes'] / 2**20:.1f} MiB, {r['samples_per_second']:.0f}/s"

    lines = ["| images | fp16 cache | memory: peak RSS, samples/s | disk | online | disk: whole heal |",
             "|---:|---:|---:|---:|---:|---:|"]
    for images, modes in sorted(rows.items()):
        lines.append(_row([f"{images:,}", f"{modes['memory']['estimate_bytes'] / 2**20:.1f} MiB",
                           cell(modes["memory"]), cell(modes["disk"]), cell(modes["online"]),
                           f"{modes['disk']['heal_seconds']:.1f} s"]))
    return lines


PANELS = {"mlp": "MLP units", "mlp_heads": "MLP units + heads"}


def structured(results: Path) -> list[str]:
    lines = ["| pruned | ratio | heads / MLP units kept | params kept | pruned | cosine (STARFISH) | KL | CE |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for panel, label in PANELS.items():
        for path in sorted(results.glob(f"structured_{panel}_0.*.json")):
            d = json.loads(path.read_text())
            cells = _bold_best({k: _top1(d["runs"], k) for k in ("cosine", "kl", "ce")})
            lines.append(_row([label, d["ratio"], f"{d['heads_kept']} / {d['mlp_units_kept']}",
                               f"{100 * d['parameters_kept']:.0f} %", f"{d['pruned_top1']:.2f}", *cells.values()]))
    return lines


def structured_latency(results: Path) -> list[str]:
    rows: dict[tuple[str, float], dict[int, dict]] = {}
    for r in _load("structured_latency.json", results)["rows"]:
        rows.setdefault((r["panel"], r["ratio"]), {})[r["batch"]] = r
    lines = ["| pruned | ratio | batch 1: dense → pruned ms | speedup | batch 32: dense → pruned ms | speedup |",
             "|---|---:|---:|---:|---:|---:|"]
    for (panel, ratio), batches in rows.items():
        cells: list[object] = [PANELS[panel], ratio]
        for batch in (1, 32):
            r = batches[batch]
            cells += [f"{r['dense_ms']:.2f} → {r['pruned_ms']:.2f}", f"{r['speedup']:.2f}×"]
        lines.append(_row(cells))
    return lines


def _speedup(value: float) -> str:
    return f"**{value:.2f}×**" if value > 1 else f"{value:.2f}×"


def sparse_cpu(results: Path) -> list[str]:
    per: dict[tuple[int, str], dict[float, dict]] = {}
    for r in _load("sparse_cpu.json", results)["per_layer"]:
        per.setdefault((r["images"], r["layer"]), {})[r["sparsity"]] = r
    levels = sorted({s for cells in per.values() for s in cells})
    lines = [_row(["layer (ViT-B sizes)", "images (token rows)", "dense ms",
                   *(f"{100 * s:.0f} %" for s in levels)]),
             "|---|---|---:|" + "---:|" * len(levels)]
    for (images, layer), cells in sorted(per.items(), key=lambda kv: kv[0][0]):
        first = cells[levels[0]]
        name = layer.replace("x", "×")
        dense_ms = statistics.median(c["dense_ms"] for c in cells.values())
        lines.append(_row([name, f"{images} ({first['rows']:,})", f"{dense_ms:.1f}",
                           *(_speedup(cells[s]["speedup"]) for s in levels)]))
    return lines


def cnn_recovery(results: Path) -> list[str]:
    data = _load("cnn_recovery.json", results)
    groups: dict[str, dict[str, list[dict]]] = {}
    for r in data["rows"]:
        if r["blocks_mode"] == "explicit":
            groups.setdefault(r["variant"], {}).setdefault(r.get("recipe", "paper"), []).append(r)
    lines = ["| pruning | pruned | healed, paper's recipe | healed, default (`recipe=\"auto\"`) | dense |",
             "|---|---:|---:|---:|---:|"]
    for variant, recipes in groups.items():
        paper = recipes["paper"]
        first = paper[0]
        if variant.startswith("l1_"):
            label = f"`global_unstructured` L1 {first['sparsity']}, every Conv2d"
        else:
            label = (f"Torch-Pruning `MetaPruner` channels {variant.split('_')[1]} "
                     f"({first['dense_parameters'] / 1000:.0f} k → {first['parameters'] / 1000:.0f} k parameters)")
        cells = {"paper": [r["healed_top1"] for r in paper]}
        if "auto" in recipes:
            cells["auto"] = [r["healed_top1"] for r in recipes["auto"]]
        shown = _bold_best(cells)
        auto = shown.get("auto", "(the paper's: structured)")
        lines.append(_row([label, f"{statistics.mean(r['pruned_top1'] for r in paper):.2f}", shown["paper"],
                           auto, f"{first['dense_top1']:.2f}"]))
    return lines


def _coverage_cell(row: dict) -> str:
    if row["status"] == "toolkit_cannot_prune":
        reason = row["reason"]
        short = ("no graph in 60 s" if "did not finish" in reason else "removed nothing" if "no channel" in reason
                 else "no eligible layer" if "no Linear" in reason else reason.split(":")[0])
        return f"toolkit cannot ({short})"
    if row["status"] != "healed":
        return f"{row['status']}: {row['reason'].split(':')[0]}"
    unseen = "" if row["unseen_ok"] else " ✗ unseen"
    if row["restored"]:
        return "restored" + unseen
    return f"{row['judged_mean_cosine_before']:.3f} → {row['judged_mean_cosine_after']:.3f}{unseen}"


def coverage(results: Path) -> list[str]:
    """Per architecture and toolkit: the held-out mean block cosine before → after, "restored" (the
    pruned weights came back), or why the toolkit (or starfish) could not; ✗ where the final output
    on unseen samples came out further from the dense model's."""
    data = _load("coverage_matrix.json", results)
    by_arch: dict[str, dict[str, dict]] = {}
    for row in data["rows"]:
        by_arch.setdefault(row["architecture"], {})[row["toolkit"]] = row
    lines = ["| architecture | family | new | global L1 0.7 | torch.ao 2:4 | Torch-Pruning 0.3 |",
             "|---|---|---|---|---|---|"]
    for arch, cells in by_arch.items():
        first = next(iter(cells.values()))
        lines.append(_row([arch, first["group"], "yes" if first["new_family"] else "",
                           *(_coverage_cell(cells[t]) for t in ARCH_TOOLKITS)]))
    return lines


def coverage_summary(results: Path) -> list[str]:
    """Counts per family: cases the toolkits pruned, healed and improved, restored, and the rest."""
    data = _load("coverage_matrix.json", results)
    groups: dict[str, list[dict]] = {}
    for row in data["rows"]:
        groups.setdefault(row["group"], []).append(row)
    lines = ["| family | architectures | cases | toolkit cannot prune | healed | improved | restored "
             "| never below start | unseen no worse | refused / error |", "|---|" + "---:|" * 9]

    def counts(rows: list[dict]) -> list[object]:
        healed = [r for r in rows if r["status"] == "healed"]
        return [len({r["architecture"] for r in rows}), len(rows),
                sum(r["status"] == "toolkit_cannot_prune" for r in rows), len(healed),
                sum(r["improved"] for r in healed), sum(r["restored"] for r in healed),
                sum(r["judged_ok"] for r in healed), sum(r["unseen_ok"] for r in healed),
                sum(r["status"] in ("refused", "error") for r in rows)]

    for group, rows in groups.items():
        lines.append(_row([group, *counts(rows)]))
    total = counts(data["rows"])
    lines.append(_row(["**all**", *(f"**{c}**" for c in total)]))
    s = data["summary"]
    healed = max(1, s["healed"])
    lines.append(_row(["share of healed cases", "", "", "", "", f"{s['improved'] / healed:.0%}",
                       f"{s['restored'] / healed:.0%}", f"{s['judged_ok'] / healed:.0%}",
                       f"{s['unseen_ok'] / healed:.0%}", ""]))
    return lines


def tp_matrix_summary(results: Path) -> list[str]:
    """Issue 31's counts per family: pruned by Torch-Pruning alone, ran as it left them, repaired,
    healed and improved, restored, refused (with the reason), and the share of the pruned ones."""
    data = _load("tp_matrix.json", results)
    families: dict[str, list[dict]] = {}
    for row in data["rows"]:
        families.setdefault(row["family"], []).append(row)
    lines = ["| family | architectures | Torch-Pruning alone cannot | pruned by it alone | ran as it left them "
             "| repaired by attach | healed and improved | restored | refused | ended worse |",
             "|---|" + "---:|" * 9]

    def counts(rows: list[dict]) -> list[object]:
        pruned = [r for r in rows if r["status"] != "toolkit_cannot_prune"]
        healed = [r for r in pruned if r["status"] == "healed"]
        return [len(rows), len(rows) - len(pruned), len(pruned),
                sum(bool(r.get("pruned_runs_as_left")) for r in pruned),
                sum(bool(r.get("repaired")) for r in healed), sum(r["improved"] for r in healed),
                sum(r["restored"] for r in healed), sum(r["status"] in ("refused", "error") for r in pruned),
                sum(not (r["judged_ok"] and r["unseen_ok"]) for r in healed)]

    for family, rows in families.items():
        lines.append(_row([family, *counts(rows)]))
    lines.append(_row(["**all**", *(f"**{c}**" for c in counts(data["rows"]))]))
    s = data["summary"]
    lines.append(_row(["share of those pruned by Torch-Pruning alone", "", "", "", "", "",
                       f"{s['improved'] / max(1, s['pruned_by_toolkit_alone']):.0%}",
                       f"{s['restored'] / max(1, s['pruned_by_toolkit_alone']):.0%}",
                       f"{(s['refused'] + s['errors']) / max(1, s['pruned_by_toolkit_alone']):.0%}", ""]))
    return lines


def tp_matrix(results: Path) -> list[str]:
    """Per architecture: what Torch-Pruning alone did, and what attach made of it (held-out mean
    block cosine before → after, or why not)."""
    data = _load("tp_matrix.json", results)
    lines = ["| architecture | family | Torch-Pruning alone | attach | repairs |", "|---|---|---|---|---|"]
    for row in data["rows"]:
        if row["status"] == "toolkit_cannot_prune":
            reason = row["reason"]
            short = ("no graph in 60 s" if "did not finish" in reason else
                     "removed nothing" if "no parameter" in reason else reason.split(":")[0])
            lines.append(_row([row["architecture"], row["family"], f"cannot ({short})", "", ""]))
            continue
        alone = "pruned, runs" if row.get("pruned_runs_as_left") else "pruned, does not run"
        if row["status"] != "healed":
            why = row["reason"].split(": ", 1)[-1]
            where = why.split(" (")[0].split("fails ")[-1] if "fails " in why else why[:80]
            lines.append(_row([row["architecture"], row["family"], alone, f"{row['status']}: {where}", ""]))
            continue
        cell = ("restored" if row["restored"] else
                f"{row['mean_cosine_before']:.3f} → {row['mean_cosine_after']:.3f}")
        if not row["unseen_ok"]:
            cell += " ✗ unseen"
        kinds = sorted({k for note in row.get("repairs", []) for k, words in REPAIR_KINDS.items()
                        if any(w in note for w in words)})
        lines.append(_row([row["architecture"], row["family"], alone, cell, ", ".join(kinds)]))
    return lines


REPAIR_KINDS = {"heads": ("attention heads", "num_heads given"), "sizes": ("size of its pruned parameter",),
                "position table": ("position table",), "repeated channels": ("repeated by a reshape",)}


KERNEL_MODELS = {"vit_fmnist": "Fashion-MNIST ViT (dim 96, 28 px)", "vit_b": "ViT-B/16 (86 M, 224 px)"}


def demo_text(results: Path) -> list[str]:
    d = _load("demo_text.json", results)
    return [
        "| model | held-out perplexity | heal time |",
        "|---|---:|---:|",
        _row(["dense", f"{d['dense_perplexity']:.2f}", ""]),
        _row(["pruned, Wanda 2:4", f"{d['pruned_perplexity']:.2f}", ""]),
        _row(["healed (STARFISH)", f"**{d['healed_perplexity']:.2f}**", f"{d['heal_seconds']:.1f} s"]),
    ]


LANGUAGE_COLUMNS = (("none", ""), ("cosine", "default"), ("cosine", "paper"), ("closed_form", "lstsq"),
                    ("mse", "block_local"), ("cosine", "rule_v1"), ("mse", "rule_v1"), ("kl", "rule_v1"),
                    ("next_token", "rule_v1"), ("cosine", "paper_v1"), ("next_token", "paper"))
HEAL_RUN_COLUMNS = LANGUAGE_COLUMNS[1:5]  # measured together, under the held-out judgement
LANGUAGE_PRUNINGS = {"magnitude_50": "magnitude 50 %", "magnitude_70": "magnitude 70 %", "wanda_50": "Wanda 50 %",
                     "wanda_2_4": "Wanda 2:4", "tp_mlp_50": "Torch-Pruning MLP width 50 %"}


def _verdict(default: list[float], rows: dict, lower_is_better: bool) -> str:
    """Where the default stands among ``rows`` (column -> values): "best", "within noise" (behind the
    best by no more than the larger of the two seed std's) or "behind by" its gap."""
    pick = min if lower_is_better else max
    best = pick(rows, key=lambda k: statistics.mean(rows[k]))
    gap = statistics.mean(default) - statistics.mean(rows[best])
    gap = gap if lower_is_better else -gap
    noise = max(statistics.stdev(v) if len(v) > 1 else 0.0 for v in (default, rows[best]))
    if gap <= 0:
        return "best"
    return f"within noise ({gap:.2f} ≤ {noise:.2f})" if gap <= noise else f"behind by {gap:.2f} (std {noise:.2f})"


def language(results: Path) -> list[str]:
    """Held-out perplexity, mean ± std over seeds, per pruning (rows) and heal (columns); the best
    heal of each row in bold (lowest perplexity); whether the default is the best or within noise."""
    d = _load("language_kjv.json", results)
    cells: dict[tuple[str, str, str], list[float]] = {}
    for r in d["rows"]:
        cells.setdefault((r["pruning"], r["loss"], r["recipe"]), []).append(r["perplexity"])
    lines = ["| pruning | pruned | **default** | cosine, paper | closed-form only | block-wise MSE (EBFT-style) "
             "| earlier: cosine, rule | MSE, rule | KL, rule | next-token CE, rule | cosine, paper | next-token CE, "
             "paper | default among this run's rows | default among all rows |", "|---|" + "---:|" * 11 + "---|---|"]
    lines.append(_row([f"dense: {d['dense_perplexity']:.2f}"] + [""] * 13))
    for pruning, label in LANGUAGE_PRUNINGS.items():
        row = {col: cells[(pruning, *col)] for col in LANGUAGE_COLUMNS if (pruning, *col) in cells}
        if not row:
            continue
        heals = [col for col in row if col[0] != "none"]
        best = min(heals, key=lambda col: statistics.mean(row[col])) if heals else None
        texts = [(f"**{_mean_std(row[col])}**" if col == best else _mean_std(row[col])) if col in row else "—"
                 for col in LANGUAGE_COLUMNS]
        default = row.get(("cosine", "default"))
        this_run = {col: v for col, v in row.items() if col in HEAL_RUN_COLUMNS}
        verdicts = [_verdict(default, this_run, True), _verdict(default, {c: row[c] for c in heals}, True)] if (
            default) else ["", ""]
        lines.append(_row([label, *texts, *verdicts]))
    return lines


def language_fidelity(results: Path) -> list[str]:
    """Rows of the language benchmark that also measured closeness to the dense model on the test
    sequences (KL(dense || model) per token, logit cosine): mean ± std over seeds, per pruning and heal."""
    d = _load("language_kjv.json", results)
    cells: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in d["rows"]:
        if "kl_to_dense" in r:
            cells.setdefault((r["pruning"], r["loss"], r["recipe"]), []).append(r)
    lines = ["| pruning | heal | seeds | perplexity | KL(dense ‖ model) per token | logit cosine to dense |",
             "|---|---|---:|---:|---:|---:|"]
    labels = {("none", ""): "pruned", ("cosine", "default"): "default", ("cosine", "paper"): "cosine, paper",
              ("closed_form", "lstsq"): "closed-form only", ("mse", "block_local"): "block-wise MSE (EBFT-style)"}
    for pruning, label in LANGUAGE_PRUNINGS.items():
        for key, name in labels.items():
            rows = cells.get((pruning, *key))
            if rows:
                lines.append(_row([label, name, str(len(rows)), _mean_std([r["perplexity"] for r in rows]),
                                   _mean_std([r["kl_to_dense"] for r in rows], 4),
                                   _mean_std([r["logit_cosine_to_dense"] for r in rows], 5)]))
    return lines


def strategies(results: Path) -> list[str]:
    """The quality and time cost of ``strategy="sequential"`` against the joint default, both with
    the default recipe, on the shipped LM (perplexity, lower is better) and ViT (top-1, higher is
    better): mean ± std over seeds, and the ratio of median heal times."""
    lines = ["| model, pruning | joint (default) | sequential | sequential − joint | heal s, joint / sequential "
             "(median) |", "|---|---:|---:|---:|---:|"]

    def add(label: str, joint: list[dict[str, Any]], seq: list[dict[str, Any]], key: str, seconds: str) -> None:
        if not joint or not seq:
            return
        a, b = [r[key] for r in joint], [r[key] for r in seq]
        ta, tb = statistics.median(r[seconds] for r in joint), statistics.median(r[seconds] for r in seq)
        lines.append(_row([label, _mean_std(a), _mean_std(b), f"{statistics.mean(b) - statistics.mean(a):+.2f}",
                           f"{ta:.1f} / {tb:.1f} ({tb / ta:.2f}×)"]))

    lm = results / "language_kjv.json"
    if lm.exists():
        rows = json.loads(lm.read_text())["rows"]
        for pruning, label in LANGUAGE_PRUNINGS.items():
            mine = {k: [r for r in rows if (r["pruning"], r["loss"], r["recipe"]) == (pruning, "cosine", k)]
                    for k in ("default", "sequential")}
            add(f"kjv_llama, {label} (perplexity)", mine["default"], mine["sequential"], "perplexity", "heal_seconds")
    for s in (*SPARSITIES, "2_4"):
        path = results / f"recovery_baselines_{s}.json"
        if path.exists():
            runs = json.loads(path.read_text())["runs"]
            add(f"vit_fmnist, {s.replace('_', ':')} (top-1 %)", [r for r in runs if r["method"] == "default"],
                [r for r in runs if r["method"] == "sequential"], "top1", "heal_seconds")
    return lines


def scale_memory(results: Path) -> list[str]:
    """Peak resident memory of one heal per size and strategy (fresh processes each; per process
    under torchrun), with the models' own footprint, what the heal added to it, the heal's time,
    the block cosine before and after, and each peak's ratio to the joint heal's where both ran."""
    d = _load("scale_memory.json", results)
    lines = ["| parameters | strategy | peak RSS per process | of which the two models | added by the heal | heal s | "
             "mean block cosine | mask unchanged | peak / joint peak |", "|---:|---|---:|---:|---:|---:|---:|---|---:|"]
    joint = {r["size"]: r for r in d["rows"] if r["strategy"] == "joint" and r.get("fits")}
    gib = 1024**3
    for r in d["rows"]:
        params = f"{r['params'] / 1e6:,.0f} M" if "params" in r else r["size"]
        if not r.get("fits"):
            cap = f"the {r['memory_cap_bytes'] / gib:.1f} GiB cap" if "memory_cap_bytes" in r else "memory"
            at = f"; allocation failed at {r['peak_rss_bytes'] / gib:.1f} GiB" if "peak_rss_bytes" in r else ""
            models = f"{r['models_rss_bytes'] / gib:.2f} GiB" if "models_rss_bytes" in r else ""
            lines.append(_row([params, r["strategy"], f"does not fit in {cap}{at}", models, "", "", "", "", ""]))
            continue
        ratio = (f"{r['peak_rss_bytes'] / joint[r['size']]['peak_rss_bytes']:.2f}"
                 if r["strategy"] != "joint" and r["size"] in joint else "")
        lines.append(_row([params, r["strategy"], f"{r['peak_rss_bytes'] / gib:.2f} GiB",
                           f"{r['models_rss_bytes'] / gib:.2f} GiB",
                           f"{(r['peak_rss_bytes'] - r['models_rss_bytes']) / gib:.2f} GiB", f"{r['seconds']:.0f}",
                           f"{r['block_cosine_before']:.4f} → {r['block_cosine_after']:.4f}",
                           "yes" if r["mask_unchanged"] else "NO", ratio]))
    return lines


BASELINE_COLUMNS = {"default": "**default**", "paper": "cosine, paper", "closed_form": "closed-form only",
                    "block_mse": "block-wise MSE (EBFT-style)"}


def recovery_baselines(results: Path) -> list[str]:
    """Top-1 on the Fashion-MNIST test set, mean ± std over 3 seeds (1,000 images x 10 epochs), for the
    default, the paper's recipe, closed-form recovery alone and block-wise MSE, with the earlier
    measurements of the paper's recipe on all images and of the earlier auto rule for reference."""
    lines = [_row(["sparsity", "pruned", *BASELINE_COLUMNS.values(), "earlier: cosine, paper (all images)",
                   "earlier: row-norm + lr 4e-3 (all images)", "default chose", "default among this run's rows",
                   "default among all rows"]),
             "|---:|---:|" + "---:|" * (len(BASELINE_COLUMNS) + 2) + "---|---|---|"]
    for s in (*SPARSITIES, "2_4"):
        path = results / f"recovery_baselines_{s}.json"
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        cols: dict[str, list[float]] = {m: [r["top1"] for r in data["runs"] if r["method"] == m]
                                        for m in BASELINE_COLUMNS}
        label = s.replace("_", ":")
        main = results / (f"recovery_main_{s}.json" if s != "2_4" else "recovery_nm_2_4.json")
        variant = results / f"recovery_variant_row_norm_lr_4e-3_{s}_1000.json"
        if main.exists():
            cols["earlier_paper"] = _top1(json.loads(main.read_text())["runs"], "cosine")
        if variant.exists():
            cols["earlier_rule"] = _top1(json.loads(variant.read_text())["runs"])
        shown = _bold_best(cols)
        chosen = sorted({f"{r['chosen']['warm_start']}, {r['chosen']['lr']:g}" for r in data["runs"]
                         if r["method"] == "default"})
        this_run = {m: cols[m] for m in BASELINE_COLUMNS}
        lines.append(_row([label, f"{data['pruned_top1']:.2f}", *(shown[m] for m in BASELINE_COLUMNS),
                           shown.get("earlier_paper", ""), shown.get("earlier_rule", ""), "; ".join(chosen),
                           _verdict(cols["default"], this_run, False), _verdict(cols["default"], cols, False)]))
    return lines


def recovery_warm_starts(results: Path) -> list[str]:
    """Each warm start then training (the paper's lr and 4e-3): the held-out objective right after
    the warm start, and top-1 after training, mean ± std over seeds."""
    lines = ["| sparsity | warm start | held-out objective: pruned → after the warm start | top-1 after training, "
             "lr 6e-4 | top-1 after training, lr 4e-3 |", "|---:|---|---:|---:|---:|"]
    for s in (*SPARSITIES, "2_4"):
        path = results / f"recovery_warm_starts_{s}.json"
        if not path.exists():
            continue
        runs = json.loads(path.read_text())["runs"]
        for warm in ("none", "row_norm", "lstsq"):
            mine = [r for r in runs if r["warm_start"] == warm]
            start = statistics.mean(r["held_out_start"] for r in mine)
            warmed = [r["held_out_warm"] for r in mine if r["held_out_warm"] is not None]
            after = f"{start:.4f} → {statistics.mean(warmed):.4f}" if warmed else f"{start:.4f}"
            tops = [_mean_std([r["top1"] for r in mine if r["lr"] == lr]) for lr in (6e-4, 4e-3)]
            lines.append(_row([s.replace("_", ":"), warm, after, *tops]))
    return lines


def probe_overhead(results: Path) -> list[str]:
    d = _load("probe_overhead.json", results)
    lines = ["| heal | default (probe included) s | the probe's choice given s | overhead | the probe itself s | chose "
             "| same weights |", "|---|---:|---:|---:|---:|---|---|"]
    for r in d["rows"]:
        lines.append(_row([r["case"], f"{r['median_auto_seconds']:.1f}", f"{r['median_fixed_seconds']:.1f}",
                           f"{r['overhead']:+.1%}", f"{statistics.median(r['probe_seconds']):.1f}",
                           f"{r['chosen']['warm_start']}, lr {r['chosen']['lr']:g}",
                           "yes" if r["same_weights"] else "no"]))
    return lines


def _pruning_label(pruning: str) -> str:
    if pruning.startswith("unstructured_"):
        return f"unstructured {float(pruning.split('_')[1]):.0%}"
    if pruning == "2_4":
        return "2:4"
    return f"Torch-Pruning MLP {float(pruning.split('_')[1]):.0%}"


def _kernels(results: Path, prefix: str) -> list[str]:
    lines = ["| model | batch | pruning | dense ms | pruned, dense kernels ms | chosen kernels ms | speedup "
             "| vs compiled dense | layers swapped |",
             "|---|---:|---|---:|---:|---:|---:|---:|---|"]
    for model in KERNEL_MODELS:
        paths = results.glob(f"{prefix}_{model}_b*.json")
        for path in sorted(paths, key=lambda p: int(p.stem.split("_b")[-1].split("_")[0])):
            data = json.loads(path.read_text())
            order = {p: i for i, p in enumerate(("unstructured_0.5", "unstructured_0.7", "unstructured_0.8",
                                                 "unstructured_0.9", "unstructured_0.95", "2_4", "tp_0.3", "tp_0.5"))}
            for row in sorted(data["rows"], key=lambda r: order.get(r["pruning"], 99)):
                counts: dict[str, int] = {}
                pruned = [layer for layer in row["layers"] if layer["sparsity"] >= 0.01]  # not stray exact zeros
                for layer in pruned:
                    if layer["kernel"] != "dense":
                        counts[layer["kernel"]] = counts.get(layer["kernel"], 0) + 1
                swapped = ", ".join(f"{k} {n}/{len(pruned)}" for k, n in counts.items()) or (
                    f"none of {len(pruned)}" if pruned else "— (smaller model)")
                compiled = row.get("speedup_vs_compiled_dense")
                lines.append(_row([
                    KERNEL_MODELS[model], row["batch_size"], _pruning_label(row["pruning"]), f"{row['dense_ms']:.2f}",
                    f"{row['pruned_dense_kernels_ms']:.2f}", f"{row['sparse_ms']:.2f}", f"{row['speedup']:.2f}×",
                    f"{compiled:.2f}×" if compiled else "", swapped]))
    return lines


def kernels_cpu(results: Path) -> list[str]:
    return _kernels(results, "kernels")


def export_sizes(results: Path) -> list[str]:
    """On-disk size of each export against the same export of the dense model."""
    d = _load("export_sizes.json", results)
    lines = ["| model | pruning | format | dense export | healed export | ratio |", "|---|---|---|---:|---:|---:|"]
    for r in d["rows"]:
        lines.append(_row([r["model"], r["pruning"], r["format"], f"{r['dense_bytes'] / 2**20:.2f} MiB",
                           f"{r['pruned_bytes'] / 2**20:.2f} MiB", f"{r['pruned_bytes'] / r['dense_bytes']:.2f}"]))
    return lines


def serve_latency(results: Path) -> list[str]:
    """ONNX Runtime latency of each healed export against its dense model (same run, medians)."""
    d = _load("serve_latency.json", results)
    lines = ["| model | pruning | batch | dense ms | healed ms | speed-up | ONNX size, healed / dense |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in d["rows"]:
        size = r["onnx_bytes"]["sparse"] / r["onnx_bytes"]["dense"]
        lines.append(_row([r["model"], r["pruning"], r["batch_size"], f"{r['dense_ms']:.3f}", f"{r['sparse_ms']:.3f}",
                           f"{r['speedup']:.2f}×", f"{size:.2f}"]))
    return lines


TABLES: dict[str, Callable[[Path], list[str]]] = {
    "demo": demo,
    "recovery_main": recovery_main,
    "recovery_main_readme": recovery_main_readme,
    "recovery_variants": recovery_variants,
    "heal_speed": heal_speed,
    "target_cache": target_cache,
    "targets_memory": targets_memory,
    "structured": structured,
    "structured_latency": structured_latency,
    "sparse_cpu": sparse_cpu,
    "cnn_recovery": cnn_recovery,
    "coverage": coverage,
    "coverage_summary": coverage_summary,
    "tp_matrix_summary": tp_matrix_summary,
    "tp_matrix": tp_matrix,
    "recovery_baselines": recovery_baselines,
    "probe_overhead": probe_overhead,
    "recovery_warm_starts": recovery_warm_starts,
    "kernels_cpu": kernels_cpu,
    "demo_text": demo_text,
    "language": language,
    "language_fidelity": language_fidelity,
    "strategies": strategies,
    "scale_memory": scale_memory,
    "export_sizes": export_sizes,
    "serve_latency": serve_latency,
}


def render(text: str, results: Path = RESULTS) -> tuple[str, list[str]]:
    """``text`` with every marked table regenerated, and the names of the tables that changed."""
    lines = text.split("\n")
    out: list[str] = []
    changed: list[str] = []
    i = 0
    while i < len(lines):
        out.append(lines[i])
        match = MARKER.match(lines[i])
        i += 1
        if not match:
            continue
        name = match.group(1)
        if name not in TABLES:
            raise SystemExit(f"unknown table {name!r} in a marker; known: {', '.join(TABLES)}")
        old = []
        while i < len(lines) and lines[i].startswith("|"):
            old.append(lines[i])
            i += 1
        new = TABLES[name](results)
        if new != old:
            changed.append(name)
        out.extend(new)
    return "\n".join(out), changed


def markdown_tables(text: str) -> list[tuple[int, bool]]:
    """Each table's first line number (1-based) and whether a marker precedes it."""
    lines = text.split("\n")
    return [(i + 1, i > 0 and bool(MARKER.match(lines[i - 1])))
            for i, line in enumerate(lines)
            if line.startswith("|") and (i == 0 or not lines[i - 1].startswith("|"))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table is stale")
    args = parser.parse_args(argv)
    stale = []
    for page in PAGES:
        text, changed = render(page.read_text())
        stale += [f"{page.relative_to(ROOT)}: {name}" for name in changed]
        if changed and not args.check:
            page.write_text(text)
    verb = "stale" if args.check else "rewritten"
    print(f"{len(stale)} table(s) {verb}" + "".join(f"\n  {s}" for s in stale))
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
