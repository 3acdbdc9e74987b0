"""MPI-4 partitioned point-to-point (MPI_Psend_init / MPI_Precv_init, MPI_Pready,
MPI_Pready_range, MPI_Pready_list, MPI_Parrived) through commlib (tests/c/partitioned.c).

The program runs without commlib (it must be right on the host MPI alone), with host
buffers forwarded (plain preload, COMMLIB_DISABLE), with host buffers staged
(COMMLIB_STAGE_HOST=1, where MPI_BOTTOM buffers stay unstaged: staged sides meet host
peers both ways), and with device buffers against the stand-in driver
(tests/c/fake_cuda.c) without and with its CPU-run kernels, by the device method and, with
device memory the host MPI may read, the CUDA-aware one; on a real GPU where there is one.
An MPI without partitioned calls (MPI-3, such as Open MPI 4) makes the program print a
skip line."""
import re

import pytest

from harness import build_c, gpu_count, run_mpi

SUMMARY = re.compile(r"^partitioned: rank (\d) seed=(\d+) mode=(\w+) threads=(\d) cases=(\d+) iterations=(\d+) "
                     r"checks=(\d+) failures=(\d+) staged_partitions=(-?\d+)$", re.M)


@pytest.fixture(scope="module")
def partitioned(tmp_path_factory):
    return build_c("tests/c/partitioned.c", tmp_path_factory.mktemp("partitioned"), extra_flags=["-pthread"])


def run(exe, mode, env, preload=True):
    """Runs the program on 2 ranks; returns the staged_partitions counter of each rank."""
    proc = run_mpi(2, [exe, mode], env=env, preload=preload, timeout=300)
    out = proc.stdout
    skipped = re.search(r"partitioned: skipped \((MPI-[^)]*)\)", out)
    if skipped:
        pytest.skip(skipped.group(1))
    found = SUMMARY.findall(out)
    fails = "\n".join(line for line in out.splitlines() if line.startswith("FAIL"))
    assert proc.returncode == 0 and not fails and len(found) == 2, \
        f"rc={proc.returncode}\n{fails[:4000]}\n{out[-3000:]}\n{proc.stderr[-3000:]}"
    for rank, seed, got_mode, threads, cases, iterations, checks, failures, staged in found:
        assert got_mode == mode and failures == "0", found
        # 5 types x 4 partitionings x 3 buffer mixes, 3 starts each; the threaded cases ran
        assert int(cases) == 60 and int(iterations) == 180 and threads == "1", found
    assert sum(int(f[6]) for f in found) >= 1000, found  # per-partition and final data checks
    return [int(f[8]) for f in sorted(found)]


def test_the_program_is_right_without_commlib(partitioned):
    assert run(partitioned, "host", {}, preload=False) == [-1, -1]


@pytest.mark.parametrize("env", [{}, {"COMMLIB_DISABLE": "1", "COMMLIB_STAGE_HOST": "1"}], ids=["plain", "disabled"])
def test_host_buffers_forwarded(partitioned, env):
    assert run(partitioned, "host", {"COMMLIB_STAGE_HOST": "0", **env}) == [0, 0]


def test_host_buffers_staged(partitioned):
    # every partition of a staged side is moved once per start: packed at MPI_Pready,
    # unpacked on arrival (615 and 405: the cases' sides are not symmetric)
    assert all(n >= 300 for n in run(partitioned, "host", {"COMMLIB_STAGE_HOST": "1"}))


DEVICE_ROUTES = {
    "no-kernels": {},
    "kernels": {"FAKE_CUDA_KERNELS": "1"},
    "device-method": {"FAKE_CUDA_KERNELS": "1", "COMMLIB_METHOD": "device"},
    "no-kernels-device-method": {"COMMLIB_METHOD": "device"},
    # device staging handed to an MPI believed CUDA-aware (contiguous buffers go as they are)
    "aware": {"FAKE_CUDA_KERNELS": "1", "FAKE_CUDA_HOST_VISIBLE": "1", "COMMLIB_CUDA_AWARE": "1",
              "COMMLIB_METHOD": "aware"},
}


@pytest.mark.parametrize("route", list(DEVICE_ROUTES))
def test_device_buffers_on_the_fake_driver(partitioned, fake_cuda_env, route):
    env = {**fake_cuda_env, "COMMLIB_STAGE_HOST": "0", **DEVICE_ROUTES[route]}
    assert all(n >= 300 for n in run(partitioned, "device", env))


def test_device_buffers_on_a_gpu(partitioned):
    if gpu_count() < 1:
        pytest.skip("no GPU (libcuda.so.1 with a device)")
    assert all(n >= 300 for n in run(partitioned, "device", {"COMMLIB_STAGE_HOST": "0"}))
