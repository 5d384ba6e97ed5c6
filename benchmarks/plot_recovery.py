"""Figure-1-style plot and CSV of the recovery main table: accuracy against sparsity per method,
dense as a line, pruned dashed.

    python -m benchmarks.plot_recovery     # writes results/recovery_main.png and recovery_main.csv
"""

from __future__ import annotations

import csv
import json
import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.common import RESULTS  # noqa: E402
from benchmarks.recovery import LOSSES, SPARSITIES  # noqa: E402

LABELS = {"cosine": "cosine (STARFISH)", "mse": "MSE", "kl": "KL", "ce": "CE", "cosine+kl": "cosine + KL"}


def main() -> None:
    rows, dense = [], None
    for s in SPARSITIES:
        data = json.loads((RESULTS / f"recovery_main_{s}.json").read_text())
        dense = data["dense_top1"]
        for loss in LOSSES:
            accs = [r["top1"] for r in data["runs"] if r["loss"] == loss]
            rows.append({"sparsity": s, "method": loss, "mean": statistics.mean(accs),
                         "std": statistics.stdev(accs), "seeds": len(accs)})
        rows.append({"sparsity": s, "method": "pruned", "mean": data["pruned_top1"], "std": 0.0, "seeds": 1})
    with open(RESULTS / "recovery_main.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in (*LOSSES, "pruned"):
        pts = [r for r in rows if r["method"] == method]
        ax.errorbar([r["sparsity"] for r in pts], [r["mean"] for r in pts], yerr=[r["std"] for r in pts],
                    label=LABELS.get(method, "pruned (no healing)"), marker="o", capsize=3,
                    linestyle="--" if method == "pruned" else "-")
    ax.axhline(dense, color="black", linewidth=1, label=f"dense ({dense:.2f})")
    ax.set_xlabel("unstructured sparsity of qkv / proj / fc1 / fc2")
    ax.set_ylabel("top-1 % (Fashion-MNIST test, 10k)")
    ax.set_title("ViT on Fashion-MNIST: 1,000 images x 10 epochs, 3 seeds")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / "recovery_main.png", dpi=120)
    print("saved", RESULTS / "recovery_main.png", RESULTS / "recovery_main.csv")


if __name__ == "__main__":
    main()
