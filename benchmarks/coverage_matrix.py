"""Coverage matrix for the README: every architecture of ``tests/matrix_cases.py`` x three toolkits,
healed with default block discovery; records the rule, the blocks, the cosine before and after, or
the error. The test ``tests/test_coverage_matrix.py`` asserts the same cases.

    python -m benchmarks.coverage_matrix            # writes results/coverage_matrix.json
    python -m benchmarks.coverage_matrix run hf_    # reruns the matching cases only
    python -m benchmarks.results_page               # the docs' table from the JSON
"""

from __future__ import annotations

import json
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "tests"))
OUT = ROOT / "results" / "coverage_matrix.json"


def run(only: list[str]) -> None:
    """Heal every case (or, with ``only``, the cases whose ``architecture-toolkit`` id contains one
    of those strings, replacing their rows in the saved JSON)."""
    from matrix_cases import ARCHS, TOOLKITS, run_case

    torch.set_num_threads(2)
    old = {(r["architecture"], r["toolkit"]): r for r in json.loads(OUT.read_text())["rows"]} if only else {}
    rows = []
    for arch in ARCHS:
        for toolkit in TOOLKITS:
            if only and not any(o in f"{arch.name}-{toolkit}" for o in only):
                rows.append(old[arch.name, toolkit])
                continue
            start = time.perf_counter()
            row = {"architecture": arch.name, "toolkit": toolkit}
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    report, _, _ = run_case(arch, toolkit, arch.build().eval())
                row |= {
                    "status": "healed", "rule": report.block_rule, "blocks": len(report.blocks),
                    "output_aligned": "(output)" in report.blocks,
                    "cosine_before": report.mean_cosine_before, "cosine_after": report.mean_cosine_after,
                    "mask_unchanged": report.mask_unchanged,
                }
            except Exception as exc:  # noqa: BLE001 - recorded, the table shows it
                row |= {"status": "error", "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
            row["seconds"] = time.perf_counter() - start
            print(json.dumps(row), flush=True)
            rows.append(row)
    OUT.write_text(json.dumps({
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "settings": "32 random inputs (3x32x32 images or 12 token ids), 2 epochs, batch 8, lr 1e-3; "
                    "global L1 0.7 over Linear/Conv; ao WeightNormSparsifier 2:4 on Linear; "
                    "Torch-Pruning MetaPruner 0.3 (L2 magnitude) through starfish.attach",
        "rows": rows,
    }, indent=1))


if __name__ == "__main__":
    run(sys.argv[2:] if sys.argv[1:2] == ["run"] else [])
