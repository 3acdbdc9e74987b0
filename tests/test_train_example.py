"""examples/train_mpi.py under `commlib run`: data-parallel training with async all-reduces
overlapping backward, checked by the example itself (parameters identical on every rank
at every step, equal to one process on the global batch, the loss falls, a row-parallel
layer through collectives.overlap equals the plain product)."""
import os

import pytest

from harness import ROOT, run_mpi
import sys

EXAMPLE = os.path.join(ROOT, "examples", "train_mpi.py")


@pytest.mark.parametrize("ranks,transport", [(4, "auto"), (3, "mpi")])
def test_train_example_verifies_itself(ranks, transport, tmp_path):
    env = {"COMMLIB_ENGINE_TRANSPORT": transport}
    proc = run_mpi(ranks, [sys.executable, EXAMPLE, "--steps", "20"], env=env, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "train_mpi: OK" in proc.stdout, out
    assert f"ranks={ranks}" in proc.stdout and ("transport=mpi" in proc.stdout) == (transport == "mpi"), out
