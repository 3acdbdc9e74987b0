"""Slice size and depth of the engine's shared-memory all-reduce against MPI_Allreduce, on
the ranks of one node (tuning aid for COMMLIB_ENGINE_SLICE_KB / COMMLIB_ENGINE_DEPTH; run
under mpiexec with the knobs set).  Prints bus bandwidth per size, engine and MPI."""
import sys
import time

import numpy as np
from mpi4py import MPI

import collectives

comm = collectives.init()
world = MPI.COMM_WORLD
label = sys.argv[1] if len(sys.argv) > 1 else ""
line = []
for mib in (1, 4, 16, 64):
    n = mib << 18
    x = np.ones(n, np.float32)
    res = {}
    for name, f in (("engine", lambda: comm.all_reduce(x)), ("mpi", lambda: world.Allreduce(MPI.IN_PLACE, x))):
        f()
        reps = max(3, 64 // mib)
        times = []
        for _ in range(reps):
            world.Barrier()
            t0 = time.perf_counter()
            f()
            times.append(time.perf_counter() - t0)
        res[name] = float(np.median(times))
    bus = lambda t: 2 * (world.size - 1) / world.size * n * 4 / t / 1e9  # noqa: E731
    line.append(f"{mib}M {bus(res['engine']):.2f}/{bus(res['mpi']):.2f}")
if world.rank == 0:
    print(f"{label:24s} " + "  ".join(line), flush=True)
