#!/usr/bin/env bash
# The op and Triton tests against the GPU machine's versions, on this CPU: a separate venv with
# torch 2.11.0, torchvision 0.26.0 and triton 3.6.0 (PyPI's builds, as on the lent H200: see
# /work/.library/device/KINDS.md) and Python 3.12 where one is found, the extension built against
# that torch in a copy of the tree (never the checkout's own build), then the op test files with
# Triton's CPU interpreter.
#
#   bash scripts/venv_torch211.sh                 # CPU build; the six op test files
#   bash scripts/venv_torch211.sh --cuda          # also compile the CUDA kernels against torch 2.11's headers
#   bash scripts/venv_torch211.sh -- -k topk      # extra pytest arguments after --
#
# VENV (default /tmp/clipfast-torch211) holds the venv and the copy (VENV/src); a few GB of downloads
# the first time, then reused. The tests' output ends with pytest's summary; the exit code is pytest's.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
venv=${VENV:-/tmp/clipfast-torch211}
cuda=0
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --cuda) cuda=1; shift ;;
    --) shift; extra=("$@"); break ;;
    *) echo "unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done

# Python 3.12 (the GPU machine's 3.12.3) if any is here, else python3.
python=""
for candidate in python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12 python3; do
  if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import sys' 2>/dev/null; then
    python=$(command -v "$candidate"); break
  fi
done
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --isolated --disable-pip-version-check -q)
"${pip[@]}" torch==2.11.0 torchvision==0.26.0 triton==3.6.0
# The rest of requirements.txt, torch and torchvision pins left out (pip keeps the ones above).
grep -vE '^(#|torch==|torchvision==|$)' requirements.txt > "$venv/requirements-rest.txt"
# numpy < 2.4: Triton 3.6's CPU interpreter turns 1-element arrays into ints with int(array), which
# numpy 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"; Triton 3.7 squeezes
# first). The GPU machine has numpy 2.5.2 with Triton 3.6, but no interpreter runs there.
"${pip[@]}" -r "$venv/requirements-rest.txt" setuptools wheel "numpy<2.4"

export CLIPFAST_COMMIT=${CLIPFAST_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}
# A copy of the tree as the device tool sends it: tracked and untracked-not-ignored files.
rm -rf "$venv/src"
mkdir -p "$venv/src"
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
  [ -e "$f" ] && printf '%s\0' "$f"
done | tar -c --null -T - | tar -x -C "$venv/src"
cd "$venv/src"
"$venv/bin/python" - <<'EOF'
import sys, torch, torchvision, triton
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"torchvision {torchvision.__version__}, triton {triton.__version__}")
EOF
echo "building clipfast._C against that torch (CLIPFAST_CUDA=$cuda) in $venv/src ..."
CLIPFAST_CUDA=$cuda TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-2} \
  "$venv/bin/python" setup.py -q build_ext --inplace > "$venv/build.log" 2>&1 \
  || { tail -40 "$venv/build.log"; echo "build failed: $venv/build.log"; exit 1; }
grep -E "clipfast: CUDA root" "$venv/build.log" || true
"$venv/bin/python" -c "import json; print('build:', json.load(open('clipfast/_build_info.json')))"
files=(tests/test_mask_crop.py tests/test_mask_pool.py tests/test_region_score.py tests/test_region_topk.py
       tests/test_op_dispatch.py tests/test_extension.py tests/test_gpu_check.py)
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider -m "not slow" -rs "${files[@]}" "${extra[@]}"
