#!/usr/bin/env bash
# Everything GPU-side in one call: build the CUDA extension, run the GPU tests, run the CUDA tests
# under compute-sanitizer memcheck, run the op and pipeline benchmarks (reference vs fast; big-model capacity), and write the results (CSV with device,
# versions and commit) to benchmarks/results/ and, when set, to $OUT.
#
# On a lent GPU machine (torch, triton, nvcc, compute-sanitizer preinstalled; no package index):
#   mkdir -p .gpu-wheels && cp ../shared/wheels/*.whl .gpu-wheels/   # once, here; .gpu-wheels is git-ignored
#   device run: `bash scripts/gpu_check.sh` with carry [".gpu-wheels"]
# Anywhere else with a GPU and the project's venv: `bash scripts/gpu_check.sh`.
# Stages can be skipped: GPU_CHECK_SKIP="sanitizer bench" bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
[ -x .venv/bin/python ] && PYTHON=.venv/bin/python
RESULTS=benchmarks/results
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu_check.log"
SUMMARY="$RESULTS/gpu_check.csv"
: > "$LOG"
skip() { [[ " ${GPU_CHECK_SKIP:-} " == *" $1 "* ]]; }
stage_status=()
run_stage() {  # run_stage NAME COMMAND...: logs, timing, pass/fail recorded, never aborts the script
  local name=$1; shift
  if skip "$name"; then stage_status+=("$name,skipped,0"); return; fi
  echo "=== $name: $*" | tee -a "$LOG"
  local start=$SECONDS
  "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  stage_status+=("$name,$([ "$rc" = 0 ] && echo passed || echo "failed(rc=$rc)"),$((SECONDS - start))")
}

# 0. A GPU must be visible: otherwise every GPU test would be skipped and the run look green.
run_stage gpu "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU is visible to torch')"
# 1. Pure-Python dependencies the machine lacks (open_clip, segment_anything, ftfy, wcwidth).
if ls .gpu-wheels/*.whl >/dev/null 2>&1; then
  run_stage wheels "$PYTHON" -m pip install --no-index --no-deps --quiet .gpu-wheels/*.whl
fi
# 2. Build with CUDA required (fails loudly instead of silently building CPU only).
export CLIPFAST_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0"} MAX_JOBS=${MAX_JOBS:-16}
run_stage build "$PYTHON" -m pip install --no-build-isolation --no-deps --quiet -e .
run_stage info "$PYTHON" -m clipfast.cli info
# 3. GPU tests: every `gpu`-marked test (CUDA and Triton backends against the reference).
run_stage gpu_tests "$PYTHON" -m pytest -q -m gpu tests/
# 4. The CUDA tests under compute-sanitizer memcheck (out-of-bounds and misaligned accesses, leaks).
if command -v compute-sanitizer >/dev/null; then
  run_stage sanitizer compute-sanitizer --tool memcheck --error-exitcode 99 --leak-check full \
    "$PYTHON" -m pytest -q -m gpu -k cuda tests/test_mask_crop.py tests/test_mask_pool.py tests/test_region_score.py tests/test_region_topk.py
  run_stage racecheck compute-sanitizer --tool racecheck --error-exitcode 99 \
    "$PYTHON" -m pytest -q -m gpu -k "cuda and not realistic" tests/test_mask_pool.py tests/test_region_score.py tests/test_region_topk.py
else
  stage_status+=("sanitizer,missing,0")
fi
# 5. Op benchmarks at the issue's sizes, then the pipeline: scan / repair step on ViT-B-16 and ViT-L-14,
#    end-to-end defend and the baseline, ViT-L/H/bigG capacity (appends to benchmarks/results/{ops,pipeline}.csv).
run_stage bench "$PYTHON" benchmarks/run.py --full --suite ops
run_stage pipeline "$PYTHON" benchmarks/run.py --full --suite pipeline

# Summary CSV: one row per stage with device, versions and commit.
device=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" 2>/dev/null)
versions=$("$PYTHON" -c "import torch, triton; print(f'torch {torch.__version__} / CUDA {torch.version.cuda} / triton {triton.__version__}')" 2>/dev/null)
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
stamp=$(date -u +%Y-%m-%dT%H:%M:%SZ)
[ -s "$SUMMARY" ] || echo "timestamp,device,versions,commit,stage,result,seconds" > "$SUMMARY"
for row in "${stage_status[@]}"; do echo "$stamp,$device,$versions,$commit,$row" >> "$SUMMARY"; done
echo; echo "stage,result,seconds"; printf '%s\n' "${stage_status[@]}"
if [ -n "${OUT:-}" ]; then cp "$SUMMARY" "$LOG" "$RESULTS/ops.csv" "$RESULTS/pipeline.csv" "$RESULTS/pipeline.png" "$OUT/" 2>/dev/null; fi
printf '%s\n' "${stage_status[@]}" | grep -q "failed" && exit 1
exit 0
