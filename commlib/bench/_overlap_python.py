"""The Python ranks of `commlib bench overlap` (run under mpiexec by commlib/bench/overlap.py,
not by hand): the OSU method of native/bench/bench_overlap.c applied to an all-reduce that a
training script posts from Python.

    --method engine   MPIComm.all_reduce(x, async_op=True), then Work.wait()  (commlib's
                      collective engine: its own thread moves the operation)
    --method mpi4py   mpi4py's Iallreduce(MPI.IN_PLACE, x), then Request.Wait() (the host
                      MPI alone, on a duplicate of MPI_COMM_WORLD)

The operation is the C rows' one: doubles, sum, the same byte counts (in place here, where
the C program has separate send and receive buffers).  Per size, as in the C program: pure
comm (post + wait), a compute calibrated to last as long as the pure comm (the largest over
the ranks), timed alone, overall (post, compute, wait) and overlap % = max(0, 100 * (1 -
(overall - compute) / pure)), each the largest over the ranks; a first operation on
patterned data checks the result ("verified").

The compute releases the GIL and uses one core:
    --compute spin    (default) the C program's own compute loop (a floating-point
                      dependency chain, no memory traffic), native/bench/compute_spin.c,
                      called through ctypes, which releases the GIL for the call;
    --compute matmul  numpy matmuls of a cache-resident --matrix x --matrix float64 matrix
                      (numpy releases the GIL inside them); the driver sets
                      OPENBLAS_NUM_THREADS=OMP_NUM_THREADS=MKL_NUM_THREADS=1 for the run,
                      so that the product uses one core.  The compute is a whole number of
                      products (at least one: small messages get a longer compute than
                      their pure time).

Output, on rank 0, is the C program's: "# key=value" lines, "# note" lines, then CSV with
the same columns (progress_completed is -1; engine_served counts the engine's operations
during the timed overall loop, -1 for mpi4py).
"""
import argparse
import ctypes
import sys
import time

import numpy as np

COLUMNS = ("op,buffer,bytes,iters,pure_us,compute_us,overall_us,overlap_pct,post_us,wait_us,verified,"
           "progress_completed,engine_served")


def now_us():
    return time.perf_counter() * 1e6


class Spin:
    def __init__(self, library):
        self.fn = ctypes.CDLL(library).commlib_bench_spin
        self.fn.argtypes = [ctypes.c_long]
        self.fn.restype = None

    def __call__(self, loops):
        self.fn(int(loops))


class Matmul:
    def __init__(self, n):
        rng = np.random.default_rng(1)
        self.a = rng.random((n, n)) / n
        self.b = rng.random((n, n)) / n
        self.c = np.empty((n, n))

    def __call__(self, loops):
        a, b, c = self.a, self.b, self.c
        for _ in range(max(1, int(round(loops)))):
            np.matmul(a, b, out=c)


def calibrate(compute, first):
    """Units of compute per microsecond (spin: loops; matmul: products), from >= 20 ms."""
    units = first
    while True:
        t0 = now_us()
        compute(units)
        t = now_us() - t0
        if t > 20000:
            return units / t
        units *= 2


def iterations_for(one_us, target_ms, quick):
    lo, hi = (3, 200) if quick else (10, 2000)
    n = target_ms * 1000.0 / one_us if one_us > 0 else hi
    return int(min(hi, max(lo, n)))


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m commlib.bench._overlap_python")
    p.add_argument("--method", choices=("engine", "mpi4py"), required=True)
    p.add_argument("--sizes", required=True, help="bytes, comma-separated")
    p.add_argument("--target-ms", type=float, default=200)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--compute", choices=("spin", "matmul"), default="spin")
    p.add_argument("--spin-library", help="compute_spin.c built as a shared library (--compute spin)")
    p.add_argument("--matrix", type=int, default=64, help="--compute matmul: the matrix order")
    opts = p.parse_args(argv)
    opts.size_list = [int(s) for s in opts.sizes.split(",") if s]
    if opts.compute == "spin" and not opts.spin_library:
        p.error("--compute spin needs --spin-library")
    return opts


def main(argv=None):
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    from mpi4py import MPI
    world = MPI.COMM_WORLD
    rank, size = world.rank, world.size

    def largest(v):
        return world.allreduce(v, op=MPI.MAX)

    if opts.method == "engine":
        from collectives import mpi as cmpi
        comm = cmpi.MPIComm()
        transport = comm.transport  # "shm" or "mpi"

        def post(x):
            return comm.all_reduce(x, async_op=True)

        def wait(w):
            w.wait()

        def served():
            return cmpi.stat("engine.ops")
        barrier = world.Barrier
    else:
        comm = world.Dup()
        transport = "host MPI"

        def post(x):
            return comm.Iallreduce(MPI.IN_PLACE, x, op=MPI.SUM)

        def wait(r):
            r.Wait()

        def served():
            return -1
        barrier = world.Barrier

    compute = Spin(opts.spin_library) if opts.compute == "spin" else Matmul(opts.matrix)
    per_us = calibrate(compute, 1 << 16 if opts.compute == "spin" else 1)

    if rank == 0:
        version = " ".join(MPI.Get_library_version().split())
        level = {MPI.THREAD_SINGLE: "single", MPI.THREAD_FUNNELED: "funneled", MPI.THREAD_SERIALIZED: "serialized",
                 MPI.THREAD_MULTIPLE: "multiple"}.get(MPI.Query_thread(), "unknown")
        print(f"# mpi_library={version[:200]}\n# ranks={size}\n# thread_level={level}\n# method={opts.method}\n"
              f"# transport={transport.replace(' ', '_')}\n# compute={opts.compute}\n"
              f"# compute_units_per_us={per_us:.4g}\n# target_ms={opts.target_ms:g}\n# device=none")
        print("# device buffers not measured (the Python rows are host arrays)")
        print(COLUMNS, flush=True)

    for nbytes in opts.size_list:
        n = max(1, nbytes // 8)
        x = np.empty(n, np.float64)
        # verify: patterned data, one operation
        idx = np.arange(n) % 1000
        x[:] = (rank + 1) + idx
        wait(post(x))
        want = sum(r + 1 for r in range(size)) + size * idx
        ok = bool(np.array_equal(x, want))
        verified = world.allreduce(ok, op=MPI.LAND)
        x[:] = 0  # the timed operations sum zeros (no growth to inf)

        t0 = now_us()
        for _ in range(2):
            wait(post(x))
        iters = iterations_for(largest((now_us() - t0) / 2), opts.target_ms, opts.quick)

        barrier()
        t0 = now_us()
        for _ in range(iters):
            wait(post(x))
        pure = largest((now_us() - t0) / iters)

        units = pure * per_us
        barrier()
        t0 = now_us()
        for _ in range(iters):
            compute(units)
        compute_us = largest((now_us() - t0) / iters)

        before = served()
        posting = waiting = 0.0
        barrier()
        t0 = now_us()
        for _ in range(iters):
            a = now_us()
            w = post(x)
            c = now_us()
            compute(units)
            d = now_us()
            wait(w)
            posting += c - a
            waiting += now_us() - d
        overall = largest((now_us() - t0) / iters)
        post_us, wait_us = largest(posting / iters), largest(waiting / iters)
        after = served()
        engine_served = -1 if before < 0 else after - before
        overlap = 100.0 * (1.0 - (overall - compute_us) / pure) if pure > 0 else 0.0
        overlap = min(100.0, max(0.0, overlap))
        if rank == 0:
            print(f"iallreduce,host,{n * 8},{iters},{pure:.3f},{compute_us:.3f},{overall:.3f},{overlap:.2f},"
                  f"{post_us:.3f},{wait_us:.3f},{'yes' if verified else 'no'},-1,{engine_served}", flush=True)
    if opts.method == "engine":
        comm.close()
    else:
        comm.Free()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        # the other ranks would wait in a collective until the driver's timeout
        import traceback
        traceback.print_exc()
        sys.stderr.flush()
        from mpi4py import MPI
        MPI.COMM_WORLD.Abort(1)
