#!/usr/bin/env bash
# One call on the lent GPU machine, after `bash .device/setup.sh` (README, Benchmarks):
# the device pack checks and benchmark (run_all.sh), the staged point-to-point,
# collective, progress, method and halo tests on device buffers, `commlib measure` (the
# method model of this machine) and the overlap benchmark.
# Logs are packed into
# $OUT/logs.tgz (the device tool returns at most 8 files); summaries print last.
set -uo pipefail
cd "$(dirname "$0")/../.."
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export PYTHONUNBUFFERED=1
results="${OUT:-/tmp/gpu-results}"
logs=/tmp/gpu-logs
mkdir -p "$results" "$logs"
python3 -m commlib info 2>&1 | tee "$logs/info.log"
family=$(python3 -c 'from commlib import native; print(native.build_info()["mpi_family"])')
# mpi4py must load the MPI commlib was built for
[ "$family" = "Open MPI" ] && export MPI4PY_LIBMPI=libmpi.so.40
OUT="$logs" bash tests/gpu/run_all.sh > "$logs/run_all.out" 2>&1
run_all=$?
# the method model first: the staged tests then run with this machine's measured choices
timeout 300 python3 -m commlib measure > "$logs/measure.log" 2>&1
cp ~/.cache/commlib/model-*.txt "$logs/" 2>/dev/null
python3 -m commlib info > "$logs/info-after-measure.log" 2>&1
timeout 400 python3 -m pytest -q -rs tests/test_p2p_device.py tests/test_methods.py tests/test_p2p.py tests/test_collectives.py \
    tests/test_progress.py tests/test_large_count.py tests/test_requests.py tests/test_halo.py ${EXTRA_TESTS:-} > "$logs/staged.log" 2>&1
staged=$?
timeout 200 python3 -m commlib bench overlap --json "$logs/overlap.json" > "$logs/overlap.log" 2>&1
# MPICH's own progress thread, as a reference for the T column (hydra passes the environment on)
[ "$family" = "MPICH" ] && MPIR_CVAR_ASYNC_PROGRESS=1 timeout 100 python3 -m commlib bench overlap --configs mpi \
    --host-only > "$logs/overlap_mpich_async.log" 2>&1
# the memory floor of tiny strided blocks (README, GPU section)
nvcc -O3 -arch=sm_90 -o /tmp/line_floor tests/gpu/line_floor.cu && timeout 60 /tmp/line_floor > "$logs/line_floor.log" 2>&1
tar czf "$results/logs.tgz" -C "$logs" .
echo "=== run_all (exit $run_all)"; sed -n '/=== summary/,$p' "$logs/run_all.out"
echo "=== bench"; grep -E "^\S.*\|" "$logs/bench_device_pack.log" 2>/dev/null | head -80
echo "=== overlap"; tail -n 40 "$logs/overlap.log"
echo "=== MPICH async progress alone"; tail -n 22 "$logs/overlap_mpich_async.log" 2>/dev/null
echo "=== line floor"; grep -E "sequential|\| (plain|cs   ) \| [18] \| +(64|128|512) " "$logs/line_floor.log" | head -20
echo "=== measure"; tail -n 30 "$logs/measure.log"; sed -n '/CUDA-aware/,/knobs/p' "$logs/info-after-measure.log"
echo "=== staged, progress, halo tests (exit $staged)"; tail -n 25 "$logs/staged.log"
