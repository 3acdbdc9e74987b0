"""Held device MPI_Pack/MPI_Unpack (COMMLIB_DEVICE_PACK_HOLD=1, native/pack/device_hold.h).

  * tests/c/hold_overlap.c: the overlap test that decides whether an op must wait for the
    held ones - never "apart" for pieces sharing a byte (random pieces against their byte
    sets), always "apart" for two disjoint boxes of a halo's grid (or nothing would batch);
  * tests/c/hold_sequence.c: random sequences of MPI_Pack/MPI_Unpack on one device
    allocation, overlapping each other, with the program's own writes and reads
    (cuMemcpyHtoD/DtoH) between them, against the host MPI's PMPI_Pack/PMPI_Unpack on a host
    mirror - on the stand-in driver, which runs queued work only when something waits and a
    batched launch's jobs last to first, and stands in for CUPTI.
The halo exchange itself: tests/test_halo.py::test_device_pack_hold_on_the_fake_driver; on
the H200: `STAGES=hold bash tests/gpu/session.sh`."""
import os
import re
import subprocess

import pytest

from harness import build_c, run_mpi


def test_overlap_decisions(tmp_path):
    exe = build_c("tests/c/hold_overlap.c", tmp_path)
    proc = subprocess.run([exe, "100000"], capture_output=True, text=True, timeout=120)
    m = re.search(r"hold_overlap: random=(\d+) shared=(\d+) unsound=(\d+) boxes=(\d+) disjoint=(\d+) missed=(\d+)",
                  proc.stdout)
    assert proc.returncode == 0 and m, proc.stdout + proc.stderr
    random, shared, unsound, boxes, disjoint, missed = map(int, m.groups())
    assert random == 100000 and shared > 1000 and unsound == 0, proc.stdout  # pieces that do share bytes were met
    assert boxes > 100000 and disjoint > boxes // 2 and missed == 0, proc.stdout


@pytest.fixture(scope="module")
def sequence_exe(tmp_path_factory):
    return build_c("tests/c/hold_sequence.c", tmp_path_factory.mktemp("hold_sequence"))


def sequence_env(fake_cuda_env, **extra):
    lib = os.path.join(fake_cuda_env["LD_LIBRARY_PATH"].split(os.pathsep)[0], "libcuda.so.1")
    return {**fake_cuda_env, "COMMLIB_CUPTI": lib, "FAKE_CUDA_KERNELS": "1", "FAKE_CUDA_DEFER": "1",
            "FAKE_CUDA_BATCH_ORDER": "reverse", **extra}


LINE = re.compile(r"hold_sequence: ops=(\d+) writes=(\d+) checks=(\d+) mismatches=(\d+) held=(-?\d+) "
                  r"launches=(-?\d+) overlaps=(-?\d+)")


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_held_sequences_keep_the_programs_order(fake_cuda_env, sequence_exe, seed):
    proc = run_mpi(1, [sequence_exe, "300", str(seed)], env=sequence_env(fake_cuda_env, COMMLIB_DEVICE_PACK_HOLD="1"))
    m = LINE.search(proc.stdout)
    assert proc.returncode == 0 and m, proc.stdout + proc.stderr
    ops, writes, checks, mismatches, held, launches, overlaps = map(int, m.groups())
    assert mismatches == 0 and writes > 50 and checks > 100, proc.stdout
    # every op held (both sides device memory); several launched together; ops that overlap
    # held ones met (launched what was held first)
    assert held == ops > 4000 and launches < ops and overlaps > 100, proc.stdout


def test_without_cupti_ops_are_launched_one_by_one(fake_cuda_env, sequence_exe):
    proc = run_mpi(1, [sequence_exe, "100", "4"],
                   env=sequence_env(fake_cuda_env, COMMLIB_DEVICE_PACK_HOLD="1", FAKE_CUPTI_BUSY="1"))
    m = LINE.search(proc.stdout)
    assert proc.returncode == 0 and m, proc.stdout + proc.stderr
    assert int(m[4]) == 0 and int(m[5]) == 0, proc.stdout  # right bytes, nothing held
    assert "CUPTI_ERROR_MULTIPLE_SUBSCRIBERS_NOT_SUPPORTED" in proc.stderr, proc.stderr


def test_device_pointers_kept_while_cupti_watches(fake_cuda_env, tmp_path):
    """cuda/pointer_cache.h: while CUPTI watches (held mode), repeated MPI calls on the same
    device allocations ask the driver nothing, and after each CUDA call that allocates or frees
    memory the next call asks again about both of its buffers; the context commlib made current
    is not made current again, until the program switches contexts (cuCtxSetCurrent(NULL):
    the next pack makes it current again, or its launch fails under FAKE_CUDA_STRICT_CONTEXT);
    COMMLIB_POINTER_CACHE=0 keeps nothing.  The stand-in driver counts its pointer queries and
    context switches (FAKE_CUDA_COUNTS)."""
    exe = build_c("tests/c/pointer_cache.c", tmp_path)
    line = re.compile(r"pointer_cache: hits=(\d+) steady=(-?\d+) after=([-\d,]+) packs=(\d+) ok=(\d)")
    contexts = re.compile(r"contexts: steady=(\d+) switched=(\d+) ok=(\d)")
    queries = {}
    for knob in ("1", "0"):
        proc = run_mpi(1, [exe], env=sequence_env(fake_cuda_env, COMMLIB_DEVICE_PACK_HOLD="1", FAKE_CUDA_COUNTS="1",
                                                  FAKE_CUDA_STRICT_CONTEXT="1", COMMLIB_POINTER_CACHE=knob))
        m = line.search(proc.stdout)
        c = contexts.search(proc.stdout)
        assert proc.returncode == 0 and m and c, proc.stdout + proc.stderr
        hits, steady, after, packs, ok = int(m[1]), int(m[2]), [int(x) for x in m[3].split(",")], int(m[4]), m[5]
        assert ok == "1" and packs == 18, proc.stdout
        assert c[3] == "1" and int(c[2]) >= 1, proc.stdout  # the pack after the switch: right, context set again
        # ... and nothing launched without it (a failed launch falls back to the host: right bytes, an error)
        assert "commlib: error" not in proc.stderr, proc.stderr
        queries[knob] = int(re.search(r"fake_cuda counts .*pointer_attributes=(\d+)", proc.stderr)[1])
        if knob == "1":
            # 2 pointers a pack: the 10 steady packs answered kept, and no context made current again
            assert steady == 0 and after == [2, 2, 2, 2] and hits == 2 * 10, proc.stdout
            assert int(c[1]) == 0, proc.stdout
        else:
            assert hits == 0 and after == [0, 0, 0, 0], proc.stdout
            assert int(c[1]) >= 10, proc.stdout
    # each pack asks twice without the cache (36), the kept run about once per pointer and memory call
    assert queries["0"] >= 2 * 18 and queries["1"] <= queries["0"] - 2 * 10, queries
