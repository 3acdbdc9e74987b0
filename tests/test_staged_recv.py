"""Staged receives touch only what a receive into the program's own buffer would touch
(tests/c/staged_recv.c): short messages into types with more pieces than commlib keeps,
an indexed type with an empty block, a struct with gaps, a type whose extent is far
larger than the message, a long double; every receive call, the receive side of
Bcast/Ibcast/Alltoallv and a cancelled receive.  Buffers end where the message's last
byte lands (a guard page after them, or a device allocation of exactly that size), the
program writes into a gap of the type map while the receive is pending, and data and
statuses are compared with the host MPI's own receive in the same run.

Host memory goes through the staged path with COMMLIB_STAGE_HOST=1; device memory
through the stand-in driver (which fails any copy that leaves its allocation) with and
without its CPU-run kernels, and on a real GPU where there is one."""
import re

import pytest

from harness import build_c, gpu_count, run_mpi


@pytest.fixture(scope="module")
def staged_recv(tmp_path_factory):
    return build_c("tests/c/staged_recv.c", tmp_path_factory.mktemp("staged_recv"))


def run(exe, env, args=(), preload=True):
    proc = run_mpi(2, [exe, *args], env=env, preload=preload, timeout=300)
    out = proc.stdout
    assert proc.returncode == 0 and "FAIL" not in out, f"rc={proc.returncode}\n{out}\n{proc.stderr}"
    m = re.search(r"checked (\d+) cases \((\d+) checks\), failures=0", out)
    assert m and int(m.group(1)) >= 90 and int(m.group(2)) >= 500, out
    stats = re.search(r"stats: staged_recv=(-?\d+) staged_typed=(-?\d+) collective_staged=(-?\d+)", out)
    return tuple(map(int, stats.groups()))


def test_the_program_is_right_without_commlib(staged_recv):
    assert run(staged_recv, {}, preload=False) == (-1, -1, -1)


def test_host_buffers_staged(staged_recv):
    recv, typed, collective = run(staged_recv, {"COMMLIB_STAGE_HOST": "1"})
    # every receive was staged (86 = 14 messages x 6 calls + 2 cancelled); the types commlib
    # leaves to the MPI took the span path; the collectives were staged too
    assert recv >= 80 and typed >= 40 and collective >= 12, (recv, typed, collective)


@pytest.mark.parametrize("kernels", [False, True])
def test_device_buffers_on_the_fake_driver(staged_recv, fake_cuda_env, kernels):
    # the stand-in runs commlib's kernels on the CPU whenever FAKE_CUDA_KERNELS is set at all
    env = {**fake_cuda_env, "COMMLIB_STAGE_HOST": "0", **({"FAKE_CUDA_KERNELS": "1"} if kernels else {})}
    recv, typed, collective = run(staged_recv, env, ["device"])
    assert recv >= 80 and typed >= 40 and collective >= 12, (recv, typed, collective)


def test_device_buffers_on_a_gpu(staged_recv):
    if gpu_count() < 1:
        pytest.skip("no GPU (libcuda.so.1 with a device)")
    recv, typed, collective = run(staged_recv, {"COMMLIB_STAGE_HOST": "0"}, ["device"])
    assert recv >= 80 and typed >= 40 and collective >= 12, (recv, typed, collective)
