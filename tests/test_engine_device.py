"""The collective engine on device buffers (tests/c/engine_device.c): every kind of
operation, whole and partitioned, device buffers allocated to exactly their size, values
checked against the host.  In CI against the stand-in driver (device memory the CPU cannot
touch; copies past an allocation fail), over both transports and as a CUDA-aware MPI
would get them; on a GPU when there is one."""
import re

import pytest

from harness import build_c, gpu_count, run_mpi


@pytest.fixture(scope="module")
def engine_device(tmp_path_factory):
    return build_c("tests/c/engine_device.c", tmp_path_factory.mktemp("engine_device"))


def run(exe, ranks, env):
    proc = run_mpi(ranks, [exe], env=env, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "FAIL" not in proc.stdout, out
    m = re.search(r"engine_device: checks=(\d+) failures=0", proc.stdout)
    assert m and int(m.group(1)) >= 150, out


@pytest.mark.parametrize("ranks,transport", [(2, "auto"), (3, "auto"), (3, "mpi")])
def test_staged_on_the_fake_driver(engine_device, fake_cuda_env, ranks, transport):
    run(engine_device, ranks, {**fake_cuda_env, "COMMLIB_ENGINE_TRANSPORT": transport})


def test_cuda_aware_mpi_gets_device_pointers(engine_device, fake_cuda_env):
    # the stand-in's device memory made readable, and the MPI declared CUDA-aware: what the
    # MPI can do on device memory is handed to it as it is
    env = {**fake_cuda_env, "FAKE_CUDA_HOST_VISIBLE": "1", "COMMLIB_CUDA_AWARE": "1",
           "COMMLIB_ENGINE_TRANSPORT": "mpi"}
    run(engine_device, 2, env)


@pytest.mark.parametrize("transport", ["auto", "mpi"], ids=["shm", "mpi-path"])
def test_on_a_gpu(engine_device, transport):
    if gpu_count() < 1:
        pytest.skip("no GPU (libcuda.so.1 with a device)")
    run(engine_device, 2, {"COMMLIB_ENGINE_TRANSPORT": transport})
