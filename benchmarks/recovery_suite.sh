#!/usr/bin/env bash
# The whole recovery suite (issue 5), one step at a time; no step takes over 10 minutes on 2 CPU cores.
# Usage: bash benchmarks/recovery_suite.sh [main|small|ablations|nm|variants|report] ...   (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."  # the repository root: benchmarks run as modules
PY=${PY:-.venv/bin/python}
run() { echo "+ recovery.py $*"; /usr/bin/time -f "  %e s" "$PY" -m benchmarks.recovery "$@"; }
steps=("$@"); [ ${#steps[@]} -eq 0 ] && steps=(main small ablations nm variants report)
for step in "${steps[@]}"; do
  case $step in
    main) for s in 0.5 0.7 0.8 0.9 0.95; do run main --sparsity $s; done ;;
    small) for s in 0.8 0.9 0.95; do run small --sparsity $s; done ;;
    ablations) run sweep; run source ;;
    nm) run nm ;;
    variants)
      for s in 0.5 0.7 0.8; do for v in row_norm lr_4e-3 row_norm_lr_4e-3; do run variant --name $v --sparsity $s; done; done
      for v in row_norm row_norm_lr_4e-3; do run variant --name $v --sparsity 2:4; done
      run variant --name row_norm --sparsity 0.8 --images 256
      for s in 0.9 0.95; do for n in 1000 256; do
        for v in adaptive row_norm lr_4e-3 row_norm_lr_4e-3 kl_lr_4e-3; do run variant --name $v --sparsity $s --images $n; done
      done; done
      for n in 1000 256; do for v in kl_row_norm kl_row_norm_lr_4e-3; do
        run variant --name $v --sparsity 0.95 --images $n; done; done
      for s in 0.9 0.95; do run variant --name bf16 --sparsity $s; done ;;
    report) "$PY" -m benchmarks.results_page; "$PY" -m benchmarks.plot_recovery ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
