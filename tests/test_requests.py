"""Persistent requests, MPI_Isendrecv(_replace) and the nonblocking collectives on buffers
commlib stages (tests/c/requests_staged.c says what runs and what is checked).  CI covers
host memory under COMMLIB_STAGE_HOST=1 and "device" memory from tests/c/fake_cuda.c (the
CPU cannot touch it: any access bypassing the driver's copies crashes), each with and
without the progress thread; the same program on a real GPU runs where there is one."""
import re

import pytest

from harness import build_c, gpu_count, run_mpi


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    return build_c("tests/c/requests_staged.c", tmp_path_factory.mktemp("requests"))


def run(exe, ranks, memory, env=None, preload=True):
    proc = run_mpi(ranks, [exe, memory], env=env, preload=preload, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"rc={proc.returncode}\n{out}"
    assert "FAIL" not in proc.stdout, out
    assert "skipped (no CUDA" not in proc.stdout, out
    done = re.findall(r"rank (\d+): done checks=(\d+) failures=(\d+)", proc.stdout)
    assert sorted(int(r) for r, _, _ in done) == list(range(ranks)), out
    assert all(int(f) == 0 and int(c) > 200 for _, c, f in done), out
    assert "never completed" not in proc.stderr, out
    return proc


def staged_counts(stdout):
    return [tuple(map(int, m)) for m in re.findall(
        r"rank \d+: stats staged_send=(\d+) staged_recv=(\d+) staged_typed=(\d+) collective=(\d+)", stdout)]


def assert_staged(proc, ranks, isendrecv=True):
    counts = staged_counts(proc.stdout)
    assert len(counts) == ranks, proc.stdout
    for sends, recvs, typed, collectives in counts:
        # 3 types x 12 starts + 3 ready-mode starts + 2 (+ Isendrecv halves): every start staged
        assert sends >= 41 and recvs >= 41, counts
        assert typed >= 24, counts  # the irregular type's 12 sends and 12 receives: span copies
        assert collectives >= 6, counts  # each nonblocking collective (the root's Ireduce... all staged)


def test_program_on_the_host_mpi(program):
    """The program itself is right: the host MPI alone, host memory."""
    run(program, 2, "host", preload=False)


@pytest.mark.parametrize("ranks", [2, 4])
@pytest.mark.parametrize("progress", ["none", "thread"])
def test_stage_host(program, ranks, progress):
    proc = run(program, ranks, "host", env={"COMMLIB_STAGE_HOST": "1", "COMMLIB_PROGRESS": progress})
    assert_staged(proc, ranks)


@pytest.mark.parametrize("ranks", [2, 4])
@pytest.mark.parametrize("progress", ["none", "thread"])
def test_fake_device_memory(program, fake_cuda_env, ranks, progress):
    proc = run(program, ranks, "device", env={**fake_cuda_env, "COMMLIB_STAGE_HOST": "0", "COMMLIB_PROGRESS": progress})
    assert_staged(proc, ranks)


def test_host_buffers_are_forwarded(program):
    proc = run(program, 2, "host", env={"COMMLIB_STAGE_HOST": "0"})
    assert set(staged_counts(proc.stdout)) == {(0, 0, 0, 0)}, proc.stdout


@pytest.mark.parametrize("ranks", [2, 4])
def test_device_memory_on_a_gpu(program, ranks):
    if gpu_count() < 1:
        pytest.skip("no GPU (libcuda.so.1 with a device)")
    for progress in ("none", "thread"):
        proc = run(program, ranks, "device", env={"COMMLIB_STAGE_HOST": "0", "COMMLIB_PROGRESS": progress})
        assert_staged(proc, ranks)
