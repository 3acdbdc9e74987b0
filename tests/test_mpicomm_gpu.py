"""MPIComm with GPU tensors (tests/mpicomm_gpu_worker.py): torch CUDA and cupy through
every collective over the MPI that is not CUDA-aware, the stream rules, partitions
declared with ready_after on a stream whose kernels are still queued, and the fused
producer pipelines on CUDA.  Skips without a GPU and torch."""
import os
import re
import sys

import pytest

from harness import TESTS_DIR, gpu_count, run_mpi


def have_torch_cuda():
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False


@pytest.mark.parametrize("ranks,transport", [(2, "auto"), (2, "mpi"), (3, "auto")])
def test_gpu_tensors(ranks, transport, tmp_path):
    if gpu_count() < 1 or not have_torch_cuda():
        pytest.skip("no GPU with torch")
    proc = run_mpi(ranks, [sys.executable, os.path.join(TESTS_DIR, "mpicomm_gpu_worker.py")],
                   env={"COMMLIB_ENGINE_TRANSPORT": transport}, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    results = re.findall(r"^case (\S+) (ok|FAIL.*)$", proc.stdout, re.M)
    assert results and all(status == "ok" for _, status in results), out
    assert len({name for name, _ in results}) >= 5, out
    assert proc.stdout.count("done") == ranks, out
