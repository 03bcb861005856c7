#!/bin/sh
# The GPU check, for a machine with a GPU, a CUDA torch and no network (the borrowed H200:
# torch 2.11.0+cu130, cmake, ninja, pytest, scikit-build-core). About 10 minutes at most:
#   1. build and install zerockpt against that torch (no download: --no-build-isolation);
#   2. the CUDA tests, and the device-parametrized tests on cuda;
#   3. benches/bench_cuda.py at GPU_CHECK_GB (default 2) GB;
# and writes everything under $OUT (default build/gpu-check): summary.txt first.
# PYTHON picks the interpreter (default python3). Each step has its own time limit; a failed
# step is reported and the next one still runs. Exit status: 0 only if every step passed.
set -u
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
out=${OUT:-build/gpu-check}
gb=${GPU_CHECK_GB:-2}
mkdir -p "$out"
summary="$out/summary.txt"
: >"$summary"
status=0

step() {  # step NAME LIMIT_S LOG COMMAND...: runs COMMAND, records rc and seconds
  name=$1 limit=$2 log=$3
  shift 3
  t0=$(date +%s)
  timeout "$limit" "$@" >"$out/$log" 2>&1
  rc=$?
  dt=$(($(date +%s) - t0))
  tail_line=$(grep -E '(passed|failed|error|skipped)' "$out/$log" | tail -n 1)
  echo "$name: rc=$rc in ${dt} s${tail_line:+ ($tail_line)}" | tee -a "$summary"
  [ "$rc" -eq 0 ] || status=1
}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
  "$py" -c "import sys, torch; print(sys.version.split()[0], torch.__version__, \
torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name())"
  nproc
} >"$out/env.txt" 2>&1
cat "$out/env.txt" >>"$summary"

step build 300 build.log "$py" -m pip install --no-build-isolation --no-deps --no-cache-dir \
  --force-reinstall -C build-dir=build/gpu-check-build .
# The CUDA tests and the device-parametrized ones (tests/test_device.py: their "cuda" cases run
# here; the test accelerator's are skipped unless it was built).
step cuda-tests 240 cuda-tests.log "$py" -m pytest tests -m "cuda or device" -p no:cacheprovider \
  -q -rs --junitxml="$out/cuda-tests.xml"
step bench-cuda 240 bench-cuda.log "$py" benches/bench_cuda.py --gb "$gb" --rounds 2 \
  --json "$out/bench-cuda.json"
echo "overall: $([ $status -eq 0 ] && echo passed || echo FAILED)" | tee -a "$summary"
exit $status
