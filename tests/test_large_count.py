"""The MPI-4 large-count entry points (MPI_Send_c, MPI_Allreduce_c, ...) reach commlib's
staging: mpi4py calls them whenever the MPI has them.  Under COMMLIB_STAGE_HOST=1 host
buffers are staged like device buffers, so the counters prove the route on any machine."""
import os
import re
import subprocess
import sys
import textwrap

import pytest

from commlib import native
from harness import commlib_cli

PROGRAM = textwrap.dedent("""
    import ctypes, numpy as np
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    peer = (rank + 1) % size
    every_other = MPI.DOUBLE.Create_vector(5, 1, 2).Commit()
    src = np.arange(10, dtype=np.float64) + 100 * rank
    dst = np.full(10, -1.0)
    reqs = [comm.Irecv([dst, 1, every_other], source=(rank - 1) % size, tag=3),
            comm.Isend([src, 1, every_other], dest=peer, tag=3)]
    MPI.Request.Waitall(reqs)
    left = (rank - 1) % size
    ok = all(dst[2 * i] == 2 * i + 100 * left and dst[2 * i + 1] == -1.0 for i in range(5))
    # persistent requests (MPI_Send_init_c, MPI_Recv_init_c) started with new data each time
    got = np.full(10, -1.0)
    preqs = [comm.Recv_init([got, 1, every_other], source=left, tag=4),
             comm.Send_init([src, 1, every_other], dest=peer, tag=4)]
    for it in range(3):
        src[:] = np.arange(10) + 100 * rank + 1000 * it
        MPI.Prequest.Startall(preqs)
        MPI.Request.Waitall(preqs)
        ok = ok and all(got[2 * i] == 2 * i + 100 * left + 1000 * it and got[2 * i + 1] == -1.0 for i in range(5))
    for r in preqs:
        r.Free()
    b = np.arange(6.0) if rank == 0 else np.zeros(6)
    comm.Ibcast(b, root=0).Wait()  # MPI_Ibcast_c
    ok = ok and (b == np.arange(6.0)).all()
    total = np.zeros(4)
    comm.Allreduce(np.full(4, rank + 1.0), total)
    ok = ok and (total == size * (size + 1) / 2).all()
    counts, displs = [2] * size, [2 * j for j in range(size)]  # MPI_Ialltoallv_c
    sa, ra = np.arange(2.0 * size) + 100 * rank, np.full(2 * size, -1.0)
    comm.Ialltoallv([sa, (counts, displs), MPI.DOUBLE], [ra, (counts, displs), MPI.DOUBLE]).Wait()
    ok = ok and all(ra[2 * j + t] == 2 * rank + t + 100 * j for j in range(size) for t in range(2))
    lib = ctypes.CDLL(None)
    lib.commlib_stat.restype = ctypes.c_longlong
    staged = lib.commlib_stat(b"p2p.staged_send") + lib.commlib_stat(b"p2p.staged_recv")
    colls = lib.commlib_stat(b"collective.staged")
    print(f"rank {rank}: ok={ok} staged={staged} collectives={colls}", flush=True)
    every_other.Free()
""")


@pytest.mark.skipif(not native.build_info()["mpi_standard"].startswith(("4", "5")),
                    reason="an MPI-3 library has no large-count functions")
def test_mpi4py_large_count_calls_are_staged(tmp_path):
    script = tmp_path / "large_count.py"
    script.write_text(PROGRAM)
    env = dict(os.environ, COMMLIB_STAGE_HOST="1")
    proc = subprocess.run([*commlib_cli(), "run", "-n", "2", "--", sys.executable, str(script)],
                          capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # two ranks print at once: their lines may interleave, so match records, not lines
    records = re.findall(r"rank (\d): ok=(\w+) staged=(\d+) collectives=(\d+)", proc.stdout)
    assert sorted(r[0] for r in records) == ["0", "1"], proc.stdout + proc.stderr
    for rank, ok, staged, collectives in records:
        assert ok == "True", records
        assert int(staged) >= 2 + 6 and int(collectives) >= 3, records  # Ibcast, Allreduce, Ialltoallv
