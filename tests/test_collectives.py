"""Collectives whose buffers commlib stages through host copies.  On a CPU-only machine
COMMLIB_STAGE_HOST=1 stages host buffers through the same code as device buffers."""
import re

import pytest

from harness import build_c, run_mpi


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    return build_c("tests/c/collectives_staged.c", tmp_path_factory.mktemp("coll"))


def summary(proc):
    m = re.search(r"collectives: ranks=(\d+) checks=(\d+) failures=(\d+) staged=(-?\d+)", proc.stdout)
    assert m, proc.stdout + proc.stderr
    return [int(x) for x in m.groups()]


@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
def test_staged_collectives(program, ranks):
    proc = run_mpi(ranks, [program], env={"COMMLIB_STAGE_HOST": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    n, checks, failures, staged = summary(proc)
    assert n == ranks and failures == 0 and checks == 9
    # each of the nine collectives before the count went through staging
    assert staged == 9, f"staging was not used for every call: {staged}"


def test_same_program_without_staging(program):
    plain = run_mpi(3, [program], preload=False)
    assert plain.returncode == 0, plain.stderr
    n, checks, failures, staged = summary(plain)
    assert failures == 0 and staged == -1
    unstaged = run_mpi(3, [program])
    assert summary(unstaged)[2:] == [0, 0]  # host buffers, no CUDA: nothing staged
