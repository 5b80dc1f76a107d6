#!/usr/bin/env bash
# Create the peers virtual environment used by the cross-validation test and the benchmarks:
# TauFactor (CPU torch wheel), PoreSpy and scikit-fem on the pyenv CPython 3.11.
# Idempotent: a second run only checks that the packages import (about 5 s).
#
# Environment variables:
#   FEM_ANODE_PEERS_VENV   target folder (default: <repo>/benchmarks/.peers-venv, git-ignored)
#   FEM_ANODE_PEERS_PYTHON interpreter for the venv (default: python3.11, then python3)
#   FEM_ANODE_TORCH_WHEEL  CPU torch wheel (default: /opt/wheels/torch-2.13.0+cpu-cp311-...whl);
#                          never `pip install torch` from PyPI here: it pulls GBs of CUDA.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${FEM_ANODE_PEERS_VENV:-$here/benchmarks/.peers-venv}"
wheel="${FEM_ANODE_TORCH_WHEEL:-/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl}"
py="${FEM_ANODE_PEERS_PYTHON:-}"
if [ -z "$py" ]; then
  for cand in python3.11 /root/.pyenv/versions/3.11.7/bin/python3 python3; do
    if command -v "$cand" >/dev/null 2>&1; then py="$cand"; break; fi
  done
fi
check='import taufactor, porespy, openpnm, pyamg, skfem, torch, scipy; print("peers ok:", "taufactor", getattr(taufactor, "__version__", "?"), "porespy", porespy.__version__, "scikit-fem", getattr(skfem, "__version__", "?"), "torch", torch.__version__)'
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "$check" 2>/dev/null; then
  exit 0
fi
if [ -z "$py" ]; then echo "setup_peers: no Python 3.11 interpreter found" >&2; exit 1; fi
if [ ! -f "$wheel" ]; then
  echo "setup_peers: CPU torch wheel not found at $wheel (set FEM_ANODE_TORCH_WHEEL)" >&2; exit 1
fi
start=$(date +%s)
"$py" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet "$wheel"
"$venv/bin/python" -m pip install --quiet taufactor porespy openpnm pyamg scikit-fem
"$venv/bin/python" -c "$check"
echo "setup_peers: installed in $(( $(date +%s) - start )) s into $venv"
