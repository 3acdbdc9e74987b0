#!/usr/bin/env bash
# Issue 8 on the GPU host's Xeon: the x faces' row kernels (8-64 B blocks far apart) built four ways
# from a patched copy of native/pack/host_pack.c (tests/gpu/x_batch_patch.py), then
# `commlib bench pack --filter _x_` with each library preloaded, alternating; JSON per run in $OUT.
#   base  today's kernels (the patch changes nothing without a -D);  b8  8 blocks an iteration for every size;  b1  one block an iteration up to 16 B
#   (stop 28's lead);  b8nm  b8 with 8-byte stores kept apart (no movq+movhps pairs)
# VARIANTS, REPS (e.g. "1 2"), FILTER, ROUNDS, TMS narrow it.  Run after `bash .device/setup.sh`
# (it needs the in-place build's device_image.c).  On the dev VM's Zen 5 (MPICH, 3 runs) base was the
# best: x shapes 1.338x geomean, b8 1.306x, b8nm 1.287x, b1 1.194x.
set -uo pipefail
cd "$(dirname "$0")/../.."
top=$PWD out=${OUT:-/tmp/x-out}
mpicc=$(dirname "$(python3 -c 'import sys; print(sys.executable)')")/mpicc  # as setup.py's find_mpicc
[ -x "$mpicc" ] || mpicc=$(command -v mpicc)
image=$(ls build/temp*/device_image.c 2>/dev/null | head -1)
[ -n "$image" ] || { echo "no build/temp*/device_image.c: build in place first"; exit 1; }
rm -rf /tmp/x && mkdir -p /tmp/x "$out" && cp -r native /tmp/x/ &&
    python3 tests/gpu/x_batch_patch.py /tmp/x/native/pack/host_pack.c || exit 1
srcs=$(cd /tmp/x && find native -name '*.c' | grep -v -e native/bench -e native/elastic | sort)
# setup.py's BuildNative command, minus its rpaths and TLS flag (all four variants alike): keep the
# source list in step with its native_sources()
build() {
    (cd /tmp/x && $mpicc -O3 -std=gnu11 -fPIC -shared -fvisibility=hidden -pthread "${@:2}" -DCOMMLIB_VERSION='"x"' \
        -DCOMMLIB_SITE_DIRS='""' -Inative/include -o "/tmp/x/$1.so" $srcs "$top/$image" -ldl -lpthread -flto=4) \
        > "/tmp/x/$1.log" 2>&1 || { echo "build $1 failed"; tail "/tmp/x/$1.log"; }
}
build base & build b8 -DXB8 & build b1 -DXB1 & build b8nm -DXB8 -DXMERGE=9 & wait
for r in ${REPS:-1 2}; do
    for v in ${VARIANTS:-base b8 b1 b8nm}; do
        timeout 120 python3 -m commlib bench pack --filter "${FILTER:-_x_}" --rounds "${ROUNDS:-5}" \
            --target-ms "${TMS:-10}" --preload "/tmp/x/$v.so" --json "$out/x_${v}_$r.json" > /tmp/x/run.log 2>&1
        echo "$v run $r exit $? $(grep -o 'geomean speedup.*' /tmp/x/run.log | head -1)"
    done
done
