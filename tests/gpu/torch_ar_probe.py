"""Where does a DDP bucket's all-reduce spend its time?  Under mpiexec (commlib run), N ranks:
the same 25 MiB float32 all-reduce through MPIComm, through dist.all_reduce on the commlib
backend (blocking, and async waited through the future), and gloo (a second group).
Prints the median ms per path (rank 0).  Not a test: a probe for the note."""
import statistics
import sys
import time

import torch
import torch.distributed as dist

import collectives.torch  # noqa: F401
from collectives.mpi import MPIComm

dist.init_process_group("commlib")
gloo = dist.new_group(backend="gloo")
r, n = dist.get_rank(), dist.get_world_size()
mib = float(sys.argv[1]) if len(sys.argv) > 1 else 25.0
t = torch.ones(int(mib * 2 ** 20 / 4))
comm = MPIComm()


def timeit(fn, reps=15):
    out = []
    for _ in range(reps):
        dist.barrier(group=gloo)
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(out[3:])


rows = {
    "MPIComm.all_reduce": lambda: comm.all_reduce(t),
    "MPIComm async+wait": lambda: comm.all_reduce(t, async_op=True).wait(),
    "dist.all_reduce commlib": lambda: dist.all_reduce(t),
    "commlib future.wait": lambda: dist.all_reduce(t, async_op=True).get_future().wait(),
    "3 async then futures": lambda: [f.wait() for f in [dist.all_reduce(t, async_op=True).get_future() for _ in range(3)]],
    "dist.all_reduce gloo": lambda: dist.all_reduce(t, group=gloo),
}
res = {k: timeit(f) for k, f in rows.items()}
if r == 0:
    busbw = lambda ms: mib * 2 ** 20 * 2 * (n - 1) / n / (ms / 1e3) / 1e9  # noqa: E731
    for k, v in res.items():
        print(f"{k:26s} {v:8.2f} ms  busbw {busbw(v if '3 async' not in k else v / 3):6.2f} GB/s", flush=True)
dist.destroy_process_group()
