#!/usr/bin/env bash
# The CUDA rows of the sparse-kernel tables, in one go on one GPU (about 4 minutes on one H100):
# the 2:4 kernels' correctness tests, then ViT-B/16 in fp16 at batch 1 and 32, dense vs CSR /
# 2:4 cuSPARSELt / 2:4 CUTLASS per layer, against the dense model eager and under torch.compile.
# Writes benchmarks/results/gpu_kernels_vit_b_b{1,32}_float16.json (GPU, driver, torch named).
set -euo pipefail
cd "$(dirname "$0")/.."  # the repository root: benchmarks run as modules
PY=${PY:-.venv/bin/python}
"$PY" -m pytest -q -m cuda tests/test_deploy.py
"$PY" -m benchmarks.kernels --model vit_b --device cuda --dtype float16 --batch 1 32 \
    --pruning unstructured_0.5 unstructured_0.9 2_4 tp_0.5
