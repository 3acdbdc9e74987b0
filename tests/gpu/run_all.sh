#!/usr/bin/env bash
# GPU checks of the device pack engine; run on the GPU machine from the checkout, after
# `bash .device/setup.sh` (which installs commlib in place):
#
#   bash .device/setup.sh && bash tests/gpu/run_all.sh
#
# 1. the build must carry the kernels: when the machine had no nvcc, it is rebuilt with the
#    fatbin carried in .device/device_kernels.fatbin (made where nvcc is:
#    nvcc -fatbin -O3 -std=c++17 -Xfatbin=-compress-all -gencode arch=compute_80,code=sm_80
#         -gencode arch=compute_90,code=sm_90 -gencode arch=compute_80,code=compute_80
#         -o .device/device_kernels.fatbin native/pack/device_kernels.cu)
# 2. pytest -q tests/test_device_pack.py
# 3. pytest -q tests/test_kernels_nvrtc.py: the kernels compiled at run time by NVRTC
#    (COMMLIB_KERNELS=nvrtc) pack like the host MPI and give the fatbin's bytes
# 4. commlib bench pack --device (table, --json/--csv into $OUT)
#
# Logs and results go to $OUT (default ./gpu-out).  Every step runs even when an earlier
# one failed; the summary comes last; the exit status is 1 when any step failed.
# BENCH_ARGS adds options to the benchmark (e.g. BENCH_ARGS=--quick).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
summary=()
failed=0

# step NAME LOG COMMAND...: runs COMMAND, its output to the terminal and LOG; records the result.
step() {
    local name="$1" log="$2" start=$SECONDS rc
    shift 2
    echo "=== $name: $*" | tee "$log"
    "$@" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 0 ]; then
        summary+=("ok      $name ($((SECONDS - start)) s)")
    else
        summary+=("FAILED  $name: exit $rc ($((SECONDS - start)) s; $log)")
        failed=$((failed + 1))
    fi
}

kernels_built() {
    "$PY" -c 'import sys, commlib._build_info as b; print("DEVICE_KERNELS =", b.DEVICE_KERNELS, "|", b.DEVICE_KERNELS_NOTE); sys.exit(0 if b.DEVICE_KERNELS else 1)'
}

{
    echo "=== environment"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi failed"
    echo "nvcc: $(command -v nvcc || echo none)"
    "$PY" -c 'import cupy; print("cupy", cupy.__version__)' || true
    "$PY" -m commlib info || true
} 2>&1 | tee "$OUT/environment.log"

if ! kernels_built >/dev/null 2>&1 && [ -f .device/device_kernels.fatbin ]; then
    step "rebuild with the carried kernels (.device/device_kernels.fatbin)" "$OUT/rebuild.log" \
        env COMMLIB_DEVICE_FATBIN="$PWD/.device/device_kernels.fatbin" \
        "$PY" -m pip install -q --no-deps --no-build-isolation -e .
fi
step "device kernels in the build" "$OUT/kernels.log" kernels_built

step "pytest tests/test_device_pack.py" "$OUT/test_device_pack.log" \
    timeout 420 "$PY" -m pytest -q -rs tests/test_device_pack.py --junitxml="$OUT/test_device_pack.xml"

step "pytest tests/test_kernels_nvrtc.py" "$OUT/test_kernels_nvrtc.log" \
    timeout 420 "$PY" -m pytest -q -rs tests/test_kernels_nvrtc.py --junitxml="$OUT/test_kernels_nvrtc.xml"

# shellcheck disable=SC2086 # BENCH_ARGS is a list of options
step "commlib bench pack --device" "$OUT/bench_device_pack.log" \
    "$PY" -m commlib bench pack --device --timeout 480 --json "$OUT/device_pack.json" \
    --csv "$OUT/device_pack.csv" ${BENCH_ARGS:-}

echo
echo "=== summary"
grep -h -E "^(DEVICE_KERNELS|device_pack_c:)" "$OUT/kernels.log" "$OUT/test_device_pack.log" 2>/dev/null
tail -n 1 "$OUT/test_device_pack.log" 2>/dev/null
grep -h -E "device pack kernels loaded|^SKIPPED" "$OUT/test_kernels_nvrtc.log" 2>/dev/null
tail -n 1 "$OUT/test_kernels_nvrtc.log" 2>/dev/null
grep -h -E "^(4 MiB|blocks 1-8|1 KiB:|goal |not packed|[0-9]+ shape|note:|device:)" "$OUT/bench_device_pack.log" 2>/dev/null
printf '%s\n' "${summary[@]}"
echo "results in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
[ "$failed" -eq 0 ]
