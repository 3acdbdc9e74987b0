"""Device buffers in point-to-point calls over an MPI that is not CUDA-aware.

On a GPU machine tests/c/p2p_device.c runs under `commlib run` with real device memory
(all ranks may share one GPU).  Everywhere, the same program runs against
tests/c/fake_cuda.c, a libcuda.so.1 stand-in whose device memory the CPU cannot touch, so
CI exercises the device routes (staging, pinned pool, typed span copies) without a GPU:
any access to device memory that bypasses the driver's copies would crash."""
import re

import pytest

from harness import build_c, gpu_count, run_mpi




@pytest.fixture(scope="module")
def p2p_device(tmp_path_factory):
    return build_c("tests/c/p2p_device.c", tmp_path_factory.mktemp("p2p_device"))




def run_device(exe, ranks, out_dir, env):
    prefix = out_dir / f"device{ranks}"
    env = {"COMMLIB_STATS": "1", "COMMLIB_STAGE_HOST": "0", **env}  # device buffers alone must trigger staging
    proc = run_mpi(ranks, [exe, str(prefix)], env=env)
    lines = []
    for rank in range(ranks):
        path = out_dir / f"device{ranks}.{rank}"
        lines += path.read_text().splitlines() if path.exists() else []
    text = "\n".join(lines)
    assert proc.returncode == 0, f"rc={proc.returncode}\n{text}\n{proc.stdout}\n{proc.stderr}"
    assert "skipped" not in text, text
    assert "FAIL" not in text, text
    assert text.count("done failures=0") == ranks, text
    assert len(re.findall(r"ok=1", text)) >= 50 * ranks // 2, text
    counts = [tuple(map(int, m)) for m in re.findall(r"stats: rank \d+ staged_send=(\d+) staged_recv=(\d+) staged_typed=(\d+)", text)]
    assert len(counts) == ranks, text
    for sends, recvs, typed in counts:
        assert sends >= 40 and recvs >= 40 and typed >= 10, counts  # packed and typed routes both ran
    assert len(re.findall(r"p2p staged send=[1-9]\d* recv=[1-9]\d*", proc.stderr)) == ranks, proc.stderr


@pytest.mark.parametrize("ranks", [2, 4])
def test_device_buffers_on_a_gpu(p2p_device, ranks, tmp_path):
    if gpu_count() < 1:
        pytest.skip("no GPU (libcuda.so.1 with a device)")
    run_device(p2p_device, ranks, tmp_path, env={})


@pytest.mark.parametrize("ranks", [2, 4])
def test_device_buffers_on_the_fake_driver(p2p_device, fake_cuda_env, ranks, tmp_path):
    run_device(p2p_device, ranks, tmp_path, env=fake_cuda_env)


@pytest.mark.parametrize("kernels", ["0", "1"])
def test_device_buffers_with_deferred_device_work(p2p_device, fake_cuda_env, kernels, tmp_path):
    """The stand-in runs copies and kernels only when something waits for the stream
    (FAKE_CUDA_DEFER), reading their sources then: staging that commlib reused, or results
    it read, before waiting would show as wrong bytes."""
    run_device(p2p_device, 2, tmp_path, env={**fake_cuda_env, "FAKE_CUDA_DEFER": "1", "FAKE_CUDA_KERNELS": kernels})


def test_driver_loaded_just_before_the_first_send(p2p_device, fake_cuda_env, tmp_path):
    """The program loads the driver after MPI_Init and sends device memory at once (the
    stand-in driver initialises instantly): the preloaded library learns of the load from
    its dlopen, not from a clock, so the very first send is already staged."""
    run_device(p2p_device, 2, tmp_path, env={**fake_cuda_env, "FAKE_CUDA_INIT_MS": "0"})


@pytest.fixture(scope="module")
def batch_recv(tmp_path_factory):
    return build_c("tests/c/batch_recv.c", tmp_path_factory.mktemp("batch_recv"))


def run_batch_recv(exe, env):
    proc = run_mpi(2, [exe], env={"COMMLIB_STATS": "1", "COMMLIB_STAGE_HOST": "0", **env})
    out = proc.stdout
    assert proc.returncode == 0 and "batch_recv done failures=0" in out, f"{out}\n{proc.stderr}"
    assert "skipped" not in out and "FAIL" not in out, out
    return proc


@pytest.mark.parametrize("kernels,method", [("0", "oneshot"), ("1", "oneshot"), ("1", "device"), ("0", "device")])
def test_many_device_receives_one_synchronisation(batch_recv, fake_cuda_env, kernels, method):
    """26 strided device receives completed by one MPI_Waitall wait for the device once
    (device_batch), not once per message; with the device work deferred until a wait
    (FAKE_CUDA_DEFER) nothing is left queued when the call returns and the bytes are right
    after MPI_Waitall, MPI_Testall and MPI_Waitsome."""
    proc = run_batch_recv(batch_recv, {**fake_cuda_env, "FAKE_CUDA_DEFER": "1", "FAKE_CUDA_KERNELS": kernels,
                                       "COMMLIB_METHOD": method})
    used = re.search(r"recv oneshot=(\d+) device=(\d+)", proc.stderr)
    assert used and int(used[1 if method == "oneshot" else 2]) >= 4 * 26, proc.stderr
    syncs = [int(s) for s in re.findall(r"round 1 call Waitall syncs (\d+)", proc.stdout)]
    assert syncs and syncs[0] <= 2, proc.stdout  # one per context, whatever the number of messages
    settled = [int(n) for n in re.findall(r"device settled together=(\d+)", proc.stderr)]
    assert settled and max(settled) >= 4 * 26, proc.stderr  # every receive's unpack was left queued
    # the staging pool keeps a round's 26 pinned buffers: the next 3 rounds allocate none
    # (with 8 kept, as before, 18 more per round: 80 in all)
    allocated = [int(n) for n in re.findall(r"staging allocated=(\d+)", proc.stderr)]
    assert allocated and max(allocated) <= 26 + 4, proc.stderr


def test_many_device_receives_on_a_gpu(batch_recv):
    if gpu_count() < 1:
        pytest.skip("no GPU (libcuda.so.1 with a device)")
    run_batch_recv(batch_recv, {})


@pytest.fixture(scope="module")
def copies_per_message(tmp_path_factory):
    return build_c("tests/c/copies_per_message.c", tmp_path_factory.mktemp("copies"))


@pytest.mark.parametrize("kernels", [False, True])
@pytest.mark.parametrize("method", ["oneshot", "device"])
def test_a_contiguous_message_is_one_copy(copies_per_message, fake_cuda_env, kernels, method):
    """40 contiguous device messages (4096 MPI_BYTE, 1024 MPI_INT) staged both ways: a copy
    or two per message and side (plus the program's own 2-3 per message), with pack kernels
    and without.  Without them the receive side once copied each element alone: 4096
    one-byte copies per MPI_BYTE message (pack/pack_any.c via_block_copies: 102 400 copies
    in all on the receiver before)."""
    env = {**fake_cuda_env, "FAKE_CUDA_COUNTS": "1", "COMMLIB_METHOD": method}
    if kernels:  # the stand-in loads pack kernels only with FAKE_CUDA_KERNELS set
        env["FAKE_CUDA_KERNELS"] = "1"
    proc = run_mpi(2, [copies_per_message], env=env)
    assert proc.returncode == 0 and "copies_per_message done failures=0" in proc.stdout, proc.stdout + proc.stderr
    copies = [int(n) for n in re.findall(r"^fake_cuda counts .* memcpy_async=(\d+)", proc.stderr, re.M)]
    assert len(copies) == 2 and all(0 < n <= 3 * 40 for n in copies), proc.stderr
