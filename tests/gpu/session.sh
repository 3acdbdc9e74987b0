#!/usr/bin/env bash
# The GPU machine's checks, after `bash .device/setup.sh` (README, Benchmarks).  Stages,
# all by default, or a list in STAGES (one device call runs at most 10 minutes, so a
# whole session takes two or three calls, e.g. STAGES="pack floor", then "measure staged",
# then "overlap halo"):
#   pack     device pack tests and `commlib bench pack --device` (run_all.sh)
#   hostpack issue 8: `commlib bench pack --quick` (host MPI_Pack vs the host MPI's), then the x faces and
#            1 KiB vectors with the full rounds (HOSTPACK_FULL: other filters)
#   hostknobs issue 8: the host-pack choices that `auto` makes differently on AMD (COMMLIB_TAIL_FIRST,
#            COMMLIB_AVX512, COMMLIB_ROW_PROBE, COMMLIB_GAP_MEMCPY on, COMMLIB_UNPACK_PREFETCH off) all
#            Intel's way, then all AMD's, on this host's CPU: `commlib bench pack --quick --repeat 3` each
#            (HOSTKNOBS_BENCH: other options; on the H200 host's Xeon one --quick pass takes ~60 s, while
#            `--repeat 3 --rounds 11 --target-ms 30` outran the stage's 280 s), then the shapes whose ratio moved by 5 % or more;
#            HOSTKNOBS_EACH=1: instead, each choice alone flipped from this CPU's `auto` (and `auto` itself), alternating,
#            2 rounds, on the shapes of HOSTKNOBS_FILTERS (default "vec_4MiB_b8_s16 halo256_q1_r1_"), per-shape medians
#   hostcompare issue 8: `commlib bench pack --compare` on this host's CPU: the settings of COMPARE (space-separated,
#            each VAR=VALUE[,VAR=VALUE]; default the unpack probe off and on) over the shapes of COMPARE_FILTER
#            (default _x_unpack), COMPARE_REPEAT runs each (default 3), alternated, --rounds 11
#   xbatch   issue 8: the x faces' row kernels four ways on this host's CPU (tests/gpu/x_batch_variants.sh:
#            unrolled 16 / 8 / 1 blocks an iteration, alternating; XBATCH_REPS, default "1 2")
#   floor    the memory floor of tiny strided blocks (tests/gpu/line_floor.cu)
#   measure  `commlib measure`: this machine's method model, used by the stages after it
#   staged   staged point-to-point, methods, requests, collectives, progress, NVRTC, halo tests
#   overlap  `commlib bench overlap`, and MPICH's own progress thread as a reference
#   halo     `commlib bench halo` (ranks share a GPU through MPS); HALO_RANKS=4,8: those rank counts too;
#            HALO_R1=1: radius 1 with one quantity too; HALO_ARGS: more options for each (e.g. "--repeat 3");
#            the knobs in the environment apply (e.g. COMMLIB_DEVICE_PACK_HOLD=1, as the README's tables)
#   ipc      issue 12, GPU to GPU (COMMLIB_IPC=1): tests/test_ipc.py on the GPU (2, 4, 8 ranks),
#            300 random datatype trees device to device against the host MPI (tests/ipc_typegen.py; again
#            received by MPI_Irecv + MPI_Wait: the batched unpack),
#            halo3d in C and Python verified through it at 2, 4 and 8 ranks (pack and direct),
#            `commlib bench p2p` at 64 KiB-4 MiB with windows of 64 and 4, and 1-16 MiB with the
#            progress thread (direct messages) (ranks share the GPU via MPS); IPC_NO_BENCH=1: no bench
#   pipeline issue 12 item 3, pipelined staging (COMMLIB_PIPELINE=1): tests/test_pipeline.py on the
#            GPU (2 and 4 ranks), `commlib bench p2p --pipeline` at 1-64 MiB (staged whole vs in
#            chunks, window 4), with the method model `measure` wrote when it ran first;
#            PIPELINE_CHUNKS_KB="512 2048": also one message at a time in chunks of the model and of these;
#            PIPELINE_NO_BENCH=1: the tests only
#   costs    what one driver call costs the host (tests/gpu/driver_costs.cu, with and without MPS), whether the
#            CPU can map device memory here (tests/gpu/cpu_map_probe.cu), packs held back and flushed at the
#            program's next CUDA call by a CUPTI callback (tests/gpu/cupti_flush_probe.cu), the
#            8-byte copies and the resident polling kernel of tests/gpu/proxy_latency.cu (MPS), and
#            halo3d at 32^3 and 64^3 GPU to GPU with messages from 192 B against from 1 KiB
#            (COMMLIB_TEST_IPC_MIN_BYTES=1024, the threshold before), interleaved, 3 runs each
#   batch    issue 12, one unpack launch per completion call (COMMLIB_BATCH_UNPACK): halo3d GPU to GPU
#            at 32^3, 64^3, 128^3 (2 ranks, direct and pack, 50 exchanges) with the knob 0 and 1 and in
#            host memory, interleaved, 3 runs each; then `commlib bench halo` (BATCH_NO_BENCH=1: not)
#   direct   issue 12, small direct messages (COMMLIB_PROGRESS=thread COMMLIB_IPC_DIRECT_BYTES=192): random trees
#            sent by MPI_Isend device to device, read from the sender's buffer; halo3d verified through it at
#            2, 4 and 8 ranks; halo3d at 32^3-128^3 (2 ranks, 50 exchanges) arena vs direct vs host memory,
#            interleaved, 3 runs each
#   burst    issue 12, one pack launch per burst of device sends (COMMLIB_IPC_BURST_US): tests/test_ipc.py on
#            the GPU, random trees by MPI_Isend (with and without the progress thread), halo3d verified at 2, 4, 8
#            ranks; halo3d bursts / one launch each (both also with the progress thread) / host memory, interleaved,
#            3 runs each (2 ranks at BURST_SIZES, default 32 64 128; 8 ranks at BURST_SIZES_8, default 32, empty: none)
#   phases   issue 12, where a device exchange's time goes: halo3d --phases (posting, packs and sends, Waitall,
#            unpacks, and the device synchronisation after it) GPU to GPU (COMMLIB_IPC=1), with held packs, in
#            host memory and staged whole, interleaved, 3 runs each (2 ranks at PHASES_SIZES, default 32 64;
#            PHASES_ARGS: halo3d options, default none, e.g. "--radius 1 --quantities 1"; the GPU machine has no nsys)
#   acks     issue 12, a completion call's acknowledgements as one message per sender (stop 36): halo3d GPU to GPU
#            with them and one message each (COMMLIB_TEST_ACK_EACH=1), also held, and in host memory, interleaved,
#            3 runs each (2 ranks at ACKS_SIZES, default 32 64; 8 ranks at ACKS_SIZES_8, default 32)
#   kept     issue 12, device pointers kept while CUPTI watches (cuda/pointer_cache.h, stop 37): halo3d GPU to
#            GPU with held packs, the driver asked at every call (COMMLIB_POINTER_CACHE=0) and kept, and in host
#            memory, interleaved, --phases, 3 runs each (2 ranks at KEPT_SIZES, default 32 64; 8 ranks at
#            KEPT_SIZES_8, default 32)
#   context  issue 12, the current context kept while CUPTI watches (cuda/pointer_cache.h, stop 39): halo3d
#            GPU to GPU with held packs, every context made current again (COMMLIB_TEST_CONTEXT_EACH=1) and
#            kept, and in host memory, interleaved, --phases, 3 runs each (2 ranks at CONTEXT_SIZES, default
#            32 64; 8 ranks at CONTEXT_SIZES_8, default 32)
#   onepass  issue 12, strided direct messages in one pass (device_copy_piece): the GPU time of the passes
#            (tests/gpu/strided_passes.cu at ONEPASS_PASSES_MIB, default 1 4 16), random trees by MPI_Isend
#            direct from 192 B, `commlib bench p2p --layouts strided` direct from 1 MiB with one pass and with
#            two (COMMLIB_TEST_TWO_PASS=1), alternating, 2 rounds (ONEPASS_SIZES, default 1M,4M,16M); the same
#            for contiguous messages, the completion call's batched kernel against the copy engine
#            (COMMLIB_TEST_DENSE_COPY_ENGINE=1); ONEPASS_PASSES_MIB="" ONEPASS_TYPEGEN=0 ONEPASS_STRIDED=0: skip parts
#   rounds   issue 12, a Waitall's large device receives copied as they arrive (COMMLIB_EARLY_LAUNCH_BYTES,
#            interpose/request.c): tests/test_ipc.py -k rounds on the GPU; `commlib bench p2p` with the progress
#            thread (ROUNDS_SIZES, default 1M,4M,16M, both layouts) by default and with the knob 0, alternating,
#            2 rounds; ROUNDS_HALO=1: then `COMMLIB_DEVICE_PACK_HOLD=1 commlib bench halo --sizes 128,192` the
#            same two ways (192^3: faces of 1.77 MB, over the 1 MiB a receive needs for rounds; 128^3: 786 KB, none)
#   trace    issue 12, where a message's time goes in `bench p2p`'s window: bench_p2p -i (the device-ipc run
#            alone, 4 MiB, TRACE_LAYOUTS default "strided contiguous", the progress thread) with
#            tests/gpu/kernel_trace.c preloaded (CUPTI's activity records: every kernel's start and end, every
#            driver call), the knob COMMLIB_EARLY_LAUNCH_BYTES at its default and 0, each beside an untraced run;
#            tests/gpu/kernel_trace.py summarises; the raw traces come back in $OUT/trace.tgz
#   thread   what the progress thread costs a halo exchange: halo3d GPU to GPU and in host memory, with and
#            without COMMLIB_PROGRESS=thread, interleaved, 3 runs each (2 ranks at THREAD_SIZES, default 32 64);
#            THREAD_INTERVALS="20 100": also with the thread pausing that many us between polls;
#            THREAD_BUSY="0 300": also with COMMLIB_PROGRESS_BUSY_US at those values (0: stop 23's thread)
#   async    issue 12, stream-ordered MPI_Pack/MPI_Unpack (COMMLIB_DEVICE_PACK_ASYNC=1): halo3d in C and Python
#            verified in pack mode with it at 2, 4 and 8 ranks GPU to GPU (also with the progress thread, and
#            staged at 2), the device pack tests with it; halo3d GPU to GPU with and without it and in host
#            memory, interleaved, 3 runs each (2 ranks at ASYNC_SIZES, default 32 64 128; 8 ranks at
#            ASYNC_SIZES_8, default 32)
#   hold     issue 12, held MPI_Pack/MPI_Unpack launched together (COMMLIB_DEVICE_PACK_HOLD=1, CUPTI): random
#            sequences of overlapping device packs and unpacks with the program's copies between them against the
#            host MPI (tests/c/hold_sequence.c, the real CUPTI); halo3d in C and Python verified in pack mode with it
#            at 2, 4, 8 ranks GPU to GPU (2 and 8 also with the progress thread, 2 staged); the device pack tests
#            with it; halo3d GPU to GPU async / hold and in host memory, interleaved, 3 runs each (2 ranks at
#            HOLD_SIZES, default 32 64; 8 ranks at HOLD_SIZES_8, default 32); HOLD_VERIFY=0: timing only
#   waits    issue 12, stop 29's cuts of driver calls (one cuStreamWaitValue64 per sender and burst, one pointer
#            query per device buffer): halo3d GPU to GPU with them and with the measuring hooks that bring back
#            stop 28's calls (COMMLIB_TEST_WAIT_EACH=1 COMMLIB_TEST_CONTEXT_QUERY=1), also held (COMMLIB_DEVICE_PACK_HOLD=1),
#            and in host memory, interleaved, 3 runs each (2 ranks at WAITS_SIZES, default 32 64; 8 ranks at
#            WAITS_SIZES_8, default 32)
#   small    issue 12, small messages GPU to GPU (COMMLIB_IPC_SMALL=1, the default with COMMLIB_IPC=1 since stop 36;
#            the A/B's staged variants set it to 0): tests/c/ipc_small.c on the GPU (2, 4, 8
#            ranks), 300 random trees of one element each (most under 192 B) device to device, halo3d in C and
#            Python verified with it (pack held at 2, 4, 8 ranks, with the progress thread at 2 and 8; direct at
#            2 and 8); halo3d (radius 1, one quantity: 8-byte corners) GPU to GPU with and without it (also held) and in host memory, interleaved, 3 runs
#            each (2 ranks at SMALL_SIZES, default 32 64; 8 ranks at SMALL_SIZES_8, default 32, empty: none);
#            SMALL_BENCH=1: then `commlib bench halo --sizes 32,64,128,192` with it and the hold
#   engine   the collective engine's GPU tests (MPIComm with torch CUDA and cupy, the engine on
#            device buffers, staged receives, partitioned point-to-point) and the example
#   torch    the torch.distributed backend on CUDA tensors (test_torch_training, test_torch_backend:
#            DDP, FSDP2, every op) and `commlib bench ddp` (CPU and CUDA: commlib vs gloo vs NCCL)
#   diloco   issue 11: examples/diloco_train.py on CUDA through a SIGKILL and a joiner (3 peers
#            share the GPU), then `commlib bench diloco` with CPU peers (4 peers x 2 threads)
#   bench9   `commlib bench allreduce` engine columns, `overlap` (all-reduce rows), `pipeline`
#            (CPU ranks and torch CUDA): issue 9's figures; BENCH9_QUICK=1 for a short run
# Logs are packed into $OUT/logs.tgz (the device tool returns at most 8 files);
# summaries print last.
set -uo pipefail
cd "$(dirname "$0")/../.."
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export PYTHONUNBUFFERED=1
STAGES="${STAGES:-pack floor measure staged overlap halo}"
results="${OUT:-/tmp/gpu-results}"
logs=/tmp/gpu-logs
mkdir -p "$results" "$logs"
want() { [[ " $STAGES " == *" $1 "* ]]; }
# A/B timing: halo3d on 2 ranks (HALO_AB_RANKS), 50 exchanges (and HALO_AB_ARGS), at each size of $1 in both modes, 3 rounds of
# every variant in turn ("label:VAR=value ...", or "label:host [VAR=value ...]" for host memory, "label:stage ..."
# for the grid staged whole through host memory), one line each.
halo_ab() {
    local sizes=$1 halo_c n mode round variant label vars device
    shift
    halo_c=$(python3 -m commlib example halo3d)
    for n in $sizes; do
        for mode in direct pack; do
            for round in 1 2 3; do
                for variant in "$@"; do
                    label=${variant%%:*} vars=${variant#*:} device=--device
                    [ "${vars%% *}" = host ] && vars=${vars#host} device=
                    [ "${vars%% *}" = stage ] && vars=${vars#stage} device=--stage-host
                    env $vars timeout 60 python3 -m commlib run -n "${HALO_AB_RANKS:-2}" "$halo_c" --n $n $device \
                        --mode $mode --iters 50 ${HALO_AB_ARGS:-} > "$logs/halo_ab.log" 2>&1
                    echo "halo3d -n ${HALO_AB_RANKS:-2} $n^3 ${HALO_AB_ARGS:+($HALO_AB_ARGS) }$mode $label: $(grep -o 'time/exchange=[0-9.]* us verified=[A-Z]*' "$logs/halo_ab.log")" \
                        "$(grep -o 'post-recv=.*' "$logs/halo_ab.log")"
                done
            done
        done
    done
}
# halo3d in C and Python verified in pack mode with a knob ($2, labelled $1) at 2, 4 and 8 ranks GPU to GPU,
# with the progress thread at 2 and 8, staged at 2; prints rank 0's counter matching $3.
halo_pack_verify() {
    local label=$1 knob=$2 counter=$3 halo_c variant n vars prog
    halo_c=$(python3 -m commlib example halo3d)
    for variant in "2:COMMLIB_IPC=1" "4:COMMLIB_IPC=1" "8:COMMLIB_IPC=1" "2:COMMLIB_IPC=1 COMMLIB_PROGRESS=thread" \
                   "8:COMMLIB_IPC=1 COMMLIB_PROGRESS=thread" "2:COMMLIB_IPC=0"; do
        n=${variant%%:*} vars=${variant#*:}
        for prog in "$halo_c" "python3 examples/halo3d.py"; do
            env $vars $knob COMMLIB_STATS=1 timeout 60 python3 -m commlib run -n $n $prog --n 48 --device --mode pack \
                > "$logs/${label}_halo.log" 2>&1
            echo "halo3d ${prog##*/} -n $n pack, $label, $vars: exit $? $(grep -o 'verified=[A-Z]*' "$logs/${label}_halo.log" | head -1)" \
                "rank 0 $(grep -o "$counter" "$logs/${label}_halo.log" | head -1)"
        done
    done
}
python3 -m commlib info > "$logs/info.log" 2>&1
family=$(python3 -c 'from commlib import native; print(native.build_info()["mpi_family"])')
# mpi4py must load the MPI commlib was built for
[ "$family" = "Open MPI" ] && export MPI4PY_LIBMPI=libmpi.so.40
nvidia-smi --query-gpu=name --format=csv,noheader > "$logs/gpus.log" 2>&1

if want pack; then
    OUT="$logs" bash tests/gpu/run_all.sh > "$logs/run_all.out" 2>&1
    echo "=== pack: run_all exit $?"; sed -n '/=== summary/,$p' "$logs/run_all.out"
    grep -E "^\S.*\|" "$logs/bench_device_pack.log" 2>/dev/null | grep -E "_(1KiB|4MiB)_b(1|8|32|512)_c1 " | head -30
fi
if want hostpack; then # issue 8 on this host's CPU: host MPI_Pack through commlib against the host MPI's own
    timeout 200 python3 -m commlib bench pack --quick --json "$logs/hostpack.json" > "$logs/hostpack.log" 2>&1
    echo "=== host pack, quick (exit $?)"; tail -n 6 "$logs/hostpack.log"
    for filter in ${HOSTPACK_FULL-_x_ vec_1KiB}; do # the slowest shapes again, with the full rounds (31, 60 ms)
        full="$logs/hostpack_full_${filter//[^A-Za-z0-9]/_}.log"
        timeout 300 python3 -m commlib bench pack --filter "$filter" > "$full" 2>&1
        echo "=== host pack, full rounds, shapes with '$filter' (exit $?)"; tail -n 6 "$full"
    done
fi
if want hostknobs && [ "${HOSTKNOBS_EACH:-0}" = 1 ]; then # issue 8: which choice moves which shape on this CPU
    amd=$(python3 -c 'print(int("AuthenticAMD" in open("/proc/cpuinfo").read()))')
    # each knob set the other way from what auto picks on this CPU (AMD: the first four on, the prefetch off)
    knobs=(auto "COMMLIB_TAIL_FIRST=$((1 - amd))" "COMMLIB_AVX512=$((1 - amd))" "COMMLIB_ROW_PROBE=$((1 - amd))"
           "COMMLIB_GAP_MEMCPY=$((1 - amd))" "COMMLIB_UNPACK_PREFETCH=$amd")
    for round in 1 2; do
        for filter in ${HOSTKNOBS_FILTERS:-vec_4MiB_b8_s16 halo256_q1_r1_}; do
            for k in "${!knobs[@]}"; do
                [ "${knobs[$k]}" = auto ] && vars= || vars=${knobs[$k]}
                env $vars timeout 120 python3 -m commlib bench pack --quick --filter "$filter" \
                    --json "$logs/knob_${k}_${filter}_$round.json" > "$logs/knob.log" 2>&1 || echo "knob ${knobs[$k]} $filter: exit $?"
            done
        done
    done
    python3 - "$logs" "${knobs[@]}" <<'PY'
import collections, glob, json, statistics, sys
logs, knobs = sys.argv[1], sys.argv[2:]
runs = collections.defaultdict(lambda: collections.defaultdict(list))
for path in glob.glob(logs + "/knob_*.json"):
    k = int(path.rsplit("/", 1)[1].split("_")[1])
    for shape in json.load(open(path))["shapes"]:
        runs[shape["name"]][k].append(shape["speedup"])
print("=== host pack, each choice alone flipped from auto (speedup vs the host MPI, median of 2 rounds)")
print(f"  {'shape':34s}" + "".join(f" {knob.split('=')[0].replace('COMMLIB_', ''):>13s}" for knob in knobs))
for name in sorted(runs):
    print(f"  {name:34s}" + "".join(f" {statistics.median(runs[name][k]):13.2f}" if runs[name][k] else " " * 14
                                    for k in range(len(knobs))))
PY
elif want hostknobs; then # issue 8: are the AMD-only choices (stops 29-33) right on this CPU too?
    for setting in off on; do
        [ $setting = off ] && value=0 || value=1
        env COMMLIB_TAIL_FIRST=$value COMMLIB_AVX512=$value COMMLIB_ROW_PROBE=$value COMMLIB_GAP_MEMCPY=$value \
            COMMLIB_UNPACK_PREFETCH=$((1 - value)) timeout 280 python3 -m commlib bench \
            pack ${HOSTKNOBS_BENCH:---quick --repeat 3} --json "$logs/hostknobs_$setting.json" \
            > "$logs/hostknobs_$setting.log" 2>&1
        echo "=== host pack, AMD's choices $setting (exit $?)"; grep -E "^geomean|halo faces:|slower than" "$logs/hostknobs_$setting.log"
    done
    python3 - "$logs/hostknobs_off.json" "$logs/hostknobs_on.json" <<'PY'
import json, sys
off, on = ({s["name"]: s["speedup"] for s in json.load(open(path))["shapes"]} for path in sys.argv[1:])
moved = sorted((on[n] / off[n], n) for n in on if n in off and abs(on[n] / off[n] - 1) >= 0.05)
print(f"=== host pack, shapes moved >= 5 % by the AMD choices ({len(moved)}): on/off, off -> on")
for ratio, name in moved:
    print(f"  {name:34s} {ratio:5.2f}  {off[name]:.2f}x -> {on[name]:.2f}x")
PY
fi
if want hostcompare; then # issue 8: is a CPU choice's auto right on this host?
    args=()
    for setting in ${COMPARE:-COMMLIB_UNPACK_PROBE=0 COMMLIB_UNPACK_PROBE=1}; do args+=(--compare "$setting"); done
    timeout 540 python3 -m commlib bench pack --filter "${COMPARE_FILTER:-_x_unpack}" --rounds 11 \
        --repeat "${COMPARE_REPEAT:-3}" "${args[@]}" --json "$results/hostcompare.json" > "$logs/hostcompare.log" 2>&1
    echo "=== host pack, --compare ${COMPARE:-COMMLIB_UNPACK_PROBE=0 COMMLIB_UNPACK_PROBE=1} (exit $?)"
    cat "$logs/hostcompare.log"
fi
if want xbatch; then
    REPS="${XBATCH_REPS:-1 2}" OUT="$logs/xbatch" timeout 400 bash tests/gpu/x_batch_variants.sh > "$logs/xbatch.log" 2>&1
    echo "=== x-face row kernels (exit $?)"; cat "$logs/xbatch.log"
    python3 - "$logs/xbatch" <<'PY'
import collections, glob, json, math, statistics, sys
runs = collections.defaultdict(lambda: collections.defaultdict(list))
for path in glob.glob(sys.argv[1] + "/x_*_*.json"):
    variant = path.rsplit("/", 1)[1].split("_")[1]
    for shape in json.load(open(path))["shapes"]:
        runs[shape["name"], shape["block_bytes"]][variant].append(shape["speedup"])
groups = collections.defaultdict(lambda: collections.defaultdict(list))  # per block size, direction and cache
for (name, block), by_variant in runs.items():
    if name.startswith("halo"):
        group = f"{block:2d} B " + ("pack" if "_pack_" in name else "unpack") + ("_cold" if name.endswith("cold") else "_warm")
        for variant, values in by_variant.items():
            groups[group][variant].append(statistics.median(values))
for group, by_variant in sorted(groups.items()):
    print(f"  {group:17s}", "  ".join(f"{v} {math.exp(sum(map(math.log, x)) / len(x)):.3f} (min {min(x):.2f})"
                                      for v, x in sorted(by_variant.items())))
PY
fi
if want floor; then
    nvcc -O3 -arch=sm_90 -o /tmp/line_floor tests/gpu/line_floor.cu && timeout 90 /tmp/line_floor > "$logs/line_floor.log" 2>&1
    echo "=== floor"; grep -E "sequential|\| (plain|cs   ) \| [18] \| +(64|128|512) " "$logs/line_floor.log" | head -20
fi
if want measure; then
    timeout 300 python3 -m commlib measure > "$logs/measure.log" 2>&1
    cp ~/.cache/commlib/model-*.txt "$logs/" 2>/dev/null
    python3 -m commlib info > "$logs/info-after-measure.log" 2>&1
    echo "=== measure"; tail -n 30 "$logs/measure.log"; sed -n '/CUDA-aware/,/knobs/p' "$logs/info-after-measure.log"
fi
if want staged; then
    timeout 420 python3 -m pytest -q -rs tests/test_p2p_device.py tests/test_methods.py tests/test_requests.py \
        tests/test_p2p.py tests/test_collectives.py tests/test_progress.py tests/test_large_count.py \
        tests/test_halo.py ${EXTRA_TESTS:-} > "$logs/staged.log" 2>&1
    echo "=== staged, methods, requests, progress, halo tests (exit $?)"; tail -n 25 "$logs/staged.log"
fi
if want overlap; then
    timeout 200 python3 -m commlib bench overlap --json "$logs/overlap.json" > "$logs/overlap.log" 2>&1
    echo "=== overlap"; tail -n 40 "$logs/overlap.log"
    if [ "$family" = "MPICH" ]; then # hydra passes the environment on to the ranks
        MPIR_CVAR_ASYNC_PROGRESS=1 timeout 100 python3 -m commlib bench overlap --configs mpi --host-only \
            > "$logs/overlap_mpich_async.log" 2>&1
        echo "=== overlap, MPICH's own progress thread (MPIR_CVAR_ASYNC_PROGRESS=1) in column A"
        tail -n 22 "$logs/overlap_mpich_async.log"
    fi
fi
if want halo; then
    nvidia-cuda-mps-control -d > /dev/null 2>&1
    # HALO_ARGS: more options for every run here, e.g. "--repeat 3" or "--iters 100 --warmup 10"
    timeout 300 python3 -m commlib bench halo --sizes 32,64,128,192 ${HALO_ARGS:-} --json "$logs/halo.json" \
        > "$logs/halo.log" 2>&1
    echo "=== halo (exit $?)"; tail -n 30 "$logs/halo.log"
    if [ -n "${HALO_RANKS:-}" ]; then # more ranks sharing the GPU, e.g. HALO_RANKS=4,8
        timeout 300 python3 -m commlib bench halo -n "$HALO_RANKS" --sizes 32,64,128 --repeat 1 ${HALO_ARGS:-} \
            --json "$logs/halo_ranks.json" > "$logs/halo_ranks.log" 2>&1
        echo "=== halo -n $HALO_RANKS (exit $?)"; tail -n 30 "$logs/halo_ranks.log"
    fi
    if [ -n "${HALO_R1:-}" ]; then # HALO_R1=1: also radius 1, one quantity (8-byte corners)
        timeout 300 python3 -m commlib bench halo --radius 1 --quantities 1 --sizes 32,64,128,192 ${HALO_ARGS:-} \
            --json "$logs/halo_r1.json" > "$logs/halo_r1.log" 2>&1
        echo "=== halo --radius 1 --quantities 1 (exit $?)"; tail -n 30 "$logs/halo_r1.log"
    fi
    echo quit | nvidia-cuda-mps-control > /dev/null 2>&1
fi
if want ipc; then
    nvidia-cuda-mps-control -d > /dev/null 2>&1
    timeout 200 python3 -m pytest -q -rs tests/test_ipc.py -k gpu > "$logs/ipc_tests.log" 2>&1
    echo "=== GPU-to-GPU tests (exit $?)"; tail -n 5 "$logs/ipc_tests.log"
    COMMLIB_IPC=1 COMMLIB_STATS=1 timeout 120 python3 -m commlib run -n 2 python3 tests/ipc_typegen.py 4 300 \
        > "$logs/ipc_typegen.log" 2>&1
    echo "random trees device to device (exit $?): $(grep -o 'ipc_typegen: seed.*' "$logs/ipc_typegen.log")" \
        "$(grep -c MISMATCH "$logs/ipc_typegen.log") mismatch line(s)"
    TYPEGEN_IRECV=1 COMMLIB_IPC=1 COMMLIB_STATS=1 timeout 120 python3 -m commlib run -n 2 python3 tests/ipc_typegen.py 5 300 \
        > "$logs/ipc_typegen_irecv.log" 2>&1
    echo "random trees, MPI_Irecv + MPI_Wait (batched unpacks) (exit $?):" \
        "$(grep -o 'ipc_typegen: seed.*' "$logs/ipc_typegen_irecv.log")" \
        "$(grep -c MISMATCH "$logs/ipc_typegen_irecv.log") mismatch line(s)," \
        "rank 1 $(grep -o 'unpacks batched=[0-9]* in launches=[0-9]*' "$logs/ipc_typegen_irecv.log" | tail -1)"
    halo_c=$(python3 -m commlib example halo3d)
    for n in 2 4 8; do
        for mode in pack direct; do
            for prog in "$halo_c" "python3 examples/halo3d.py"; do
                COMMLIB_IPC=1 COMMLIB_STATS=1 timeout 60 python3 -m commlib run -n $n $prog --n 48 --device --mode $mode \
                    > "$logs/ipc_halo.log" 2>&1
                echo "halo3d ${prog##*/} -n $n --mode $mode: exit $? $(grep -o 'verified=[A-Z]*' "$logs/ipc_halo.log" | head -1)" \
                    "rank 0 $(grep -o 'gpu-to-gpu send=[0-9]* recv=[0-9]* fallback=[0-9]*' "$logs/ipc_halo.log" | head -1)"
            done
        done
    done
    [ -n "${IPC_NO_BENCH:-}" ] && windows="" || windows="64 4"
    for w in $windows; do
        timeout 200 python3 -m commlib bench p2p --sizes 64K,1M,4M --layouts contiguous --window $w --target-ms 50 \
            > "$logs/ipc_p2p_w$w.log" 2>&1
        echo "=== bench p2p, window $w (exit $?)"; tail -n 25 "$logs/ipc_p2p_w$w.log"
    done
    # direct messages (>= 1 MiB contiguous, read from the sender's buffer) need the progress thread
    if [ -z "${IPC_NO_BENCH:-}" ]; then
        COMMLIB_PROGRESS=thread COMMLIB_STATS=1 timeout 200 python3 -m commlib bench p2p --sizes 1M,4M,16M \
            --layouts contiguous --target-ms 50 > "$logs/ipc_p2p_direct.log" 2>&1
        echo "=== bench p2p with the progress thread: direct (exit $?)"; tail -n 25 "$logs/ipc_p2p_direct.log"
    fi
    echo quit | nvidia-cuda-mps-control > /dev/null 2>&1
fi
if want pipeline; then
    nvidia-cuda-mps-control -d > /dev/null 2>&1
    timeout 200 python3 -m pytest -q -rs tests/test_pipeline.py -k gpu > "$logs/pipeline_tests.log" 2>&1
    echo "=== pipelined staging tests (exit $?)"; tail -n 5 "$logs/pipeline_tests.log"
    if [ -z "${PIPELINE_NO_BENCH:-}" ]; then
        timeout 300 python3 -m commlib bench p2p --sizes 1M,4M,16M,64M --window 4 --target-ms 50 --no-ipc --pipeline \
            > "$logs/pipeline_p2p.log" 2>&1
        echo "=== bench p2p --pipeline (exit $?)"; tail -n 25 "$logs/pipeline_p2p.log"
    fi
    # the chunk size against the model's, one message at a time (e.g. PIPELINE_CHUNKS_KB="512 2048 8192")
    for kb in ${PIPELINE_CHUNKS_KB:+model $PIPELINE_CHUNKS_KB}; do
        [ "$kb" = model ] && chunk= || chunk=$kb
        COMMLIB_TEST_PIPELINE_CHUNK_KB=$chunk timeout 120 python3 -m commlib bench p2p --sizes 4M,16M,64M \
            --layouts contiguous --window 1 --target-ms 50 --no-ipc --pipeline > "$logs/pipeline_chunk_$kb.log" 2>&1
        echo "=== bench p2p --pipeline --window 1, chunks $kb KiB (exit $?)"
        grep -E "^ *[0-9]+ MiB .*\| +1 \||pipe/device|pipelined" "$logs/pipeline_chunk_$kb.log"
    done
    echo quit | nvidia-cuda-mps-control > /dev/null 2>&1
fi
if want costs; then
    nvcc -O2 -arch=sm_90 -o /tmp/driver_costs tests/gpu/driver_costs.cu -lcuda && timeout 60 /tmp/driver_costs \
        > "$logs/driver_costs.log" 2>&1
    echo "=== driver call costs, no MPS (exit $?)"; cat "$logs/driver_costs.log"
    nvidia-cuda-mps-control -d > /dev/null 2>&1
    timeout 60 /tmp/driver_costs > "$logs/driver_costs_mps.log" 2>&1
    echo "=== driver call costs, MPS (exit $?)"; cat "$logs/driver_costs_mps.log"
    # can the CPU address device memory (GDRCopy's module, dma-buf or VMM fds mapped)? issue 12's latency goal needs it
    nvcc -O2 -o /tmp/cpu_map_probe tests/gpu/cpu_map_probe.cu -lcuda && timeout 60 /tmp/cpu_map_probe \
        > "$logs/cpu_map_probe.log" 2>&1
    echo "=== the CPU mapping device memory (exit $?)"; cat "$logs/cpu_map_probe.log"
    # issue 12's 32^3 pack mode: packs held back and flushed at the program's next CUDA call (CUPTI)
    cuda=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
    nvcc -O2 -arch=sm_90 -o /tmp/cupti_flush_probe tests/gpu/cupti_flush_probe.cu -L"$cuda/lib64" \
        -L"$cuda/extras/CUPTI/lib64" -lcupti -lcuda -Xlinker -rpath,"$cuda/lib64:$cuda/extras/CUPTI/lib64" &&
        timeout 120 /tmp/cupti_flush_probe > "$logs/cupti_flush_probe.log" 2>&1
    echo "=== packs held back and flushed by a CUPTI callback, MPS (exit $?)"; cat "$logs/cupti_flush_probe.log"
    # the floor of a small device message: 8-byte copies and a resident polling kernel (issue 12's latency)
    nvcc -O2 -arch=sm_90 -o /tmp/proxy_latency tests/gpu/proxy_latency.cu -lcuda && timeout 60 /tmp/proxy_latency \
        > "$logs/proxy_latency_mps.log" 2>&1
    echo "=== small copies and a resident kernel, MPS (exit $?)"; cat "$logs/proxy_latency_mps.log"
    halo_ab "32 64" "ipc from 1024 B:COMMLIB_IPC=1 COMMLIB_IPC_SMALL=0 COMMLIB_TEST_IPC_MIN_BYTES=1024" \
        "ipc from 192 B:COMMLIB_IPC=1 COMMLIB_IPC_SMALL=0" "host memory:host"
    timeout 120 python3 -m commlib bench p2p --sizes 8,256,4K,64K --layouts contiguous --window 64 --target-ms 30 \
        > "$logs/costs_p2p.log" 2>&1
    echo "=== bench p2p small (exit $?)"; tail -n 22 "$logs/costs_p2p.log"
    echo quit | nvidia-cuda-mps-control > /dev/null 2>&1
fi
if want batch; then
    nvidia-cuda-mps-control -d > /dev/null 2>&1
    halo_ab "32 64 128" "batch=0:COMMLIB_IPC=1 COMMLIB_BATCH_UNPACK=0" "batch=1:COMMLIB_IPC=1 COMMLIB_BATCH_UNPACK=1" \
        "host memory:host"
    if [ -z "${BATCH_NO_BENCH:-}" ]; then
        timeout 300 python3 -m commlib bench halo --sizes 32,64,128,192 --json "$logs/halo.json" > "$logs/halo.log" 2>&1
        echo "=== halo (exit $?)"; tail -n 30 "$logs/halo.log"
    fi
    echo quit | nvidia-cuda-mps-control > /dev/null 2>&1
fi
if want direct; then
    nvidia-cuda-mps-control -d > /dev/null 2>&1
    direct="COMMLIB_IPC=1 COMMLIB_PROGRESS=thread COMMLIB_IPC_DIRECT_BYTES=192"
    for irecv in 1 0; do
        env $direct TYPEGEN_ISEND=1 TYPEGEN_IRECV=$irecv COMMLIB_STATS=1 timeout 150 python3 -m commlib run -n 2 \
            python3 tests/ipc_typegen.py 7 300 > "$logs/direct_typegen.log" 2>&1
        echo "random trees by MPI_Isend, direct from 192 B, irecv=$irecv (exit $?):" \
            "$(grep -o 'ipc_typegen: seed.*' "$logs/direct_typegen.log") $(grep -c MISMATCH "$logs/direct_typegen.log")" \
            "mismatch line(s), $(grep -o 'gpu-to-gpu send=[0-9]* recv=[0-9]* fallback=[0-9]* direct=[0-9]*' "$logs/direct_typegen.log" | head -1)"
    done
    halo_c=$(python3 -m commlib example halo3d)
    for n in 2 4 8; do
        for mode in pack direct; do
            env $direct COMMLIB_STATS=1 timeout 60 python3 -m commlib run -n $n "$halo_c" --n 48 --device --mode $mode \
                > "$logs/direct_halo.log" 2>&1
            echo "halo3d -n $n --mode $mode direct from 192 B: exit $? $(grep -o 'verified=[A-Z]*' "$logs/direct_halo.log" | head -1)" \
                "rank 0 $(grep -o 'gpu-to-gpu send=[0-9]* recv=[0-9]* fallback=[0-9]* direct=[0-9]*' "$logs/direct_halo.log" | head -1)"
        done
    done
    halo_ab "32 64 128" "arena:COMMLIB_IPC=1" "direct:$direct" "host memory:host"
    echo quit | nvidia-cuda-mps-control > /dev/null 2>&1
fi
if want burst; then
    nvidia-cuda-mps-control -d > /dev/null 2>&1
    timeout 200 python3 -m pytest -q -rs tests/test_ipc.py -k gpu > "$logs/burst_tests.log" 2>&1
    echo "=== GPU-to-GPU tests, with and without the progress thread (exit $?)"; tail -n 3 "$logs/burst_tests.log"
    for progress in none thread; do
        COMMLIB_IPC=1 COMMLIB_PROGRESS=$progress TYPEGEN_ISEND=1 TYPEGEN_IRECV=1 COMMLIB_STATS=1 timeout 150 \
            python3 -m commlib run -n 2 python3 tests/ipc_typegen.py 8 300 > "$logs/burst_typegen.log" 2>&1
        echo "random trees by MPI_Isend, progress $progress (exit $?):" \
            "$(grep -o 'ipc_typegen: seed.*' "$logs/burst_typegen.log") $(grep -c MISMATCH "$logs/burst_typegen.log")" \
            "mismatch line(s), rank 0 $(grep -o 'gpu-to-gpu burst=[0-9]* in launches=[0-9]*' "$logs/burst_typegen.log" | head -1)"
    done
    halo_c=$(python3 -m commlib example halo3d)
    for n in 2 4 8; do
        for mode in direct pack; do
            COMMLIB_IPC=1 COMMLIB_STATS=1 timeout 60 python3 -m commlib run -n $n "$halo_c" --n 48 --device --mode $mode \
                > "$logs/burst_halo.log" 2>&1
            echo "halo3d -n $n --mode $mode bursts: exit $? $(grep -o 'verified=[A-Z]*' "$logs/burst_halo.log" | head -1)" \
                "rank 0 $(grep -o 'gpu-to-gpu burst=[0-9]* in launches=[0-9]*' "$logs/burst_halo.log" | head -1)"
        done
    done
    thread="COMMLIB_IPC=1 COMMLIB_PROGRESS=thread"
    halo_ab "${BURST_SIZES:-32 64 128}" "bursts:COMMLIB_IPC=1" "one launch each:COMMLIB_IPC=1 COMMLIB_IPC_BURST_US=0" \
        "bursts+thread:$thread" "one launch each+thread:$thread COMMLIB_IPC_BURST_US=0" "host memory:host"
    [ -n "${BURST_SIZES_8-32}" ] && HALO_AB_RANKS=8 halo_ab "${BURST_SIZES_8-32}" "bursts:COMMLIB_IPC=1" \
        "one launch each:COMMLIB_IPC=1 COMMLIB_IPC_BURST_US=0" "bursts+thread:$thread" "host memory:host"
    echo quit | nvidia-cuda-mps-control > /dev/null 2>&1
fi
if want async; then
    nvidia-cuda-mps-control -d > /dev/null 2>&1
    halo_pack_verify async COMMLIB_DEVICE_PACK_ASYNC=1 'device packs not waited for=[0-9]*'
    COMMLIB_DEVICE_PACK_ASYNC=1 timeout 200 python3 -m pytest -q -rs tests/test_device_pack.py > "$logs/async_tests.log" 2>&1
    echo "=== device pack tests with COMMLIB_DEVICE_PACK_ASYNC=1 (exit $?)"; tail -n 3 "$logs/async_tests.log"
    halo_ab "${ASYNC_SIZES:-32 64 128}" "ipc:COMMLIB_IPC=1" "ipc+async:COMMLIB_IPC=1 COMMLIB_DEVICE_PACK_ASYNC=1" \
        "host memory:host"
    [ -n "${ASYNC_SIZES_8-32}" ] && HALO_AB_RANKS=8 halo_ab "${ASYNC_SIZES_8-32}" "ipc:COMMLIB_IPC=1" \
        "ipc+async:COMMLIB_IPC=1 COMMLIB_DEVICE_PACK_ASYNC=1" "host memory:host"
    echo quit | nvidia-cuda-mps-control > /dev/null 2>&1
fi
if want hold; then
    nvidia-cuda-mps-control -d > /dev/null 2>&1
    if [ "${HOLD_VERIFY:-1}" = 1 ]; then
        mpicc -O2 -std=gnu11 -o /tmp/hold_sequence tests/c/hold_sequence.c -ldl || echo "hold_sequence: build failed"
        for seed in 1 2; do
            COMMLIB_DEVICE_PACK_HOLD=1 COMMLIB_LOG=info timeout 120 python3 -m commlib run -n 1 /tmp/hold_sequence 300 $seed \
                > "$logs/hold_sequence.log" 2>&1
            echo "held sequences, seed $seed (exit $?): $(grep -o 'hold_sequence: .*' "$logs/hold_sequence.log")" \
                "$(grep -o 'CUPTI: .*\|COMMLIB_DEVICE_PACK_HOLD: .*' "$logs/hold_sequence.log" | head -1)"
        done
        halo_pack_verify hold COMMLIB_DEVICE_PACK_HOLD=1 'device packs held=[^|]*'
        COMMLIB_DEVICE_PACK_HOLD=1 timeout 200 python3 -m pytest -q -rs tests/test_device_pack.py > "$logs/hold_tests.log" 2>&1
        echo "=== device pack tests with COMMLIB_DEVICE_PACK_HOLD=1 (exit $?)"; tail -n 3 "$logs/hold_tests.log"
    fi
    halo_ab "${HOLD_SIZES-32 64}" "ipc+async:COMMLIB_IPC=1 COMMLIB_DEVICE_PACK_ASYNC=1" \
        "ipc+hold:COMMLIB_IPC=1 COMMLIB_DEVICE_PACK_HOLD=1" "host memory:host"
    [ -n "${HOLD_SIZES_8-32}" ] && HALO_AB_RANKS=8 halo_ab "${HOLD_SIZES_8-32}" \
        "ipc+async:COMMLIB_IPC=1 COMMLIB_DEVICE_PACK_ASYNC=1" "ipc+hold:COMMLIB_IPC=1 COMMLIB_DEVICE_PACK_HOLD=1" "host memory:host"
    echo quit | nvidia-cuda-mps-control > /dev/null 2>&1
fi
if want waits; then
    nvidia-cuda-mps-control -d > /dev/null 2>&1
    before="COMMLIB_TEST_WAIT_EACH=1 COMMLIB_TEST_CONTEXT_QUERY=1"
    waits_variants=("stop 28 calls:COMMLIB_IPC=1 $before" "now:COMMLIB_IPC=1"
        "hold, stop 28 calls:COMMLIB_IPC=1 COMMLIB_DEVICE_PACK_HOLD=1 $before" "hold:COMMLIB_IPC=1 COMMLIB_DEVICE_PACK_HOLD=1"
        "host memory:host")
    halo_ab "${WAITS_SIZES-32 64}" "${waits_variants[@]}"
    [ -n "${WAITS_SIZES_8-32}" ] && HALO_AB_RANKS=8 halo_ab "${WAITS_SIZES_8-32}" "${waits_variants[@]}"
    echo quit | nvidia-cuda-mps-control > /dev/null 2>&1
fi
if want small; then
    nvidia-cuda-mps-control -d > /dev/null 2>&1
    timeout 200 python3 -m pytest -q -rs tests/test_ipc.py -k small_messages_on_a_gpu > "$logs/small_tests.log" 2>&1
    echo "=== small messages GPU to GPU, tests (exit $?)"; tail -n 3 "$logs/small_tests.log"
    COMMLIB_IPC=1 COMMLIB_IPC_SMALL=1 TYPEGEN_IRECV=1 TYPEGEN_MIN_BYTES=8 COMMLIB_STATS=1 timeout 120 \
        python3 -m commlib run -n 2 python3 tests/ipc_typegen.py 12 300 > "$logs/small_typegen.log" 2>&1
    echo "random trees of one element device to device (exit $?): $(grep -o 'ipc_typegen: seed.*' "$logs/small_typegen.log")" \
        "$(grep -c MISMATCH "$logs/small_typegen.log") mismatch line(s), $(grep -o 'gpu-to-gpu send=[0-9]*' "$logs/small_typegen.log" | tr '\n' ' ')"
    [ "${SMALL_VERIFY:-1}" = 1 ] && halo_pack_verify small "COMMLIB_IPC_SMALL=1 COMMLIB_DEVICE_PACK_HOLD=1" 'gpu-to-gpu send=[0-9]*'
    halo_c=$(python3 -m commlib example halo3d)
    for n in 2 8; do
        [ "${SMALL_VERIFY:-1}" = 1 ] || break
        for prog in "$halo_c" "python3 examples/halo3d.py"; do
            COMMLIB_IPC=1 COMMLIB_IPC_SMALL=1 COMMLIB_STATS=1 timeout 60 python3 -m commlib run -n $n $prog --n 48 --device \
                --mode direct > "$logs/small_direct.log" 2>&1
            echo "halo3d ${prog##*/} -n $n direct, small: exit $? $(grep -o 'verified=[A-Z]*' "$logs/small_direct.log" | head -1)" \
                "rank 0 $(grep -o 'gpu-to-gpu send=[0-9]*' "$logs/small_direct.log" | head -1)" \
                "$(grep -o 'p2p staged send=[0-9]*' "$logs/small_direct.log" | head -1)"
        done
    done
    small_variants=("staged corners:COMMLIB_IPC=1 COMMLIB_IPC_SMALL=0" "small:COMMLIB_IPC=1 COMMLIB_IPC_SMALL=1"
        "hold, staged corners:COMMLIB_IPC=1 COMMLIB_IPC_SMALL=0 COMMLIB_DEVICE_PACK_HOLD=1"
        "hold, small:COMMLIB_IPC=1 COMMLIB_IPC_SMALL=1 COMMLIB_DEVICE_PACK_HOLD=1" "host memory:host")
    # radius 1, one quantity: corners of 8 bytes, edges of 8n (halo3d's defaults, radius 2 and 3
    # quantities, have no message under 192 bytes: nothing for the knob to change)
    HALO_AB_ARGS="--radius 1 --quantities 1" halo_ab "${SMALL_SIZES-32 64}" "${small_variants[@]}"
    [ -n "${SMALL_SIZES_8-32}" ] && HALO_AB_ARGS="--radius 1 --quantities 1" HALO_AB_RANKS=8 \
        halo_ab "${SMALL_SIZES_8-32}" "${small_variants[@]}"
    if [ "${SMALL_BENCH:-0}" = 1 ]; then
        COMMLIB_IPC_SMALL=1 COMMLIB_DEVICE_PACK_HOLD=1 timeout 300 python3 -m commlib bench halo --sizes 32,64,128,192 \
            --json "$logs/small_halo.json" > "$logs/small_halo.log" 2>&1
        echo "=== halo, small messages GPU to GPU and held packs (exit $?)"; tail -n 14 "$logs/small_halo.log"
    fi
    echo quit | nvidia-cuda-mps-control > /dev/null 2>&1
fi
if want phases; then
    nvidia-cuda-mps-control -d > /dev/null 2>&1
    phase_variants=("ipc:COMMLIB_IPC=1" "ipc+hold:COMMLIB_IPC=1 COMMLIB_DEVICE_PACK_HOLD=1" "host memory:host"
        "staged whole:stage")
    HALO_AB_ARGS="--phases ${PHASES_ARGS:-}" halo_ab "${PHASES_SIZES:-32 64}" "${phase_variants[@]}"
    echo quit | nvidia-cuda-mps-control > /dev/null 2>&1
fi
# halo_ab with --phases under MPS: 2 ranks at sizes $1, 8 ranks at sizes $2 (empty: none), the variants after
phases_ab() {
    local sizes=$1 sizes8=$2
    shift 2
    nvidia-cuda-mps-control -d > /dev/null 2>&1
    HALO_AB_ARGS="--phases" halo_ab "$sizes" "$@"
    [ -n "$sizes8" ] && HALO_AB_ARGS="--phases" HALO_AB_RANKS=8 halo_ab "$sizes8" "$@"
    echo quit | nvidia-cuda-mps-control > /dev/null 2>&1
}
if want acks; then
    phases_ab "${ACKS_SIZES:-32 64}" "${ACKS_SIZES_8-32}" "acks each:COMMLIB_IPC=1 COMMLIB_TEST_ACK_EACH=1" \
        "acks batched:COMMLIB_IPC=1" "hold, acks each:COMMLIB_IPC=1 COMMLIB_DEVICE_PACK_HOLD=1 COMMLIB_TEST_ACK_EACH=1" \
        "hold, acks batched:COMMLIB_IPC=1 COMMLIB_DEVICE_PACK_HOLD=1" "host memory:host"
fi
if want kept; then
    phases_ab "${KEPT_SIZES:-32 64}" "${KEPT_SIZES_8-32}" \
        "hold, pointers asked:COMMLIB_IPC=1 COMMLIB_DEVICE_PACK_HOLD=1 COMMLIB_POINTER_CACHE=0" \
        "hold, pointers kept:COMMLIB_IPC=1 COMMLIB_DEVICE_PACK_HOLD=1" "host memory:host"
fi
if want context; then
    phases_ab "${CONTEXT_SIZES:-32 64}" "${CONTEXT_SIZES_8-32}" \
        "hold, context set each time:COMMLIB_IPC=1 COMMLIB_DEVICE_PACK_HOLD=1 COMMLIB_TEST_CONTEXT_EACH=1" \
        "hold, context kept:COMMLIB_IPC=1 COMMLIB_DEVICE_PACK_HOLD=1" "host memory:host"
fi
if want onepass; then
    nvcc -O3 -arch=sm_90 -std=c++17 -o /tmp/strided_passes tests/gpu/strided_passes.cu -lcuda || echo "strided_passes: build failed"
    for mib in ${ONEPASS_PASSES_MIB-1 4 16}; do
        timeout 60 /tmp/strided_passes $mib > "$logs/strided_passes_$mib.log" 2>&1
        echo "=== passes of a strided message, $mib MiB (exit $?)"; cat "$logs/strided_passes_$mib.log"
    done
    nvidia-cuda-mps-control -d > /dev/null 2>&1
    direct="COMMLIB_IPC=1 COMMLIB_PROGRESS=thread COMMLIB_IPC_DIRECT_BYTES=192"
    [ "${ONEPASS_TYPEGEN:-1}" = 0 ] && typegen_modes="" || typegen_modes="1 0"
    for irecv in $typegen_modes; do
        env $direct TYPEGEN_ISEND=1 TYPEGEN_IRECV=$irecv COMMLIB_STATS=1 timeout 150 python3 -m commlib run -n 2 \
            python3 tests/ipc_typegen.py 11 300 > "$logs/onepass_typegen.log" 2>&1
        echo "random trees by MPI_Isend, direct from 192 B, irecv=$irecv (exit $?):" \
            "$(grep -o 'ipc_typegen: seed.*' "$logs/onepass_typegen.log") $(grep -c MISMATCH "$logs/onepass_typegen.log")" \
            "mismatch line(s), $(grep -o 'direct=[0-9]* one-pass=[0-9]*' "$logs/onepass_typegen.log" | tr '\n' ' ')"
    done
    # strided p2p, direct from 1 MiB: one pass against two (COMMLIB_TEST_TWO_PASS), alternating
    [ "${ONEPASS_STRIDED:-1}" = 0 ] && strided_rounds="" || strided_rounds="1 2"
    for round in $strided_rounds; do
        for two in 0 1; do
            COMMLIB_PROGRESS=thread COMMLIB_IPC_DIRECT_BYTES=1048576 COMMLIB_TEST_TWO_PASS=$two timeout 200 \
                python3 -m commlib bench p2p --sizes ${ONEPASS_SIZES:-1M,4M,16M} --layouts strided --target-ms 50 \
                > "$logs/onepass_p2p.log" 2>&1
            echo "=== bench p2p strided, direct, two passes=$two, round $round (exit $?)"
            grep -E "bandwidth|MiB \| strided" "$logs/onepass_p2p.log"
        done
    done
    # contiguous p2p, direct from 1 MiB: the batched kernel against the copy engine
    # (COMMLIB_TEST_DENSE_COPY_ENGINE), alternating
    for round in 1 2; do
        for ce in 0 1; do
            COMMLIB_PROGRESS=thread COMMLIB_TEST_DENSE_COPY_ENGINE=$ce timeout 200 python3 -m commlib bench p2p \
                --sizes ${ONEPASS_SIZES:-1M,4M,16M} --layouts contiguous --target-ms 50 > "$logs/onepass_dense.log" 2>&1
            echo "=== bench p2p contiguous, direct, copy engine=$ce, round $round (exit $?)"
            grep -E "bandwidth|MiB \| contiguous" "$logs/onepass_dense.log"
        done
    done
    echo quit | nvidia-cuda-mps-control > /dev/null 2>&1
fi
if want rounds; then
    nvidia-cuda-mps-control -d > /dev/null 2>&1
    timeout 120 python3 -m pytest -q -rs tests/test_ipc.py -k rounds > "$logs/rounds_tests.log" 2>&1
    echo "=== Waitall rounds tests (exit $?)"; tail -n 3 "$logs/rounds_tests.log"
    for round in 1 2; do
        for early in default 0; do
            knob=""; [ "$early" = 0 ] && knob="COMMLIB_EARLY_LAUNCH_BYTES=0"
            env $knob COMMLIB_PROGRESS=thread timeout 200 python3 -m commlib bench p2p \
                --sizes ${ROUNDS_SIZES:-1M,4M,16M} --target-ms 50 > "$logs/rounds_p2p.log" 2>&1
            echo "=== bench p2p, progress thread, early launch bytes=$early, round $round (exit $?)"
            grep -E "bandwidth|MiB \| (strided|contiguous)" "$logs/rounds_p2p.log"
        done
    done
    if [ -n "${ROUNDS_HALO:-}" ]; then
        for round in 1 2; do
            for early in default 0; do
                knob=""; [ "$early" = 0 ] && knob="COMMLIB_EARLY_LAUNCH_BYTES=0"
                env $knob COMMLIB_DEVICE_PACK_HOLD=1 timeout 200 python3 -m commlib bench halo --sizes 128,192 \
                    > "$logs/rounds_halo.log" 2>&1
                echo "=== bench halo, early launch bytes=$early, round $round (exit $?)"; tail -n 12 "$logs/rounds_halo.log"
            done
        done
    fi
    echo quit | nvidia-cuda-mps-control > /dev/null 2>&1
fi
if want trace; then
    nvidia-cuda-mps-control -d > /dev/null 2>&1
    cuda=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
    cupti_lib=$(dirname "$(ls "$cuda"/extras/CUPTI/lib64/libcupti.so* "$cuda"/lib64/libcupti.so* 2>/dev/null | head -1)")
    gcc -O2 -shared -fPIC -o /tmp/kernel_trace.so tests/gpu/kernel_trace.c -I"$cuda/include" -L"$cupti_lib" -lcupti \
        -Wl,-rpath,"$cupti_lib" || echo "kernel_trace: build failed"
    timeout 120 python3 -m commlib bench p2p --sizes 8 --layouts contiguous --host-only --keep > "$logs/trace_build.log" 2>&1
    p2p=$(ls -t "${XDG_CACHE_HOME:-$HOME/.cache}"/commlib/bench/bench_p2p-* | head -1)
    lib=$(python3 -m commlib lib)
    rm -rf /tmp/trace && mkdir -p /tmp/trace
    for layout in ${TRACE_LAYOUTS:-strided contiguous}; do
        for early in default 0; do
            knob=""; [ "$early" = 0 ] && knob="COMMLIB_EARLY_LAUNCH_BYTES=0"
            dir=/tmp/trace/$layout-$early; mkdir -p "$dir"
            for traced in no yes; do
                # the tracer goes into the ranks alone (not the launcher), whatever the MPI's launcher
                preload=$lib; [ $traced = yes ] && preload=$lib:/tmp/kernel_trace.so
                env $knob COMMLIB_IPC=1 COMMLIB_PROGRESS=thread timeout 120 python3 -m commlib run -n 2 -- \
                    env LD_PRELOAD="$preload" KTRACE_DIR="$dir" "$p2p" -i -s 4194304 -l $layout -t 50 -n 10 -w 64 \
                    -c 256 > "$dir/p2p-$traced.log" 2>&1
                echo "=== $layout 4 MiB, early launch bytes=$early, traced=$traced (exit $?): $(grep -E ',bandwidth,' "$dir/p2p-$traced.log" | tail -1)"
            done
            python3 tests/gpu/kernel_trace.py "$dir"
        done
    done
    tar czf "$results/trace.tgz" -C /tmp trace
    echo quit | nvidia-cuda-mps-control > /dev/null 2>&1
fi
if want thread; then
    nvidia-cuda-mps-control -d > /dev/null 2>&1
    paced=()
    for us in ${THREAD_INTERVALS-}; do
        paced+=("thread ${us}us:COMMLIB_IPC=1 COMMLIB_PROGRESS=thread COMMLIB_PROGRESS_INTERVAL_US=$us"
                "host memory, thread ${us}us:host COMMLIB_PROGRESS=thread COMMLIB_PROGRESS_INTERVAL_US=$us")
    done
    for us in ${THREAD_BUSY-}; do
        paced+=("thread busy ${us}us:COMMLIB_IPC=1 COMMLIB_PROGRESS=thread COMMLIB_PROGRESS_BUSY_US=$us"
                "host memory, thread busy ${us}us:host COMMLIB_PROGRESS=thread COMMLIB_PROGRESS_BUSY_US=$us")
    done
    halo_ab "${THREAD_SIZES:-32 64}" "no thread:COMMLIB_IPC=1" "thread:COMMLIB_IPC=1 COMMLIB_PROGRESS=thread" \
        "host memory:host" "host memory, thread:host COMMLIB_PROGRESS=thread" "${paced[@]}"
    echo quit | nvidia-cuda-mps-control > /dev/null 2>&1
fi
if want engine; then
    timeout 480 python3 -m pytest -q -rs tests/test_mpicomm_gpu.py tests/test_engine_device.py tests/test_staged_recv.py \
        tests/test_partitioned.py tests/test_train_example.py tests/test_single_partition.py \
        "tests/test_mpicomm.py::test_gpu_buffers" ${EXTRA_TESTS:-} > "$logs/engine.log" 2>&1
    echo "=== engine GPU tests (exit $?)"; tail -n 30 "$logs/engine.log"
fi
if want torch; then
    timeout 300 python3 -m pytest -q -rs tests/test_torch_training.py tests/test_torch_backend.py ${EXTRA_TESTS:-} \
        > "$logs/torch.log" 2>&1
    echo "=== torch GPU tests (exit $?)"; tail -n 30 "$logs/torch.log"
    for dev in cpu cuda; do
        timeout 140 python3 -m commlib bench ddp --device $dev --worlds 2,4 ${BENCH_DDP_ARGS:-} \
            --json "$logs/ddp_$dev.json" > "$logs/ddp_$dev.log" 2>&1
        echo "=== bench ddp --device $dev (exit $?)"; tail -n 30 "$logs/ddp_$dev.log"
    done
fi
if want bench9; then
    quick=${BENCH9_QUICK:+--quick}
    timeout 200 python3 -m commlib bench allreduce --columns engine,engine-mpi,mpi,gloo --worlds 2,4 --kills 0 $quick \
        --json "$logs/allreduce.json" > "$logs/allreduce.log" 2>&1
    echo "=== allreduce (exit $?)"; tail -n 40 "$logs/allreduce.log"
    timeout 200 python3 -m commlib bench overlap --ranks 2 --ops iallreduce --sizes 1M,4M,16M,64M --host-only $quick \
        --json "$logs/overlap9.json" > "$logs/overlap9.log" 2>&1
    echo "=== overlap (exit $?)"; tail -n 45 "$logs/overlap9.log"
    timeout 240 python3 -m commlib bench pipeline --ranks 2,4 $quick --json "$logs/pipeline.json" \
        > "$logs/pipeline.log" 2>&1
    echo "=== pipeline (exit $?)"; grep -E "^(numpy|torch)|best k|goal|^ +[0-9]+ \*" "$logs/pipeline.log" | head -60
fi
if want diloco; then
    timeout 150 python3 -m commlib elastic-run -n 3 examples/diloco_train.py --device cuda --mode overlap \
        --steps 150 --kill-one --join-one > "$logs/diloco_cuda.log" 2>&1
    echo "=== diloco_train.py on CUDA (exit $?)"
    grep -E "mode|killing|rolled|committed|admitted|done|parity broken|Error" "$logs/diloco_cuda.log" | head -30
    timeout 400 python3 -m commlib bench diloco --peers 4 --rates 100,1000 --threads 2 ${BENCH_DILOCO_ARGS:-} \
        --json "$logs/diloco.json" --plot "$results/diloco.png" > "$logs/diloco.log" 2>&1
    echo "=== bench diloco (exit $?)"; tail -n 25 "$logs/diloco.log"
fi
tar czf "$results/logs.tgz" -C "$logs" .
