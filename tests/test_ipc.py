"""GPU to GPU between ranks of one node (COMMLIB_IPC=1, native/transfer/ipc.h).

tests/c/ipc_p2p.c checks MPI's matching rules through the path - order on one tag with
device and host sends interleaved, MPI_ANY_SOURCE/MPI_ANY_TAG, truncation, a cancelled
receive, blocking and synchronous sends, 200 messages through the arenas, more in flight
than the arenas hold (the rest staged) and, with pretended nodes, messages to another node
(staged).  In CI against the stand-in driver (tests/c/fake_cuda.c), whose inter-process
handles map the exporting process's memory file: the receiver's copies really read the
sender's memory.  On a GPU machine the same program runs on the real driver."""
import re

import pytest

from harness import build_c, gpu_count, run_mpi, run_typegen


@pytest.fixture(scope="module")
def ipc_p2p(tmp_path_factory):
    return build_c("tests/c/ipc_p2p.c", tmp_path_factory.mktemp("ipc_p2p"))


def run(exe, ranks, env):
    proc = run_mpi(ranks, [exe], env={"COMMLIB_STATS": "1", "COMMLIB_IPC": "1", "COMMLIB_TEST_IPC_ARENAS_MB": "16",
                                      **env}, timeout=240)
    out = proc.stdout
    assert proc.returncode == 0, f"rc={proc.returncode}\n{out}\n{proc.stderr}"
    assert "skipped" not in out and "FAIL" not in out, out
    assert out.count("done failures=0") == ranks, out
    # every message acknowledged, also those truncated inside their descriptor (tiny)
    assert "never acknowledged" not in proc.stderr, proc.stderr
    stats = [tuple(map(int, m)) for m in
             re.findall(r"gpu-to-gpu send=(\d+) recv=(\d+) fallback=(\d+) direct=(\d+)", proc.stderr)]
    staged = [int(m) for m in re.findall(r"p2p staged send=(\d+)", proc.stderr)]
    if not stats and "gpu-to-gpu" not in proc.stderr:  # printed where something went GPU to GPU
        stats = [(0, 0, 0, 0)] * ranks
    assert len(stats) == ranks and len(staged) == ranks, proc.stderr
    run.last_stderr, run.last_stdout = proc.stderr, out
    return stats, staged


def bursts(stderr):
    """Each rank's (sends whose pack waited for a burst, launches of those packs)."""
    return [tuple(map(int, m)) for m in re.findall(r"gpu-to-gpu burst=(\d+) in launches=(\d+)", stderr)]


@pytest.mark.parametrize("kernels,defer", [("1", "0"), ("0", "0"), ("1", "1")])
def test_matching_rules_hold_gpu_to_gpu(ipc_p2p, fake_cuda_env, kernels, defer):
    stats, staged = run(ipc_p2p, 2, {**fake_cuda_env, "FAKE_CUDA_KERNELS": kernels, "FAKE_CUDA_DEFER": defer})
    for (sends, recvs, fallback, direct), staged_sends in zip(stats, staged):
        # order 4 + wildcards + truncate + cancel + 2 blocking + self + 200 recycled + 3 direct + the 4 of 8 that fit
        assert sends >= 216 and recvs >= 216, stats
        assert 1 <= fallback <= 5 and staged_sends == fallback, (stats, staged)  # the rest staged, still delivered
        assert direct == 0, stats  # without the progress thread: the arenas
    assert re.findall(r"one-pass=(\d+)", run.last_stderr) == ["0", "0"], run.last_stderr
    # the nonblocking sends' packs waited for bursts (not the blocking ones, nor those to
    # the 16 MiB arena budget's fallback); the burst section's 26 in one or two launches
    queued = bursts(run.last_stderr)
    assert len(queued) == 2 and all(n >= 26 and launches <= n - 20 for n, launches in queued), run.last_stderr


def test_another_node_is_staged(ipc_p2p, fake_cuda_env):
    stats, staged = run(ipc_p2p, 4, {**fake_cuda_env, "FAKE_CUDA_KERNELS": "1", "COMMLIB_RANKS_PER_NODE": "2"})
    for (sends, recvs, fallback, _), staged_sends in zip(stats, staged):
        assert sends >= 216 and recvs >= 216, stats
        assert staged_sends >= fallback + 1, (stats, staged)  # the message to the other node


@pytest.mark.parametrize("defer", ["0", "1"])
def test_direct_from_the_senders_buffer(ipc_p2p, fake_cuda_env, defer):
    """With the progress thread (which acknowledges on the receiver's behalf), contiguous
    messages of 1 MiB and more are copied from the sender's own buffer: the 200 recycled
    2 MiB messages, the 3 direct ones, 70 from fresh buffers (more than a receiver keeps
    mapped) and the 8 x 4 MiB that no longer need arena room (no fallback); a direct
    MPI_Isend is not complete before its receive is posted; received inside a completion call,
    they are unpacked by its batched launch whatever their size.  The 2 strided messages of 1 MiB
    (every other double) go direct too, each received in one pass from the sender's buffer
    into the receive buffer (`one-pass=`), gaps untouched."""
    stats, staged = run(ipc_p2p, 2, {**fake_cuda_env, "FAKE_CUDA_KERNELS": "1", "FAKE_CUDA_DEFER": defer,
                                     "COMMLIB_PROGRESS": "thread", "IPC_P2P_EXPECT_DIRECT": "1"})
    for (sends, recvs, fallback, direct), staged_sends in zip(stats, staged):
        assert sends >= 216 and recvs >= 216, stats
        assert direct >= 200 + 3 + 70 + 8 + 2 and fallback == 0 and staged_sends == 0, (stats, staged)
    assert [int(n) >= 2 for n in re.findall(r"one-pass=(\d+)", run.last_stderr)] == [True, True], run.last_stderr
    # the contiguous ones of 1 MiB and more (200 recycled, 70 fresh) were copied by the completion
    # call's batched kernel, not one copy-engine call each (55-78 batched so, before stop 26)
    batched = [int(n) for n in re.findall(r"unpacks batched=(\d+)", run.last_stderr)]
    assert len(batched) == 2 and min(batched) >= 270, run.last_stderr
    # the messages still sent through the arenas (not contiguous, or under 1 MiB) burst as
    # they do without the progress thread: the burst section's 26 in one or two launches
    queued = bursts(run.last_stderr)
    assert len(queued) == 2 and all(n >= 26 and launches <= n - 20 for n, launches in queued), run.last_stderr


@pytest.mark.parametrize("progress", ["none", "thread"])
def test_pageable_copies_land_before_the_receiver_reads(ipc_p2p, fake_cuda_env, progress):
    """A cuMemcpyHtoD from pageable memory returns before its bytes land (the stand-in's
    FAKE_CUDA_PAGEABLE_LAG; on an H100 without MPS, 1 of 256 sampled doubles came stale in
    a few of the 70 fresh 1 MiB buffers, stop 36).  Through the arena the sender's pack, on a
    blocking stream, comes after it; a direct message's receiver reads the program's buffer
    from another process, so the sender first waits for the legacy stream when it has work
    left (counted), and only then."""
    env = {**fake_cuda_env, "FAKE_CUDA_KERNELS": "1", "FAKE_CUDA_PAGEABLE_LAG": "1", "COMMLIB_PROGRESS": progress}
    if progress == "thread":
        env["IPC_P2P_EXPECT_DIRECT"] = "1"
    stats, _ = run(ipc_p2p, 2, env)
    settled = [int(n) for n in re.findall(r"direct sends after legacy-stream work=(\d+)", run.last_stderr)]
    if progress == "thread":
        direct = [d for _, _, _, d in stats]
        assert len(settled) == 2 and all(70 <= n < d for n, d in zip(settled, direct)), (settled, stats)
    else:
        assert settled == [], run.last_stderr


@pytest.mark.parametrize("env", [{"COMMLIB_IPC_BURST_US": "0"}, {"FAKE_CUDA_NO_MEMOPS": "1"}])
def test_bursts_off(ipc_p2p, fake_cuda_env, env):
    """COMMLIB_IPC_BURST_US=0, or a device without 64-bit stream memory operations: every
    GPU-to-GPU send launches its own pack and records the arena's event - still correct."""
    stats, _ = run(ipc_p2p, 2, {**fake_cuda_env, "FAKE_CUDA_KERNELS": "1", **env})
    assert all(sends >= 216 for sends, _, _, _ in stats), stats
    assert not bursts(run.last_stderr), run.last_stderr


@pytest.mark.parametrize("progress", ["none", "thread"])
def test_device_pack_async_leaves_commlibs_own_moves_alone(fake_cuda_env, progress):
    """COMMLIB_DEVICE_PACK_ASYNC=1 applies to the program's MPI_Pack/MPI_Unpack only
    (pack/pack_any.h any_pack_call): a GPU-to-GPU receive's unpack is acknowledged to the sender
    right after, which may then reuse its arena, so it must have run.  Random trees sent by
    MPI_Isend and received by MPI_Irecv, the stand-in driver deferring every kernel until
    something waits (a queued unpack would read the arena after the sender reused it): they
    arrive byte for byte, and no move was left queued."""
    trees, left, out = run_typegen(9, 60, {**fake_cuda_env, "COMMLIB_IPC": "1", "FAKE_CUDA_KERNELS": "1",
                                           "FAKE_CUDA_DEFER": "1", "COMMLIB_DEVICE_PACK_ASYNC": "1",
                                           "COMMLIB_PROGRESS": progress, "TYPEGEN_ISEND": "1",
                                           "TYPEGEN_IRECV": "1"}, "not waited for")
    assert trees >= 40, out
    assert left == [], out
    assert re.search(r"gpu-to-gpu send=[1-9]", out), out  # the trees did go GPU to GPU


@pytest.mark.parametrize("seed,progress,irecv,small", [(1, "none", "0", "0"), (2, "none", "0", "0"),
                                                       (3, "thread", "0", "0"), (4, "none", "1", "0"),
                                                       (5, "none", "1", "0"), (8, "none", "1", "1"),
                                                       (10, "thread", "0", "1")])
def test_random_trees_device_to_device(fake_cuda_env, seed, progress, irecv, small):
    """tests/ipc_typegen.py: random datatype trees sent from device memory (GPU to GPU)
    arrive byte for byte as the host MPI delivers the same bytes sent from host memory.
    irecv: received by MPI_Irecv + MPI_Wait, whose unpack is the batched kernel's (up to 3
    dimensions per piece; the rest launch one by one).  small: COMMLIB_IPC_SMALL=1 and one
    element of each tree (TYPEGEN_MIN_BYTES=8: seeds 8 and 10 have 49 and 47 trees under 192
    bytes), every tree commlib packs GPU to GPU."""
    env = {**fake_cuda_env, "COMMLIB_IPC": "1", "FAKE_CUDA_KERNELS": "1", "COMMLIB_PROGRESS": progress,
           "TYPEGEN_IRECV": irecv}
    if small == "1":
        env.update({"COMMLIB_IPC_SMALL": "1", "TYPEGEN_MIN_BYTES": "8"})
    trees, sent, out = run_typegen(seed, 60, env, "gpu-to-gpu send")
    assert trees >= 40, out
    if small == "1":  # all but the trees of types commlib does not reduce (typed, staged)
        unsupported = max(int(n) for n in re.findall(r"unsupported=(\d+)", out))
        assert sent and max(sent) + unsupported == trees, out
    else:
        assert sent and max(sent) >= trees // 2, out  # most trees went GPU to GPU
    batched = [int(n) for n in re.findall(r"unpacks batched=(\d+)", out)]
    if irecv == "1":
        assert batched and max(batched) >= trees // 4, out
    else:
        assert not batched, out


@pytest.mark.parametrize("seed,irecv,defer,two_pass", [(6, "1", "0", "0"), (7, "0", "0", "0"), (9, "1", "1", "0"),
                                                      (6, "1", "0", "1")])
def test_random_trees_direct_from_the_senders_buffer(fake_cuda_env, seed, irecv, defer, two_pass):
    """COMMLIB_IPC_DIRECT_BYTES=192 with the progress thread: nonblocking sends of one block
    or one strided piece (up to 3 dimensions, strides >= 0) are read by the receiver from the
    sender's own buffer - random trees arrive as the host MPI delivers them.  A strided one
    goes from the sender's piece straight into the receive buffer in one pass where the
    receive type is one piece too (`one-pass=`; with deferred kernels as well), else it is
    packed into scratch from the sender's buffer first and unpacked from there (also forced,
    COMMLIB_TEST_TWO_PASS).  The trees include blocks whose type map runs backwards (hvector
    with stride -1): one span as long as the size, but not in order - they must not be copied
    as if contiguous (they were, before stop 20, from 1 MiB)."""
    trees, direct, out = run_typegen(seed, 60, {**fake_cuda_env, "COMMLIB_IPC": "1", "FAKE_CUDA_KERNELS": "1",
                                                "COMMLIB_PROGRESS": "thread", "COMMLIB_IPC_DIRECT_BYTES": "192",
                                                "TYPEGEN_ISEND": "1", "TYPEGEN_IRECV": irecv,
                                                "FAKE_CUDA_DEFER": defer, "COMMLIB_TEST_TWO_PASS": two_pass}, "direct")
    assert trees >= 40, out
    assert direct and max(direct) >= trees // 3, out  # most went direct
    one_pass = [int(n) for n in re.findall(r"one-pass=(\d+)", out)]
    if two_pass == "1":
        assert one_pass and max(one_pass) == 0, out
    else:  # the receiving rank moved most strided ones piece to piece (seeds 6, 7, 9: 27, 22, 27 of 60)
        assert one_pass and max(one_pass) >= trees // 4, out


@pytest.fixture(scope="module")
def ipc_small(tmp_path_factory):
    return build_c("tests/c/ipc_small.c", tmp_path_factory.mktemp("ipc_small"))


def small_device_sends(out):
    """The device sends tests/c/ipc_small.c made per rank (one of them MPI_Sendrecv's, which
    never goes GPU to GPU)."""
    sends = set(re.findall(r"device-sends=(\d+)", out))
    assert len(sends) == 1, out
    return int(sends.pop())


@pytest.mark.parametrize("small,progress", [(None, "none"), ("1", "none"), ("1", "thread"), ("0", "none")])
def test_small_messages_gpu_to_gpu(ipc_small, fake_cuda_env, small, progress):
    """COMMLIB_IPC_SMALL (transfer/ipc.h; on by default with COMMLIB_IPC=1 since stop 36, None:
    unset): device messages of 8-184 bytes go GPU to GPU too,
    and a device receive of under 192 bytes, posted to the host MPI for a descriptor's 192,
    still behaves as the receive the program posted: order with host sends on one tag,
    wildcards, a cancelled receive, persistent and blocking receives, and truncation - of a
    descriptor, of a host send's 16 bytes (which the host MPI would have let in: commlib
    truncates) and of 320 bytes (the host MPI truncates at 192) - MPI_ERR_TRUNCATE by MPI_Recv,
    MPI_Wait and MPI_Waitall (with the progress thread, finished early by it), 8 bytes
    written and counted; MPI_Request_get_status reports the program's count and the
    truncation, and so does the MPI_Wait after it.  Off, the same program passes staged,
    but for its one message of 384 bytes (GPU to GPU without the knob)."""
    env = {**fake_cuda_env, "FAKE_CUDA_KERNELS": "1", "COMMLIB_PROGRESS": progress}
    if small is not None:
        env["COMMLIB_IPC_SMALL"] = small
    stats, staged = run(ipc_small, 2, env)
    sends = small_device_sends(run.last_stdout)
    if small != "0":
        assert stats == [(sends - 1, sends - 1, 0, 0)] * 2 and staged == [1, 1], (stats, staged)
    else:
        assert [s[:2] for s in stats] == [(1, 1)] * 2 and staged == [sends - 1] * 2, (stats, staged)


def test_small_messages_need_every_rank(ipc_small, fake_cuda_env, tmp_path):
    """COMMLIB_IPC_SMALL=0 on one rank only (the others on by default): a receive on the
    others posts for a descriptor, but that rank's receives would not, and a sender would send
    one into a receive of 8 bytes - so the node agrees at MPI_Init (the rank that wanted it
    warns), small messages stay staged (all but the one of 384 bytes), and the program still
    passes."""
    wrapper = tmp_path / "one_rank_small.sh"
    wrapper.write_text('#!/bin/sh\n[ "${PMI_RANK:-$OMPI_COMM_WORLD_RANK}" = 0 ] && export COMMLIB_IPC_SMALL=0\n'
                       f'exec {ipc_small} "$@"\n')
    wrapper.chmod(0o755)
    stats, staged = run(str(wrapper), 2, {**fake_cuda_env, "FAKE_CUDA_KERNELS": "1"})
    sends = small_device_sends(run.last_stdout)
    assert [s[:2] for s in stats] == [(1, 1)] * 2 and staged == [sends - 1] * 2, (stats, staged)
    assert run.last_stderr.count("COMMLIB_IPC_SMALL=0 is set on another rank") == 1, run.last_stderr


def test_off_by_default(ipc_p2p, fake_cuda_env):
    # Staged, the truncated 12 KiB message goes through the host MPI's data path; Open MPI
    # 4.1's single-copy read writes all of it past the receive buffer (README "Building
    # against another MPI"), so that path is off here (an MCA knob MPICH ignores).
    proc = run_mpi(2, [ipc_p2p], env={**fake_cuda_env, "COMMLIB_STATS": "1", "COMMLIB_TEST_IPC_ARENAS_MB": "16",
                                      "FAKE_CUDA_KERNELS": "1", "OMPI_MCA_btl_vader_single_copy_mechanism": "none"},
                   timeout=240)
    assert proc.returncode == 0 and proc.stdout.count("done failures=0") == 2, proc.stdout + proc.stderr
    assert "gpu-to-gpu" not in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def ipc_rounds(tmp_path_factory):
    return build_c("tests/c/ipc_rounds.c", tmp_path_factory.mktemp("ipc_rounds"))


def rounds(exe, ranks, env):
    """Each rank's (MPI_Waitall calls finished in rounds, their rounds, early launches)."""
    stats, _ = run(exe, ranks, env)
    assert all(recvs >= 4 for _, recvs, _, _ in stats), stats  # the receives went GPU to GPU
    found = [tuple(map(int, m)) for m in
             re.findall(r"waitall in rounds=(\d+) rounds=(\d+) early launches=(\d+)", run.last_stderr)]
    return found, stats


def one_waitall(stdout):
    """(rounds, early launches) of the receiving rank's MPI_Waitall in tests/c/ipc_rounds.c."""
    found = re.findall(r"waitall rounds=(\d+) early launches=(\d+)", stdout)
    assert len(found) == 1, stdout
    return tuple(map(int, found[0]))


@pytest.mark.parametrize("progress,defer", [("none", "0"), ("thread", "0"), ("thread", "1")])
def test_waitall_launches_receives_as_they_arrive(ipc_rounds, fake_cuda_env, progress, defer):
    """An MPI_Waitall over 1 MiB device receives whose messages come 20 ms apart copies each
    round's arrivals at once (interpose/request.c; tests/c/ipc_rounds.c), keeping what
    MPI_Waitall returns: MPI_ERR_IN_STATUS for a receive truncated among them, every status
    where it belongs (a null request's empty, a host receive's and a persistent one's too),
    every buffer's elements and gaps; then both ranks' receives and (direct) sends in one
    call.  With COMMLIB_EARLY_LAUNCH_BYTES=0 the same program takes one host MPI_Waitall."""
    env = {**fake_cuda_env, "FAKE_CUDA_KERNELS": "1", "FAKE_CUDA_DEFER": defer, "COMMLIB_PROGRESS": progress}
    found, stats = rounds(ipc_rounds, 2, env)
    # the receiving rank's one MPI_Waitall: a round per message (9 messages 20 ms apart, the host
    # one too; 7 leaves room for a loaded machine), and the copies of the 1 MiB ones launched as
    # they came (6-7: a round with only the truncated 512 KiB launches with the next)
    waited = one_waitall(run.last_stdout)
    assert 7 <= waited[0] <= 9 and waited[1] >= 5, run.last_stdout
    assert len(found) == 2 and all(calls >= 1 for calls, _, _ in found), found  # both ways: both ranks
    if progress == "thread":
        assert all(direct >= 4 for _, _, _, direct in stats), stats
    found, _ = rounds(ipc_rounds, 2, {**env, "COMMLIB_EARLY_LAUNCH_BYTES": "0"})
    assert found == [] and one_waitall(run.last_stdout) == (0, 0), (found, run.last_stdout)


@pytest.mark.parametrize("ranks", [2, 4, 8])
def test_gpu_to_gpu_on_a_gpu(ipc_p2p, ranks):
    if gpu_count() < 1:
        pytest.skip("no GPU (libcuda.so.1 with a device)")
    stats, _ = run(ipc_p2p, ranks, {})
    assert all(sends >= 216 for sends, _, _, _ in stats), stats
    stats, _ = run(ipc_p2p, ranks, {"COMMLIB_PROGRESS": "thread", "IPC_P2P_EXPECT_DIRECT": "1"})
    assert all(sends >= 216 and direct >= 281 for sends, _, _, direct in stats), stats


@pytest.mark.parametrize("progress", ["none", "thread"])
def test_waitall_rounds_on_a_gpu(ipc_rounds, progress):
    if gpu_count() < 1:
        pytest.skip("no GPU (libcuda.so.1 with a device)")
    rounds(ipc_rounds, 2, {"COMMLIB_PROGRESS": progress})
    waited = one_waitall(run.last_stdout)
    assert 7 <= waited[0] <= 9 and waited[1] >= 5, run.last_stdout


@pytest.mark.parametrize("ranks", [2, 4, 8])
def test_small_messages_on_a_gpu(ipc_small, ranks):
    if gpu_count() < 1:
        pytest.skip("no GPU (libcuda.so.1 with a device)")
    for progress in ("none", "thread"):
        stats, staged = run(ipc_small, ranks, {"COMMLIB_IPC_SMALL": "1", "COMMLIB_PROGRESS": progress})
        sends = small_device_sends(run.last_stdout)
        assert stats == [(sends - 1, sends - 1, 0, 0)] * ranks and staged == [1] * ranks, (stats, staged)
