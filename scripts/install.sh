#!/usr/bin/env bash
# Install clipfast into ./.venv (or $CLIPFAST_VENV) on the pinned stack, compiled kernels included.
# --isolated makes pip ignore local find-links/indexes that could substitute a CPU-only torch: every
# machine gets PyPI's CUDA build of torch 2.13.0, which runs without a GPU, lets torchvision import
# and lets the CUDA kernels compile wherever nvcc exists. Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${CLIPFAST_VENV:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install --isolated --disable-pip-version-check -q -r requirements.txt
MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$venv/bin/python" -m pip install --isolated --disable-pip-version-check -q \
    --no-build-isolation --no-deps -e .
"$venv/bin/clipfast" info
