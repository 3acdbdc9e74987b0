"""Pipelined staging (COMMLIB_PIPELINE=1, native/transfer/pipeline.h): large device
messages cross the host in chunks, the copies off and onto the GPU overlapping the host
MPI's transfer, a descriptor on the program's envelope doing the matching.

tests/c/pipeline_p2p.c checks MPI's matching rules through the path - order on one tag with
pipelined, host and small device messages interleaved, MPI_ANY_SOURCE/MPI_ANY_TAG,
truncation, a cancelled receive, MPI_Send/Ssend/Rsend, 40 messages each way in one
MPI_Waitall, completion by MPI_Test, MPI_Cancel of a pipelined send, a persistent receive
started twice, MPI_Send_init and MPI_Bsend (both staged whole) -
every received byte and gap checked.  In CI against the stand-in driver
(tests/c/fake_cuda.c), with its deferred mode too (copies run only when something waits
for them, reading their sources then: a chunk sent before its copy finished shows up as
wrong bytes); on a GPU machine the same program runs on the real driver."""
import re

import pytest

from harness import build_c, gpu_count, run_mpi, run_typegen

# order 2, wildcards 1, truncate 2, cancel 1, blocking 3, exchange 40, testing 1, cancelsend 1, persistent 2,
# reversed 1
PIPELINED_PER_RANK = 54
REPLIES = 2  # even ranks send these, odd ranks receive them


@pytest.fixture(scope="module")
def pipeline_p2p(tmp_path_factory):
    return build_c("tests/c/pipeline_p2p.c", tmp_path_factory.mktemp("pipeline_p2p"))


def run(exe, env, ranks=2):
    proc = run_mpi(ranks, [exe], env={"COMMLIB_STATS": "1", "COMMLIB_PIPELINE": "1", **env}, timeout=300)
    out = proc.stdout
    assert proc.returncode == 0, f"rc={proc.returncode}\n{out}\n{proc.stderr}"
    assert "skipped" not in out and "FAIL" not in out, out
    assert out.count("done failures=0") == ranks, out
    stats = [tuple(map(int, m)) for m in re.findall(r"pipelined send=(\d+) recv=(\d+) chunks=(\d+)", proc.stderr)]
    staged = [int(m) for m in re.findall(r"p2p staged send=(\d+)", proc.stderr)]
    assert len(stats) == ranks and len(staged) == ranks, proc.stderr
    return stats, staged


@pytest.mark.parametrize("defer,progress,gbps", [("0", "none", "0"), ("1", "none", "0"), ("1", "thread", "0"),
                                                 ("1", "thread", "2"), ("1", "none", "2")])
def test_matching_rules_hold_pipelined(pipeline_p2p, fake_cuda_env, defer, progress, gbps):
    """Chunks of 200 KiB (the testing hook): every message of 1 MiB and more is cut, in 6 to
    16 chunks, the last one short.  With a timed copy engine (FAKE_CUDA_COPY_GBPS) the chunks'
    copies really end one after another, so with the progress thread a send's call returns
    before its chunks are all handed over, and polls hand over the rest."""
    stats, _ = run(pipeline_p2p, {**fake_cuda_env, "FAKE_CUDA_KERNELS": "1", "FAKE_CUDA_DEFER": defer,
                                  "FAKE_CUDA_COPY_GBPS": gbps, "COMMLIB_PROGRESS": progress,
                                  "COMMLIB_TEST_PIPELINE_CHUNK_KB": "200"})
    for sends, recvs, chunks in stats:  # even ranks send the replies' messages, odd ranks receive them
        assert sends + recvs == 2 * PIPELINED_PER_RANK + REPLIES, stats
        assert {sends, recvs} == {PIPELINED_PER_RANK, PIPELINED_PER_RANK + REPLIES}, stats
        assert chunks >= 6 * sends, stats


def test_chunks_from_the_model(pipeline_p2p, fake_cuda_env):
    """Without the hook the model picks the chunk size: at least two chunks per message, and
    messages too short for two chunks of the model's size are staged whole."""
    stats, _ = run(pipeline_p2p, {**fake_cuda_env, "FAKE_CUDA_KERNELS": "0", "COMMLIB_MODEL": "0"})
    for sends, recvs, chunks in stats:
        assert 10 <= sends <= PIPELINED_PER_RANK + REPLIES and abs(recvs - sends) == REPLIES, stats
        assert chunks >= 2 * sends, stats


def test_four_ranks(pipeline_p2p, fake_cuda_env):
    stats, _ = run(pipeline_p2p, {**fake_cuda_env, "FAKE_CUDA_KERNELS": "1", "COMMLIB_TEST_PIPELINE_CHUNK_KB": "512"},
                   ranks=4)
    assert all({s[0], s[1]} == {PIPELINED_PER_RANK, PIPELINED_PER_RANK + REPLIES} for s in stats), stats


def test_off_by_default(pipeline_p2p, fake_cuda_env):
    proc = run_mpi(2, [pipeline_p2p], env={**fake_cuda_env, "COMMLIB_STATS": "1", "FAKE_CUDA_KERNELS": "1",
                                           "OMPI_MCA_btl_vader_single_copy_mechanism": "none"}, timeout=300)
    assert proc.returncode == 0 and proc.stdout.count("done failures=0") == 2, proc.stdout + proc.stderr
    assert "pipelined" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("ranks", [2, 4])
def test_pipelined_on_a_gpu(pipeline_p2p, ranks):
    if gpu_count() < 1:
        pytest.skip("no GPU (libcuda.so.1 with a device)")
    for env in ({}, {"COMMLIB_PROGRESS": "thread"}):
        stats, _ = run(pipeline_p2p, env, ranks=ranks)
        assert all(abs(recvs - sends) == REPLIES and sends >= 10 for sends, recvs, _ in stats), stats


@pytest.mark.parametrize("seed,progress", [(5, "none"), (6, "thread")])
def test_random_trees_pipelined(fake_cuda_env, seed, progress):
    """tests/ipc_typegen.py with messages of 1 MiB and more: random datatype trees sent from
    device memory in chunks of 96 KiB arrive byte for byte as the host MPI delivers the same
    bytes sent from host memory, with the same counts."""
    trees, sent, out = run_typegen(seed, 30, {**fake_cuda_env, "COMMLIB_PIPELINE": "1", "FAKE_CUDA_KERNELS": "1",
                                              "FAKE_CUDA_DEFER": "1", "COMMLIB_PROGRESS": progress,
                                              "COMMLIB_TEST_PIPELINE_CHUNK_KB": "96",
                                              "TYPEGEN_MIN_BYTES": str(1 << 20), "TYPEGEN_MAX_SPAN": str(8 << 20)},
                                   "pipelined send")
    assert trees >= 15, out
    assert sent and max(sent) >= trees // 2, out  # most trees were cut in chunks
