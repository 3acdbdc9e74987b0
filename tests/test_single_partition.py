"""A partitioned operation of one partition waits for ready(0) (it used to start at once,
reducing what the buffer held before the producer wrote it: collectives.overlap with
chunks=1 returned garbage).  tests/single_partition_worker.py checks it on every rank."""
import os
import sys

import pytest

from harness import TESTS_DIR, run_mpi

WORKER = os.path.join(TESTS_DIR, "single_partition_worker.py")


@pytest.mark.parametrize("ranks,transport", [(2, "auto"), (3, "mpi")])
def test_one_partition_waits_for_ready(ranks, transport):
    proc = run_mpi(ranks, [sys.executable, WORKER], env={"COMMLIB_ENGINE_TRANSPORT": transport}, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert out.count("single_partition: OK") == ranks, out
    assert f"transport={'mpi' if transport == 'mpi' else 'shm'}" in proc.stdout, out
