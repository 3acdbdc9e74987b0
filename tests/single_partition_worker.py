"""Run by tests/test_single_partition.py under `commlib run`: a partitioned operation of
one partition waits for ready(0) like one of several (the input is written only after the
call, then declared ready), and collectives.overlap with chunks=1 equals the unfused
computation.  Prints "single_partition: OK" or the differences; exit status 1 on any."""
import sys
import time

import numpy as np

from collectives import overlap
from collectives.mpi import MPIComm


def main():
    comm = MPIComm()
    r, n = comm.rank, comm.size
    bad = []
    for parts in (1, 2):
        # all-reduce: 5 rows of 3
        x = np.zeros((5, 3), np.float32)
        p = comm.all_reduce_partitioned(x, partitions=parts)
        time.sleep(0.05)       # the engine would have moved an un-gated partition by now
        x[:] = r + 1
        for i in range(parts):
            p.ready(i)
        p.wait()
        if not np.all(x == n * (n + 1) / 2):
            bad.append(f"all_reduce_partitioned({parts}): {x.ravel()[:4]}")
        # reduce-scatter: 2 rows per rank
        x = np.zeros((2 * n, 3), np.float32)
        p = comm.reduce_scatter_partitioned(x, partitions=parts)
        time.sleep(0.05)
        x[:] = np.arange(2 * n, dtype=np.float32)[:, None] + r
        for i in range(parts):
            p.ready(i)
        out = p.wait()
        want = n * (np.arange(2 * r, 2 * r + 2, dtype=np.float32)[:, None]) + n * (n - 1) / 2
        if not np.array_equal(out, np.broadcast_to(want, (2, 3))):
            bad.append(f"reduce_scatter_partitioned({parts}): {out.ravel()[:4]}")
        # all-gather: 4 rows of 2
        x = np.zeros((4, 2), np.float32)
        p = comm.all_gather_partitioned(x, partitions=parts)
        time.sleep(0.05)
        x[:] = r + 1
        for i in range(parts):
            p.ready(i)
        out = p.wait()
        if not all(np.all(out[q] == q + 1) for q in range(n)):
            bad.append(f"all_gather_partitioned({parts}): {out[:, 0, 0]}")
    rng = np.random.default_rng(r)
    a = rng.standard_normal((6 * n, 8)).astype(np.float32)
    b = np.random.default_rng(99).standard_normal((8, 5)).astype(np.float32)
    y = a @ b
    comm.all_reduce(y)
    rows = np.array_split(np.arange(6 * n), n)[r]
    gathered = comm.all_gather(a)
    for chunks in (1, 3):
        for name, got, want in (("matmul_all_reduce", overlap.matmul_all_reduce(a, b, comm, chunks), y),
                                ("matmul_reduce_scatter", overlap.matmul_reduce_scatter(a, b, comm, chunks), y[rows]),
                                ("all_gather_matmul", overlap.all_gather_matmul(a, b, comm, chunks),
                                 gathered.reshape(-1, 8) @ b)):
            if not np.allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max())):
                bad.append(f"{name} chunks={chunks}: off by {float(np.abs(got - want).max())}")
    comm.close()
    for line in bad:
        print(f"rank {r}: {line}", flush=True)
    print(f"single_partition: {'OK' if not bad else 'FAILED'} ranks={n} transport={comm.transport}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
