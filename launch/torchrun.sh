#!/usr/bin/env bash
# One node: N trainer ranks under torchrun + the engines rank 0 spawns on the GPUs left free; torn down together.
#   launch/torchrun.sh CONFIG [dotted.overrides] [--resume] [--nproc N]      (same arguments as oapl-train)
# A thin wrapper of `oapl-launch local` (oapl_megatron/launch/local.py); PYTHON picks the interpreter.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" -m oapl_megatron.entrypoints.launch local "$@"
