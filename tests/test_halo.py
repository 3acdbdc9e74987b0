"""End-to-end tests of examples/halo3d.c and examples/halo3d.py, the project's
reference workload.

halo3d checks every halo cell itself and prints one summary line; these tests
run it at several rank counts and in both transfer modes (MPI_Pack + MPI_PACKED,
and the subarray datatypes handed straight to MPI), under the interposer and
under plain mpiexec, and make sure its checker really can fail.  The grid in
device memory (--device, --stage-host) runs against tests/c/fake_cuda.c on any
machine, and on a real GPU where there is one; the Python example runs over
numpy everywhere and over cupy where cupy and a GPU are.

Set COMMLIB_TEST_PRELOAD=0 to run the preload tests under plain mpiexec (while
the interposer is not built, say); the comparison test always runs both.
"""
import ctypes
import importlib.util
import os
import re
import sys

import pytest

from commlib import native, paths
from harness import ROOT, build_c, gpu_count, run_mpi

PRELOAD = os.environ.get("COMMLIB_TEST_PRELOAD", "1") != "0"

SMALL = ["--n", "8", "--radius", "2", "--quantities", "2", "--iters", "3", "--warmup", "1"]

SUMMARY = re.compile(
    r"^(?P<prog>halo3d|halo3d\.py): ranks=(?P<ranks>\d+) dims=(?P<dims>\d+x\d+x\d+) "
    r"local=(?P<local>\d+x\d+x\d+) radius=(?P<radius>\d+) quantities=(?P<q>\d+) "
    r"mode=(?P<mode>pack|direct) memory=(?P<memory>host|device|stage-host) "
    r"iters=(?P<iters>\d+) time/exchange=(?P<time>[0-9.]+) us verified=(?P<verdict>.*)$",
    re.M)
HALO_PY = [sys.executable, os.path.join(ROOT, "examples", "halo3d.py")]
NO_GPU_EXIT = 77


@pytest.fixture(scope="module")
def halo3d(tmp_path_factory):
    return build_c("examples/halo3d.c", tmp_path_factory.mktemp("halo3d"))


def run(binary, n, args, preload=PRELOAD, env=None):
    argv = [*binary] if isinstance(binary, list) else [binary]
    return run_mpi(n, [*argv, *args], env=env, preload=preload, timeout=240)


def summary(proc):
    """The one summary line rank 0 prints, parsed; fails the test if absent."""
    found = SUMMARY.findall(proc.stdout)
    assert len(found) == 1, f"expected one summary line\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return SUMMARY.search(proc.stdout)


def without_time(line):
    return re.sub(r"time/exchange=[0-9.]+ us ", "", line)


def check_ok(proc, n, mode, local, memory="host"):
    m = summary(proc)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert m["verdict"] == "OK", m.group(0)
    assert int(m["ranks"]) == n
    px, py, pz = map(int, m["dims"].split("x"))
    assert px * py * pz == n
    assert m["mode"] == mode
    assert m["memory"] == memory
    assert m["local"] == local
    assert float(m["time"]) > 0
    return m


@pytest.mark.parametrize("mode", ["pack", "direct"])
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_verified(halo3d, n, mode):
    proc = run(halo3d, n, [*SMALL, "--mode", mode])
    check_ok(proc, n, mode, "8x8x8")


@pytest.mark.parametrize("mode", ["pack", "direct"])
@pytest.mark.parametrize("n", [1, 3, 6])
def test_uneven_box(halo3d, n, mode):
    # Unequal edges catch a swapped axis in the subarray sizes or the
    # neighbour lookup; 3 and 6 ranks give unequal process grids too.
    proc = run(halo3d, n, ["--nx", "6", "--ny", "7", "--nz", "5", "--radius", "1",
                           "--quantities", "2", "--iters", "3", "--mode", mode])
    check_ok(proc, n, mode, "6x7x5")


@pytest.mark.parametrize("mode", ["pack", "direct"])
def test_radius_equals_edge(halo3d, mode):
    # The widest halo allowed: send strips of opposite sides meet in the middle.
    proc = run(halo3d, 2, ["--nx", "3", "--ny", "4", "--nz", "3", "--radius", "3",
                           "--iters", "2", "--mode", mode])
    check_ok(proc, 2, mode, "3x4x3")


def test_defaults(halo3d):
    proc = run(halo3d, 2, ["--iters", "2", "--warmup", "0"])
    m = summary(proc)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (m["local"], m["radius"], m["q"], m["mode"]) == ("32x32x32", "2", "3", "pack")
    assert m["verdict"] == "OK"


@pytest.mark.parametrize("mode", ["pack", "direct"])
@pytest.mark.parametrize("n", [1, 4])
def test_corrupt_is_detected(halo3d, n, mode):
    # --corrupt (hidden) bumps one halo cell on the last rank after the
    # exchange; the checker must notice it, whichever rank it lands on.
    proc = run(halo3d, n, [*SMALL, "--mode", mode, "--corrupt"])
    m = summary(proc)
    assert m["verdict"] == "FAILED (1 mismatched cells)", m.group(0)
    assert proc.returncode != 0


@pytest.mark.parametrize("args", [
    ["--bogus"],
    ["--mode", "sideways"],
    ["--n", "four"],
    ["--n", "4", "--radius", "5"],
    ["--radius", "0"],
    ["--iters"],
    ["--device", "--stage-host"],
])
def test_bad_flag_exits_2(halo3d, args):
    proc = run(halo3d, 2, args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "usage:" in proc.stderr
    assert "verified=" not in proc.stdout


def test_help(halo3d):
    proc = run(halo3d, 1, ["--help"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "usage:" in proc.stdout and "--mode" in proc.stdout


@pytest.mark.parametrize("mode", ["pack", "direct"])
def test_same_with_and_without_preload(halo3d, mode):
    args = ["--nx", "6", "--ny", "5", "--nz", "4", "--radius", "2", "--quantities", "3",
            "--iters", "2", "--mode", mode]
    plain = run(halo3d, 4, args, preload=False)
    preloaded = run(halo3d, 4, args, preload=True)
    assert plain.returncode == 0, plain.stdout + plain.stderr
    assert preloaded.returncode == 0, preloaded.stdout + preloaded.stderr
    a, b = summary(plain).group(0), summary(preloaded).group(0)
    assert without_time(a) == without_time(b)
    assert a.endswith("verified=OK")


# ---------------------------------------------------------------- device memory (C)





def staged_counts(proc):
    """(sends, receives) staged by commlib, per rank, from COMMLIB_STATS=1."""
    return [tuple(map(int, m)) for m in re.findall(r"p2p staged send=(\d+) recv=(\d+)", proc.stderr)]


@pytest.mark.parametrize("mode", ["pack", "direct"])
def test_device_on_the_fake_driver(halo3d, fake_cuda_env, mode):
    # The grid and the pack buffers are device memory the CPU cannot read: every MPI
    # call that touches them must go through commlib's staging.
    args = ["--nx", "6", "--ny", "5", "--nz", "4", "--radius", "2", "--iters", "2", "--mode", mode]
    proc = run(halo3d, 2, [*args, "--device"], preload=True, env={**fake_cuda_env, "COMMLIB_STATS": "1"})
    check_ok(proc, 2, mode, "6x5x4", memory="device")
    # 26 sends and 26 receives per exchange, 2 warm-up + 2 timed exchanges
    assert staged_counts(proc) == [(104, 104)] * 2, proc.stderr
    host = run(halo3d, 2, args, preload=True)
    assert without_time(summary(host).group(0)).replace("memory=host", "memory=device") == \
        without_time(summary(proc).group(0))


@pytest.mark.parametrize("mode", ["pack", "direct"])
@pytest.mark.parametrize("quantities, small, corner_staged", [(3, "0", False), (1, "0", True), (1, "1", False)])
def test_device_gpu_to_gpu_on_the_fake_driver(halo3d, fake_cuda_env, mode, quantities, small, corner_staged):
    # COMMLIB_IPC=1: every message of at least the descriptor's 192 bytes goes GPU to GPU.
    # Radius 2 on an 8^3 grid: corners of 2x2x2 cells (192 B with 3 quantities, 64 B with
    # 1 - staged, unless COMMLIB_IPC_SMALL=1), edges of 8x2x2 (>= 256 B) and faces; 4
    # exchanges of 26 messages.
    args = ["--n", "8", "--radius", "2", "--quantities", str(quantities), "--iters", "2", "--warmup", "2",
            "--mode", mode, "--device"]
    proc = run(halo3d, 2, args, preload=True,
               env={**fake_cuda_env, "COMMLIB_STATS": "1", "COMMLIB_IPC": "1", "FAKE_CUDA_KERNELS": "1",
                    "FAKE_CUDA_COUNTS": "1", "COMMLIB_IPC_SMALL": small})
    check_ok(proc, 2, mode, "8x8x8", memory="device")
    ipc = [tuple(map(int, m)) for m in
           re.findall(r"gpu-to-gpu send=(\d+) recv=(\d+) fallback=(\d+) direct=(\d+)", proc.stderr)]
    corners = 8 * 4 if corner_staged else 0
    assert ipc == [(104 - corners, 104 - corners, 0, 0)] * 2, proc.stderr
    assert [sends for sends, _ in staged_counts(proc)] == [corners] * 2, proc.stderr
    # No host synchronisation per message (issue 12): the stand-in driver counts each
    # process's calls.  Direct mode, all 26 GPU to GPU: two stream synchronisations per
    # exchange (the Waitall's receives, and its sends' burst; and one each when the arena is
    # made and at MPI_Finalize), at most one launch per pack (test_device_bursts_on_the_fake_driver: fewer), and
    # the 26 unpacks in one launch (all W = 8) after at most one wait for the one sender's event.  Pack mode adds the program's
    # synchronous MPI_Pack/MPI_Unpack calls; staged corners wait for their copies (8 of the
    # 10 synchronisations an exchange where the corners are 8 bytes, stop 33), small ones GPU
    # to GPU do not.
    counts = [dict((k, int(v)) for k, v in re.findall(r" (\w+)=(\d+)", line))
              for line in re.findall(r"^fake_cuda counts .*$", proc.stderr, re.M)]
    assert len(counts) == 2, proc.stderr
    batched = [tuple(map(int, m)) for m in re.findall(r"unpacks batched=(\d+) in launches=(\d+)", proc.stderr)]
    assert batched == [(104 - corners, 4)] * 2, proc.stderr
    # the acknowledgements of a Waitall's receives from the other rank go back as one message
    # (transfer/ipc.h, ipc_ack_batch_end): 4 exchanges, 4 messages (the rest are to itself)
    acks = [tuple(map(int, m)) for m in re.findall(r"gpu-to-gpu acks=(\d+) in messages=(\d+)", proc.stderr)]
    assert len(acks) == 2 and all(n > 4 and messages == 4 for n, messages in acks), proc.stderr
    if corner_staged:  # each staged corner's copy off the GPU synchronises
        assert all(c["stream_sync"] >= 8 * 4 for c in counts), counts
    if mode == "direct" and not corner_staged:
        assert all(c["stream_sync"] <= 2 * 4 + 2 and c["launch"] <= 27 * 4 and c["event_record"] <= 26 * 4 and
                   c["stream_wait_event"] <= 4 for c in counts), counts


def test_device_mixed_word_sizes_on_the_fake_driver(halo3d, fake_cuda_env):
    # A 32^3 grid, radius 1, one quantity, pack mode, every message GPU to GPU (small ones
    # too): the sends' packs and the receives' unpacks move words of two sizes (W = 8 and 16),
    # and each of an exchange's batches still takes one launch (the mixed kernel,
    # pack/device_pack.c), where it took one per word size (8 in 4 exchanges).
    args = ["--n", "32", "--radius", "1", "--quantities", "1", "--iters", "2", "--warmup", "2", "--mode", "pack",
            "--device"]
    proc = run(halo3d, 2, args, preload=True,
               env={**fake_cuda_env, "COMMLIB_STATS": "1", "COMMLIB_IPC": "1", "COMMLIB_IPC_SMALL": "1",
                    "FAKE_CUDA_KERNELS": "1", "COMMLIB_IPC_BURST_US": "100000"})
    check_ok(proc, 2, "pack", "32x32x32", memory="device")
    burst = [tuple(map(int, m)) for m in re.findall(r"gpu-to-gpu burst=(\d+) in launches=(\d+)", proc.stderr)]
    batched = [tuple(map(int, m)) for m in re.findall(r"unpacks batched=(\d+) in launches=(\d+)", proc.stderr)]
    assert burst == [(104, 4)] * 2 and batched == [(104, 4)] * 2, proc.stderr


@pytest.mark.parametrize("hooks", [False, True])
@pytest.mark.parametrize("mode", ["pack", "direct"])
def test_device_bursts_on_the_fake_driver(halo3d, fake_cuda_env, mode, hooks):
    # An exchange's 26 GPU-to-GPU sends leave their packs queued and the Waitall launches
    # them together (transfer/ipc.h): one batched launch per exchange (all W = 8) and no
    # event record, where each send launched and recorded before; the receiver's stream
    # waits for the arena's signal instead of the event.  A long COMMLIB_IPC_BURST_US
    # keeps the burst thread from launching a burst early (on a slow machine).  hooks: the
    # measuring hooks that bring back stop 28's driver calls for A/B timing on a GPU
    # (tests/gpu/session.sh stage waits): a wait per message, a context query per buffer.
    args = ["--n", "8", "--radius", "2", "--quantities", "3", "--iters", "2", "--warmup", "2", "--mode", mode,
            "--device"]
    env = {**fake_cuda_env, "COMMLIB_STATS": "1", "COMMLIB_IPC": "1", "FAKE_CUDA_KERNELS": "1",
           "FAKE_CUDA_COUNTS": "1", "COMMLIB_IPC_BURST_US": "100000"}
    if hooks:
        env.update({"COMMLIB_TEST_WAIT_EACH": "1", "COMMLIB_TEST_CONTEXT_QUERY": "1"})
    proc = run(halo3d, 2, args, preload=True, env=env)
    check_ok(proc, 2, mode, "8x8x8", memory="device")
    burst = [tuple(map(int, m)) for m in re.findall(r"gpu-to-gpu burst=(\d+) in launches=(\d+)", proc.stderr)]
    assert burst == [(104, 4)] * 2, proc.stderr
    counts = [dict((k, int(v)) for k, v in re.findall(r" (\w+)=(\d+)", line))
              for line in re.findall(r"^fake_cuda counts .*$", proc.stderr, re.M)]
    assert len(counts) == 2, proc.stderr
    # the signal zeroed once, then written after each exchange's launch; one wait per sender and
    # exchange (transfer/ipc.h: the burst's number): from the other rank and from itself (the
    # 2x1x1 grid's neighbours along y and z) - the exchange's other 24 receives need none
    waits = 104 if hooks else 2 * 4
    assert all(c["event_record"] == 0 and c["write_value"] == 1 + 4 and c["wait_value"] == waits for c in counts), counts
    shared = [int(n) for n in re.findall(r"gpu-to-gpu receives waited with an earlier one=(\d+)", proc.stderr)]
    assert shared == ([] if hooks else [104 - 2 * 4] * 2), proc.stderr
    if mode == "direct":  # pack mode adds the program's MPI_Pack/MPI_Unpack launches
        assert all(c["launch"] == 4 + 4 for c in counts), counts  # the packs' and the unpacks' batches
    # one pointer query per device buffer an MPI call names (cuda/device.c: the classification
    # also tells the context; there were two): 26 sends' and 26 receives' buffers an exchange,
    # in pack mode also the typed and packed buffers of 26 packs and 26 unpacks
    queries = 4 * (52 if mode == "direct" else 52 + 104)
    if hooks:  # and one more for each device buffer's context: every message's, every pack's typed side
        queries += 4 * (52 if mode == "direct" else 52 + 52)
    assert all(c["pointer_attributes"] == queries for c in counts), counts


@pytest.mark.parametrize("route", ["staged", "gpu-to-gpu", "gpu-to-gpu+thread"])
def test_device_pack_async_on_the_fake_driver(halo3d, fake_cuda_env, route):
    # COMMLIB_DEVICE_PACK_ASYNC=1 (cuda/device.h): pack mode's MPI_Pack/MPI_Unpack between
    # device buffers return with their kernel queued, not waited for.  The stand-in driver
    # runs queued kernels and copies only when something waits (FAKE_CUDA_DEFER=1), reading
    # their sources then, so a result used before its kernel ran comes out wrong: the halo
    # verifies.  4 exchanges of 26 MPI_Pack and 26 MPI_Unpack per rank; without the knob each
    # waited for the stream (316 stream synchronisations staged, 218 GPU to GPU).
    args = ["--n", "8", "--radius", "2", "--quantities", "3", "--iters", "2", "--warmup", "2", "--mode", "pack",
            "--device"]
    env = {**fake_cuda_env, "COMMLIB_STATS": "1", "COMMLIB_DEVICE_PACK_ASYNC": "1", "FAKE_CUDA_KERNELS": "1",
           "FAKE_CUDA_DEFER": "1", "FAKE_CUDA_COUNTS": "1"}
    if route != "staged":  # a long COMMLIB_IPC_BURST_US: one burst per exchange, by its Waitall
        env.update({"COMMLIB_IPC": "1", "COMMLIB_IPC_BURST_US": "100000"})
    if route.endswith("thread"):
        env["COMMLIB_PROGRESS"] = "thread"
    proc = run(halo3d, 2, args, preload=True, env=env)
    check_ok(proc, 2, "pack", "8x8x8", memory="device")
    left = [int(n) for n in re.findall(r"device packs not waited for=(\d+)", proc.stderr)]
    counts = [dict((k, int(v)) for k, v in re.findall(r" (\w+)=(\d+)", line))
              for line in re.findall(r"^fake_cuda counts .*$", proc.stderr, re.M)]
    assert len(counts) == 2 and len(left) == 2, proc.stderr
    if route == "staged":
        # one wait per staged send (its one-shot pack into host staging), one per Waitall
        assert left == [4 * 52] * 2, proc.stderr
        assert all(c["stream_sync"] <= 4 * 26 + 4 + 2 for c in counts), counts
    elif route == "gpu-to-gpu":
        # the Waitall's receives and its sends' burst, as in direct mode; the bursts' stream
        # waits for the packs through one event recorded behind them per burst, not per op
        assert left == [4 * 52] * 2, proc.stderr
        assert all(c["stream_sync"] <= 2 * 4 + 2 and c["event_record"] <= 4 + 1 and c["stream_wait_event"] >= 4
                   for c in counts), counts
    else:
        # the progress thread finishes receives too; an MPI_Unpack behind its waits for the
        # other rank waits (device_async_try), so fewer are left queued
        assert all(0 < n <= 4 * 52 for n in left), proc.stderr


@pytest.mark.parametrize("route", ["staged", "gpu-to-gpu", "gpu-to-gpu+unkept", "gpu-to-gpu+thread", "no-cupti"])
def test_device_pack_hold_on_the_fake_driver(halo3d, fake_cuda_env, route):
    # COMMLIB_DEVICE_PACK_HOLD=1 (pack/device_hold.h): pack mode's MPI_Pack/MPI_Unpack between
    # device buffers are held back and launched together at the next CUDA call (the stand-in
    # driver is also the stand-in CUPTI: COMMLIB_CUPTI points at it).  Queued work runs only
    # when something waits (FAKE_CUDA_DEFER=1) and a batched launch runs its jobs last to first
    # (FAKE_CUDA_BATCH_ORDER=reverse), so a held op launched late, or in one launch with an op
    # it depends on, makes the halo fail its check.
    args = ["--n", "8", "--radius", "2", "--quantities", "3", "--iters", "2", "--warmup", "2", "--mode", "pack",
            "--device"]
    lib = os.path.join(fake_cuda_env["LD_LIBRARY_PATH"].split(os.pathsep)[0], "libcuda.so.1")
    env = {**fake_cuda_env, "COMMLIB_STATS": "1", "COMMLIB_DEVICE_PACK_HOLD": "1", "COMMLIB_CUPTI": lib,
           "FAKE_CUDA_KERNELS": "1", "FAKE_CUDA_DEFER": "1", "FAKE_CUDA_BATCH_ORDER": "reverse",
           "FAKE_CUDA_COUNTS": "1"}
    if route != "staged":  # a long COMMLIB_IPC_BURST_US: one burst per exchange, by its Waitall
        env.update({"COMMLIB_IPC": "1", "COMMLIB_IPC_BURST_US": "100000"})
    if route.endswith("thread"):
        env["COMMLIB_PROGRESS"] = "thread"
    if route.endswith("unkept"):  # every MPI call asks the driver about its device buffers
        env["COMMLIB_POINTER_CACHE"] = "0"
    if route == "no-cupti":  # CUPTI's one subscription taken (a profiler): launched one by one, as async
        env["FAKE_CUPTI_BUSY"] = "1"
    proc = run(halo3d, 2, args, preload=True, env=env)
    check_ok(proc, 2, "pack", "8x8x8", memory="device")
    held = [tuple(map(int, m)) for m in
            re.findall(r"device packs held=(\d+) in launches=(\d+) flushes=(\d+) \(overlap (\d+)\)", proc.stderr)]
    left = [int(n) for n in re.findall(r"device packs not waited for=(\d+)", proc.stderr)]
    counts = [dict((k, int(v)) for k, v in re.findall(r" (\w+)=(\d+)", line))
              for line in re.findall(r"^fake_cuda counts .*$", proc.stderr, re.M)]
    assert len(counts) == 2, proc.stderr
    if route == "no-cupti":
        assert "COMMLIB_DEVICE_PACK_HOLD: cuptiSubscribe" in proc.stderr and not held, proc.stderr
        assert left == [4 * 52] * 2 and all(c["launch"] >= 4 * 52 for c in counts), proc.stderr
        return
    assert len(held) == 2 and all(c["cupti_callbacks"] > 0 for c in counts), proc.stderr
    kept = [tuple(map(int, m)) for m in re.findall(r"device pointers kept: hits=(\d+) asked=(\d+)", proc.stderr)]
    if route.startswith("gpu-to-gpu") and not route.endswith("thread"):
        # 4 exchanges: the 26 packs launched by the burst's event record, the 26 unpacks by the
        # next exchange's first launch (or MPI_Finalize): 2 launches an exchange, not 52; the
        # halo's and the interior's boxes never taken for overlapping
        assert held == [(4 * 52, 4 * 2 + 1, 4 * 2 + 1, 0)] * 2, proc.stderr
        assert all(c["launch"] == 4 + 4 + 4 * 2 + 1 for c in counts), counts  # + bursts, batched receives
    if route == "gpu-to-gpu+unkept":
        # commlib's pointer queries (624 a rank: 3 for each pack or unpack with its message) do
        # not call back: their callbacks are off (cuda/cupti.c)
        assert not kept and all(c["pointer_attributes"] >= 4 * 156 for c in counts), counts
        assert all(0 < c["cupti_callbacks"] < c["pointer_attributes"] // 2 for c in counts), counts
    elif route == "gpu-to-gpu":
        # the device allocations kept while CUPTI watches (cuda/pointer_cache.h): asked about
        # again only after CUDA calls that allocate or map memory (commlib's own staging and
        # peer mappings, in the first exchanges), not 3 times for each op
        assert len(kept) == 2 and all(hits > 4 * asked for hits, asked in kept), proc.stderr
        assert all(c["pointer_attributes"] < 156 for c in counts), counts
    elif route == "staged":
        # every op held; each staged send's copy launches what is held before it
        assert all(h[0] == 4 * 52 and 0 < h[1] <= 4 * 52 and h[3] == 0 for h in held), proc.stderr
    else:
        # the progress thread's CUDA calls launch them sooner; an op behind its wait for the
        # other rank is not held (device_async_try), as with COMMLIB_DEVICE_PACK_ASYNC
        assert all(0 < h[0] <= 4 * 52 and 0 < h[1] <= h[0] and h[3] == 0 for h in held), proc.stderr


@pytest.mark.parametrize("mode", ["pack", "direct"])
def test_device_direct_from_the_senders_buffer_on_the_fake_driver(halo3d, fake_cuda_env, mode):
    # COMMLIB_IPC_DIRECT_BYTES=192 with the progress thread: every nonblocking send to the
    # other rank (18 of 26 per exchange; the 8 to itself use its arena) is read by the
    # receiver from the sender's buffer - the faces' strided pieces packed from it on the
    # receiver - so the sender launches nothing for them and records no event.
    args = ["--n", "8", "--radius", "2", "--quantities", "3", "--iters", "2", "--warmup", "2",
            "--mode", mode, "--device"]
    proc = run(halo3d, 2, args, preload=True,
               env={**fake_cuda_env, "COMMLIB_STATS": "1", "COMMLIB_IPC": "1", "FAKE_CUDA_KERNELS": "1",
                    "FAKE_CUDA_COUNTS": "1", "COMMLIB_PROGRESS": "thread", "COMMLIB_IPC_DIRECT_BYTES": "192"})
    check_ok(proc, 2, mode, "8x8x8", memory="device")
    ipc = [tuple(map(int, m)) for m in
           re.findall(r"gpu-to-gpu send=(\d+) recv=(\d+) fallback=(\d+) direct=(\d+)", proc.stderr)]
    assert ipc == [(104, 104, 0, 72)] * 2, proc.stderr
    counts = [dict((k, int(v)) for k, v in re.findall(r" (\w+)=(\d+)", line))
              for line in re.findall(r"^fake_cuda counts .*$", proc.stderr, re.M)]
    assert len(counts) == 2, proc.stderr
    # per exchange only the 8 sends to itself pack (a launch and an event record each); how many
    # launches the receives take depends on whether the program's Waitall or the progress
    # thread (after its 200 us grace, on a loaded machine) finished them: not counted
    assert all(c["event_record"] <= 8 * 4 for c in counts), counts


@pytest.mark.parametrize("mode", ["pack", "direct"])
@pytest.mark.parametrize("n", [1, 4])
def test_device_uneven_on_the_fake_driver(halo3d, fake_cuda_env, n, mode):
    proc = run(halo3d, n, ["--nx", "6", "--ny", "7", "--nz", "5", "--radius", "1", "--quantities", "2",
                           "--iters", "2", "--mode", mode, "--device"], preload=True, env=fake_cuda_env)
    check_ok(proc, n, mode, "6x7x5", memory="device")


@pytest.mark.parametrize("preload", [False, True])
@pytest.mark.parametrize("mode", ["pack", "direct"])
def test_stage_host_on_the_fake_driver(halo3d, fake_cuda_env, mode, preload):
    # The baseline of `commlib bench halo`: whole-grid copies around a host exchange,
    # with or without commlib.
    proc = run(halo3d, 2, [*SMALL, "--mode", mode, "--stage-host"], preload=preload, env=fake_cuda_env)
    check_ok(proc, 2, mode, "8x8x8", memory="stage-host")


@pytest.mark.parametrize("memory", ["device", "stage-host"])
def test_device_corrupt_is_detected(halo3d, fake_cuda_env, memory):
    proc = run(halo3d, 2, [*SMALL, f"--{memory}", "--corrupt"], preload=True, env=fake_cuda_env)
    m = summary(proc)
    assert m["verdict"] == "FAILED (1 mismatched cells)", m.group(0)
    assert proc.returncode == 1


def test_device_without_commlib_fails(halo3d, fake_cuda_env):
    # A host MPI that is not CUDA-aware cannot take device pointers: the run must fail
    # (here: MPICH reads PROT_NONE memory and crashes), not pass by accident, and the
    # example says why first.
    proc = run(halo3d, 2, [*SMALL, "--device"], preload=False, env=fake_cuda_env)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "verified=OK" not in proc.stdout
    assert "--device without commlib" in proc.stderr


def test_device_without_a_gpu(halo3d):
    if gpu_count() > 0:
        pytest.skip("this machine has a GPU")
    for memory in ("--device", "--stage-host"):
        proc = run(halo3d, 2, [*SMALL, memory], preload=PRELOAD)
        assert proc.returncode == NO_GPU_EXIT, proc.stdout + proc.stderr
        assert "no GPU to use" in proc.stderr and "verified=" not in proc.stdout


@pytest.mark.parametrize("memory", ["device", "stage-host"])
@pytest.mark.parametrize("mode", ["pack", "direct"])
def test_device_on_a_gpu(halo3d, mode, memory):
    if gpu_count() < 1:
        pytest.skip("no GPU (libcuda.so.1 with a device)")
    proc = run(halo3d, 2, ["--n", "24", "--radius", "2", "--iters", "3", "--mode", mode, f"--{memory}"],
               preload=True, env={"COMMLIB_STATS": "1"})
    check_ok(proc, 2, mode, "24x24x24", memory=memory)
    if memory == "device":
        assert staged_counts(proc) == [(130, 130)] * 2, proc.stderr


# ---------------------------------------------------------------- the Python example

class DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def defined_by_commlib(name):
    """Whether libcommlib.so itself defines `name` (dlsym would also find libmpi's)."""
    lib = ctypes.CDLL(paths.preload_library())
    if not hasattr(lib, name):
        return False
    info = DlInfo()
    address = ctypes.cast(getattr(lib, name), ctypes.c_void_p)
    if not ctypes.CDLL(None).dladdr(address, ctypes.byref(info)):
        return False
    return os.path.realpath(info.dli_fname.decode()) == os.path.realpath(paths.preload_library())


def mpi4py_uses_uncaught_large_count():
    """mpi4py 4 calls the MPI-4 large-count forms (MPI_Isend_c, ...) where the MPI has
    them; commlib sees those calls only if it defines them too."""
    try:
        standard = float(native.build_info()["mpi_standard"])
        return standard >= 4 and not all(defined_by_commlib(f) for f in ("MPI_Isend_c", "MPI_Irecv_c"))
    except (OSError, KeyError, ValueError, FileNotFoundError):
        return False


LARGE_COUNT_GAP = pytest.mark.xfail(
    mpi4py_uses_uncaught_large_count(), strict=False,
    reason="mpi4py sends with MPI_Isend_c / MPI_Irecv_c on this MPI, which commlib does not intercept")


@pytest.mark.parametrize("preload", [False, True])
@pytest.mark.parametrize("mode", ["pack", "direct"])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_python_verified(n, mode, preload):
    proc = run(HALO_PY, n, [*SMALL, "--mode", mode], preload=preload and PRELOAD)
    m = check_ok(proc, n, mode, "8x8x8")
    assert m["prog"] == "halo3d.py"


@pytest.mark.parametrize("mode", ["pack", "direct"])
@pytest.mark.parametrize("n", [2, 4])
def test_python_stage_host_knob(n, mode):
    # COMMLIB_STAGE_HOST=1: commlib sends the numpy buffers through its staged device
    # path, as if they were device memory.
    proc = run(HALO_PY, n, [*SMALL, "--mode", mode], preload=True, env={"COMMLIB_STAGE_HOST": "1"})
    check_ok(proc, n, mode, "8x8x8")


@LARGE_COUNT_GAP
def test_python_stage_host_knob_stages():
    proc = run(HALO_PY, 2, [*SMALL, "--mode", "direct"], preload=True,
               env={"COMMLIB_STAGE_HOST": "1", "COMMLIB_STATS": "1"})
    check_ok(proc, 2, "direct", "8x8x8")
    counts = staged_counts(proc)
    # at least the 26 sends and receives of 4 exchanges (mpi4py may move its pickled
    # allreduce through point-to-point calls too)
    assert len(counts) == 2 and all(s >= 104 and r >= 104 for s, r in counts), proc.stderr


@pytest.mark.parametrize("mode", ["pack", "direct"])
def test_python_matches_c(halo3d, mode):
    args = ["--nx", "6", "--ny", "5", "--nz", "4", "--radius", "2", "--quantities", "3",
            "--iters", "2", "--mode", mode]
    c = summary(run(halo3d, 3, args, preload=False)).group(0)
    py = summary(run(HALO_PY, 3, args, preload=False)).group(0)
    assert without_time(py) == without_time(c).replace("halo3d:", "halo3d.py:", 1)
    assert py.endswith("verified=OK")


PHASES = re.compile(r"^halo3d(?:\.py)? phases \(us per exchange, slowest rank\): post-recv=(?P<post>[0-9.]+) "
                    r"pack\+send=(?P<send>[0-9.]+) waitall=(?P<wait>[0-9.]+) unpack=(?P<unpack>[0-9.]+) "
                    r"sync=(?P<sync>[0-9.]+)$", re.M)


@pytest.mark.parametrize("program", ["c", "python"])
@pytest.mark.parametrize("mode", ["pack", "direct"])
def test_phases(halo3d, program, mode):
    """--phases: where an exchange's time goes.  Each part is its slowest rank's, so together
    they cover the slowest rank's whole exchange (time/exchange); host memory has no device
    work to wait for."""
    proc = run(halo3d if program == "c" else HALO_PY, 2, [*SMALL, "--mode", mode, "--phases"], preload=False)
    m = check_ok(proc, 2, mode, "8x8x8")
    found = PHASES.findall(proc.stdout)
    assert len(found) == 1, proc.stdout
    parts = {k: float(v) for k, v in PHASES.search(proc.stdout).groupdict().items()}
    assert parts["wait"] > 0 and parts["send"] > 0 and parts["sync"] == 0, parts
    # (what runs between the clock reads around step() and the parts' own is not in them:
    # a function call, a preemption on a loaded machine)
    assert parts["post"] + parts["send"] + parts["wait"] + parts["unpack"] >= 0.8 * float(m["time"]) - 2, (parts, m)
    if mode == "pack":
        assert parts["unpack"] > 0, parts
    without = run(halo3d if program == "c" else HALO_PY, 2, [*SMALL, "--mode", mode], preload=False)
    assert not PHASES.search(without.stdout), without.stdout


def test_phases_on_the_fake_driver(halo3d, fake_cuda_env):
    # device memory: the device synchronisation after each exchange (the stand-in counts it)
    # is its own part, outside time/exchange; held unpacks are launched there
    args = ["--n", "8", "--iters", "3", "--warmup", "1", "--mode", "pack", "--device", "--phases"]
    proc = run(halo3d, 2, args, preload=True,
               env={**fake_cuda_env, "FAKE_CUDA_KERNELS": "1", "FAKE_CUDA_COUNTS": "1", "COMMLIB_IPC": "1",
                    "COMMLIB_DEVICE_PACK_HOLD": "1"})
    check_ok(proc, 2, "pack", "8x8x8", memory="device")
    assert len(PHASES.findall(proc.stdout)) == 1, proc.stdout
    syncs = [int(v) for v in re.findall(r"^fake_cuda counts .* stream_sync=(\d+)", proc.stderr, re.M)]
    plain = run(halo3d, 2, args[:-1], preload=True,
                env={**fake_cuda_env, "FAKE_CUDA_KERNELS": "1", "FAKE_CUDA_COUNTS": "1", "COMMLIB_IPC": "1",
                     "COMMLIB_DEVICE_PACK_HOLD": "1"})
    check_ok(plain, 2, "pack", "8x8x8", memory="device")
    plain_syncs = [int(v) for v in re.findall(r"^fake_cuda counts .* stream_sync=(\d+)", plain.stderr, re.M)]
    assert len(syncs) == 2 and [a - b for a, b in zip(syncs, plain_syncs)] == [4, 4], (syncs, plain_syncs)


@pytest.mark.parametrize("mode", ["pack", "direct"])
def test_python_corrupt_is_detected(mode):
    proc = run(HALO_PY, 2, [*SMALL, "--mode", mode, "--corrupt"], preload=False)
    m = summary(proc)
    assert m["verdict"] == "FAILED (1 mismatched cells)", m.group(0)
    assert proc.returncode == 1
    assert "first mismatch" in proc.stderr


@pytest.mark.parametrize("args", [["--bogus"], ["--mode", "sideways"], ["--n", "four"],
                                  ["--n", "4", "--radius", "5"], ["--radius", "0"], ["--iters"],
                                  ["--device", "--stage-host"]])
def test_python_bad_flag_exits_2(args):
    proc = run(HALO_PY, 2, args, preload=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.count("usage:") == 1     # rank 0 alone
    assert "verified=" not in proc.stdout


def test_python_help():
    proc = run(HALO_PY, 1, ["--help"], preload=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "usage:" in proc.stdout and "--stage-host" in proc.stdout and "--corrupt" not in proc.stdout


def have_cupy():
    return importlib.util.find_spec("cupy") is not None


@pytest.mark.parametrize("memory", ["device", "stage-host"])
def test_python_device_without_cupy_or_gpu(memory):
    if have_cupy() and gpu_count() > 0:
        pytest.skip("cupy and a GPU are here")
    proc = run(HALO_PY, 2, [*SMALL, f"--{memory}"], preload=False)
    assert proc.returncode == NO_GPU_EXIT, proc.stdout + proc.stderr
    assert "no GPU to use" in proc.stderr and "verified=" not in proc.stdout


@pytest.mark.parametrize("memory", [pytest.param("device", marks=LARGE_COUNT_GAP), "stage-host"])
@pytest.mark.parametrize("mode", ["pack", "direct"])
def test_python_device_on_a_gpu(mode, memory):
    if not have_cupy() or gpu_count() < 1:
        pytest.skip("needs cupy and a GPU")
    proc = run(HALO_PY, 2, ["--n", "24", "--iters", "3", "--mode", mode, f"--{memory}"], preload=True,
               env={"COMMLIB_STATS": "1"})
    check_ok(proc, 2, mode, "24x24x24", memory=memory)
    if memory == "device":
        assert staged_counts(proc) == [(130, 130)] * 2, proc.stderr
