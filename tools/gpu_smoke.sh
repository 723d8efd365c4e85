#!/usr/bin/env bash
# Run tools/gpu_smoke.py on a lent GPU machine: a stock PyTorch image (Python 3.12, CUDA torch, no megatron-core,
# vLLM or Transformer Engine, no internet) plus this repository and one small upload of wheels.
#
#   tools/gpu_smoke.sh wheels [DIR]        here (with PyPI): download the pure/py3.12 wheels the image lacks
#                                          (megatron-core, transformers, pydantic, ... ≈ 46 MB; no torch stack)
#                                          into DIR (default runs/gpu_wheels, git-ignored)
#   tools/gpu_smoke.sh run [DIR] [OUT]     on the GPU machine: install them offline (pip keeps what the image has:
#                                          torch, numpy), then run every check; JSON to OUT (default
#                                          ${OUT:-runs}/gpu_smoke.json), table on stdout; exit 1 if a check erred
#
# With the `device` tool of this workplace: `tools/gpu_smoke.sh wheels`, then run
#   tools/gpu_smoke.sh run runs/gpu_wheels "$OUT/gpu_smoke.json"      with carry=["runs/gpu_wheels"], timeout ≤ 600 s
# (target ≤ 8 min on one H100/H200; vLLM and TE checks are skipped with the reason unless they import there).
# Record the table and the JSON's numbers in docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-}
dir=${2:-runs/gpu_wheels}
PY=${PYTHON:-python3}
# What the smoke check imports beyond torch (versions: pyproject.toml's pins)
PKGS=("megatron-core==0.16.1" "transformers>=5.16.1,<5.20" "safetensors>=0.4" "pydantic>=2.6,<3" "pyyaml>=6"
      "rich>=13" "psutil>=5.9")

case "$mode" in
wheels)
    mkdir -p "$dir"
    get() { $PY -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
                --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
                -d "$dir" "$@"; }
    # megatron-core without its dependencies: the image brings torch (its CUDA build must stay) and numpy
    get --no-deps "${PKGS[0]}"
    get "${PKGS[@]:1}"
    du -sh "$dir"
    ;;
run)
    out=${3:-${OUT:-runs}/gpu_smoke.json}
    $PY -m pip install -q --no-index --find-links "$dir" "${PKGS[@]}"
    nvidia-smi -L || true
    $PY tools/gpu_smoke.py --out "$out"
    ;;
*)
    sed -n '2,17p' "$0"
    exit 2
    ;;
esac
