"""The device pack engine on a GPU: every byte compared with the host MPI.

  * random datatype trees (tests/typegen.py) through commlib.native.pack / unpack on cupy
    buffers: device -> device, host -> device and device -> host packing, device -> device
    plus one other direction unpacking, each compared byte for byte (bytes around the
    packed range included) with mpi4py's Pack / Unpack of host copies; 10,000 trees over
    several seeds;
  * hand-made shapes at counts 1..4: byte vectors at stride 512, the faces of a 64^3 array
    of doubles, negative strides, a struct of several pieces;
  * messages of 2^31 words and more (the kernels' 64-bit index path), when memory allows;
  * tests/c/device_pack_c.c, a plain C MPI program on device memory, under `commlib run`
    (without commlib its host MPI, not CUDA-aware, would crash on the device pointers).

Everything skips without a CUDA device (and the cupy tests without cupy).  Seeds:
COMMLIB_DEVFUZZ_SEEDS="1,2" and COMMLIB_DEVFUZZ_TREES override; failures name the seed.
"""
import ctypes
import os
import random
import re
import subprocess
import sys

import numpy as np
import pytest

from harness import build_c, run_mpi


def _cuda_devices():
    """Devices the driver reports (0 without a driver: no CUDA headers or cupy needed)."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        count = ctypes.c_int(0)
        if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return count.value
    except (OSError, AttributeError):
        return 0


pytestmark = pytest.mark.skipif(_cuda_devices() < 1, reason="no CUDA device")


def _ints(var, default):
    raw = os.environ.get(var)
    return [int(x) for x in raw.split(",") if x.strip()] if raw else default


SEEDS = _ints("COMMLIB_DEVFUZZ_SEEDS", [101, 202, 303, 404, 505])
TREES = int(os.environ.get("COMMLIB_DEVFUZZ_TREES", "2000"))
SUMMARY = re.compile(r"^device_pack_c: cases=(?P<cases>\d+) mismatches=(?P<mism>\d+) ", re.M)


@pytest.fixture(scope="module")
def cp():
    return pytest.importorskip("cupy")


@pytest.fixture(scope="module")
def mpi():
    from mpi4py import MPI
    return MPI


@pytest.fixture(scope="module")
def native():
    from commlib import native as mod
    return mod


def _on_device(cp, array):
    return isinstance(array, cp.ndarray)


def _host(cp, array):
    return array.get() if _on_device(cp, array) else array


def _overlaps(mpi, dtype, info, count, nbytes, base):
    """Does the type map of `count` elements write some byte twice?  (MPI leaves the
    result of unpacking into such a type undefined; the kernels write in parallel.)"""
    total = info.size * count
    dst = np.zeros(nbytes, np.uint8)
    src = np.full(total, 0xFF, np.uint8)
    dtype.Unpack(src, 0, memoryview(dst)[base:base + count * info.extent], mpi.COMM_WORLD)
    return int(np.count_nonzero(dst)) < total


def _check_message(cp, mpi, native, dt, info, count, rng, unpack_directions, label, stats=None):
    """Packs and unpacks `count` elements every way; returns a problem string or None."""
    from typegen import buffer_span
    ref_size = dt.Pack_size(count, mpi.COMM_WORLD)
    lo, hi = buffer_span(info, count)
    lo, hi = min(lo, 0), max(hi, count * info.extent)
    base = 8 - lo
    nbytes = base + hi + 8
    typed_h = np.frombuffer(rng.randbytes(nbytes), np.uint8).copy()
    typed_d = cp.asarray(typed_h)
    pos0 = rng.choice([0, 0, 1, 3, 8, rng.randint(1, 24)])
    out_init = np.frombuffer(rng.randbytes(pos0 + ref_size + 8), np.uint8).copy()
    out_ref = out_init.copy()
    view = memoryview(typed_h)[base:base + count * info.extent]
    p_ref = dt.Pack(view, out_ref[:pos0 + ref_size], pos0, mpi.COMM_WORLD)

    for direction in ("d2d", "h2d", "d2h"):
        src = typed_h if direction == "h2d" else typed_d
        out = out_init.copy() if direction == "d2h" else cp.asarray(out_init)
        p = native.pack(dt, src, count, out, position=pos0, offset=base)
        got = _host(cp, out)
        if p != p_ref:
            return f"{label} pack {direction}: position {p} != host {p_ref} (start {pos0})"
        if not np.array_equal(got, out_ref):
            bad = int(np.flatnonzero(got != out_ref)[0])
            return f"{label} pack {direction}: byte {bad} differs (packed range {pos0}..{p_ref})"

    packed = out_ref[:p_ref].copy()
    dst_init = np.frombuffer(rng.randbytes(nbytes), np.uint8).copy()
    dst_ref = dst_init.copy()
    q_ref = dt.Unpack(packed, pos0, memoryview(dst_ref)[base:base + count * info.extent], mpi.COMM_WORLD)
    for direction in unpack_directions:
        src = packed if direction == "h2d" else cp.asarray(packed)
        dst = dst_init.copy() if direction == "d2h" else cp.asarray(dst_init)
        q = native.unpack(dt, src, pos0, dst, count, offset=base)
        got = _host(cp, dst)
        if q != q_ref:
            return f"{label} unpack {direction}: position {q} != host {q_ref}"
        if not np.array_equal(got, dst_ref):
            if _overlaps(mpi, dt, info, count, nbytes, base):
                if stats is not None:
                    stats["overlap_skipped"] += 1
                continue
            bad = int(np.flatnonzero(got != dst_ref)[0])
            return f"{label} unpack {direction}: typed byte {bad} differs (base {base})"
    return None


def test_build_has_kernels():
    """On a GPU machine the kernels must be at hand (else device buffers are only staged
    through the host): the fatbin nvcc built at install time, or an NVRTC to compile the
    embedded source at run time (tests/test_kernels_nvrtc.py checks that route)."""
    from commlib import _build_info
    from commlib import native as mod
    nvrtc = mod.kernels()["runtime"]["nvrtc"]
    assert getattr(_build_info, "DEVICE_KERNELS", False) or nvrtc, \
        f"built without device kernels ({getattr(_build_info, 'DEVICE_KERNELS_NOTE', '?')}) and no NVRTC found: " \
        "reinstall where nvcc is, or with COMMLIB_DEVICE_FATBIN, or install the nvidia-cuda-nvrtc wheel"


def test_kernels_load(cp, tmp_path):
    """The embedded image loads on this GPU and a pack runs through it (log at info level)."""
    script = tmp_path / "load.py"
    script.write_text(
        "import cupy as cp\n"
        "from mpi4py import MPI\n"
        "from commlib import native\n"
        "t = MPI.BYTE.Create_vector(1000, 3, 512).Commit()\n"
        "native.register(t)\n"
        "src = cp.arange(512 * 1000, dtype=cp.uint8)\n"
        "out = cp.zeros(3000, dtype=cp.uint8)\n"
        "assert native.pack(t, src, 1, out) == 3000\n"
        "expect = src.reshape(1000, 512)[:, :3].ravel()\n"
        "assert bool((out == expect).all()), 'wrong bytes'\n"
        "print('packed ok')\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COMMLIB_LOG": "info"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "packed ok" in proc.stdout, out
    assert "device pack kernels loaded" in proc.stderr, out


@pytest.mark.parametrize("seed", SEEDS)
def test_random_trees(cp, mpi, native, seed):
    from typegen import TypeGen
    gen = TypeGen(seed, allow_nonpositive_extent=False)  # mpi4py counts elements by extent
    rng = random.Random(seed * 104729)
    stats = {"supported": 0, "unsupported": 0, "overlap_skipped": 0}
    failures = []
    for i in range(TREES):
        t = gen.generate()
        try:
            reg = native.register(t.dtype)
            try:
                if not reg["supported"]:
                    stats["unsupported"] += 1
                    continue
                stats["supported"] += 1
                info = t.info()
                other = rng.choice(["h2d", "d2h"])
                for count in (1, rng.randint(2, 4)):
                    problem = _check_message(cp, mpi, native, t.dtype, info, count, rng, ("d2d", other),
                                             f"count={count}", stats)
                    if problem:
                        failures.append(f"tree {i}: {problem}\n    type: {t.desc}")
                        break
            finally:
                native.forget(t.dtype)
        finally:
            t.free()
        if len(failures) >= 5:
            break
    print(f"typegen seed={seed}: {TREES} trees, {stats}")
    assert not failures, f"seed={seed}: {len(failures)} failing trees ({stats}):\n" + "\n".join(failures)
    total = stats["supported"] + stats["unsupported"]
    assert stats["supported"] > 0.7 * total, f"seed={seed}: only {stats} supported"


def test_random_trees_total():
    overridden = "COMMLIB_DEVFUZZ_TREES" in os.environ or "COMMLIB_DEVFUZZ_SEEDS" in os.environ
    assert len(SEEDS) * TREES >= 10_000 or overridden


def _hand_made(mpi):
    """name -> a fresh committed type."""
    def face(axis):
        sizes, subsizes, starts = [64] * 3, [64] * 3, [0] * 3
        subsizes[axis], starts[axis] = 1, 1
        return mpi.DOUBLE.Create_subarray(sizes, subsizes, starts, order=mpi.ORDER_C)

    def struct():
        st = mpi.Datatype.Create_struct([1, 3, 2], [0, 12, 40], [mpi.DOUBLE, mpi.INT, mpi.SHORT])
        rs = st.Create_resized(0, 64)
        st.Free()
        return rs

    def vector_of_structs():
        st = struct()
        v = st.Create_vector(5, 2, 3)
        st.Free()
        return v
    return {
        "vector_b1_s512": lambda: mpi.BYTE.Create_vector(4096, 1, 512),
        "vector_b3_s512": lambda: mpi.BYTE.Create_vector(1500, 3, 512),
        "vector_b32_s512": lambda: mpi.BYTE.Create_vector(1024, 32, 512),
        "face_x": lambda: face(0),
        "face_y": lambda: face(1),
        "face_z": lambda: face(2),
        "hvector_negative": lambda: mpi.DOUBLE.Create_hvector(100, 2, -40),
        "vector_negative_int": lambda: mpi.INT.Create_vector(33, 3, -7),
        "struct_3_pieces": struct,
        "vector_of_structs": vector_of_structs,
        "contiguous_odd": lambda: mpi.BYTE.Create_contiguous(100003),
    }


HAND_MADE = ["vector_b1_s512", "vector_b3_s512", "vector_b32_s512", "face_x", "face_y", "face_z",
             "hvector_negative", "vector_negative_int", "struct_3_pieces", "vector_of_structs",
             "contiguous_odd"]


@pytest.mark.parametrize("name", HAND_MADE)
def test_hand_made(cp, mpi, native, name):
    from typegen import Info
    dt = _hand_made(mpi)[name]().Commit()
    rng = random.Random(name)
    try:
        reg = native.register(dt)
        assert reg["supported"], reg
        info = Info.of(dt)
        for count in (1, 2, 3, 4):
            problem = _check_message(cp, mpi, native, dt, info, count, rng, ("d2d", "h2d", "d2h"),
                                     f"{name} count={count}")
            assert problem is None, problem
    finally:
        native.forget(dt)
        dt.Free()


def _free_device_bytes(cp):
    return cp.cuda.runtime.memGetInfo()[0]


@pytest.mark.parametrize("case", ["contiguous_fast_near_2^31", "contiguous_wide", "strided_wide"])
def test_large_index_paths(cp, mpi, native, case):
    """2^31 words and more take the kernels' 64-bit index math; just below, the 32-bit
    math runs near its limit.  Odd positions force 1-byte words."""
    if _free_device_bytes(cp) < 20 << 30:
        pytest.skip("needs 20 GiB of free device memory")
    if case == "strided_wide":
        n = 1 << 30
        dt = mpi.BYTE.Create_vector(n, 1, 3).Commit()
        extent, total = (n - 1) * 3 + 1, 2 * n
    else:
        n = (1 << 30) if case == "contiguous_wide" else (1 << 30) - (1 << 21)
        dt = mpi.BYTE.Create_contiguous(n).Commit()
        extent, total = n, 2 * n
    try:
        native.register(dt)
        words = (2 * extent + 3) // 4  # a pattern, made without wide temporaries
        typed = (cp.arange(words, dtype=cp.uint32) * cp.uint32(2654435761)).view(cp.uint8)[:2 * extent]
        out = cp.zeros(total + 2, dtype=cp.uint8)
        assert native.pack(dt, typed, 2, out, position=1) == total + 1
        if case == "strided_wide":
            ok = bool((out[1:1 + n] == typed[0:extent:3]).all()) and \
                bool((out[1 + n:1 + total] == typed[extent:2 * extent:3]).all())
        else:
            ok = bool((out[1:1 + total] == typed[:total]).all())
        assert ok, f"{case}: packed bytes differ"
        assert int(out[0]) == 0 and int(out[-1]) == 0, f"{case}: bytes outside the packed range written"
        if case != "strided_wide":
            back = cp.zeros(2 * extent, dtype=cp.uint8)
            assert native.unpack(dt, out, 1, back, 2) == total + 1
            assert bool((back == typed).all()), f"{case}: unpacked bytes differ"
    finally:
        native.forget(dt)
        dt.Free()
        cp.get_default_memory_pool().free_all_blocks()


def test_c_program_under_commlib(tmp_path):
    """A plain C MPI program packs device memory (driver API only, no CUDA headers)."""
    exe = build_c("tests/c/device_pack_c.c", tmp_path)
    proc = run_mpi(1, [exe], timeout=600)
    out = (proc.stdout + proc.stderr)[-8000:]
    m = SUMMARY.search(proc.stdout)
    assert m, f"no summary line (rc={proc.returncode})\n{out}"
    assert int(m["mism"]) == 0, "\n".join(l for l in proc.stdout.splitlines() if l.startswith("FAIL"))[:8000]
    assert int(m["cases"]) >= 500, out
    assert proc.returncode == 0, out
