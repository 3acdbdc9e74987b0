"""Point-to-point through commlib's staged path - the path device buffers take over an MPI
that is not CUDA-aware - run on host memory with COMMLIB_STAGE_HOST=1, so CI without a
GPU covers packing into staging, MPI_PACKED on the wire, the request side table and the
completion calls.  The same program runs under the plain mpiexec (the program itself is
right), with the interposer but no staging, and staged: all three must print the same."""
import re

import pytest

from harness import build_c, run_mpi


@pytest.fixture(scope="module")
def p2p_staged(tmp_path_factory):
    return build_c("tests/c/p2p_staged.c", tmp_path_factory.mktemp("p2p"), extra_flags=["-pthread"])


def run(exe, ranks, out_dir, name, env=None, preload=True):
    """Each rank writes its own file (lines of several ranks never interleave)."""
    prefix = out_dir / name
    proc = run_mpi(ranks, [exe, str(prefix)], env=env, preload=preload)
    assert proc.returncode == 0, f"{name}: rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    lines = []
    for rank in range(ranks):
        lines += (out_dir / f"{name}.{rank}").read_text().splitlines()
    failed = [line for line in lines if "FAIL" in line]
    assert not failed, "\n".join(failed)
    assert sum(line.endswith("done failures=0") for line in lines) == ranks, lines[-5:]
    return proc, lines


def results(lines):
    return sorted(line for line in lines if line.startswith("rank "))


def staged_counts(lines):
    """rank -> (staged sends, staged receives, typed) from commlib_stat; None without commlib."""
    counts = {}
    for line in lines:
        m = re.match(r"stats: rank (\d+) (?:staged_send=(\d+) staged_recv=(\d+) staged_typed=(\d+)|no-commlib)", line)
        if m:
            counts[int(m.group(1))] = tuple(map(int, m.group(2, 3, 4))) if m.group(2) else None
    return counts


@pytest.mark.parametrize("ranks", [2, 4])
def test_staged_p2p_matches_the_host_mpi(p2p_staged, ranks, tmp_path):
    _, plain = run(p2p_staged, ranks, tmp_path, "plain", preload=False)
    _, forwarded = run(p2p_staged, ranks, tmp_path, "forwarded", env={"COMMLIB_STAGE_HOST": "0"})
    staged_proc, staged = run(p2p_staged, ranks, tmp_path, "staged",
                              env={"COMMLIB_STAGE_HOST": "1", "COMMLIB_STATS": "1"})
    assert len(results(plain)) > 100 * ranks
    assert results(forwarded) == results(plain)
    assert results(staged) == results(plain)

    assert set(staged_counts(plain).values()) == {None}
    assert set(staged_counts(forwarded).values()) == {(0, 0, 0)}  # host buffers go straight through
    counts = staged_counts(staged)
    assert sorted(counts) == list(range(ranks))
    for rank, (sends, recvs, typed) in counts.items():
        # every message of the program except the zero-count and MPI_BOTTOM ones is staged
        assert sends >= 100 and recvs >= 100, (rank, sends, recvs)
        assert typed >= 20, (rank, typed)  # the holey type: typed span copies, not packing
    # the MPI_Finalize report agrees with commlib_stat
    report = dict((int(r), (int(s), int(v), int(t))) for r, s, v, t in re.findall(
        r"commlib\[rank (\d+)\]: types .*\| p2p staged send=(\d+) recv=(\d+) typed=(\d+)", staged_proc.stderr))
    assert report == counts, staged_proc.stderr


def test_disable_wins_over_stage_host(p2p_staged, tmp_path):
    _, plain = run(p2p_staged, 2, tmp_path, "plain", preload=False)
    _, disabled = run(p2p_staged, 2, tmp_path, "disabled", env={"COMMLIB_STAGE_HOST": "1", "COMMLIB_DISABLE": "1"})
    assert results(disabled) == results(plain)
    assert set(staged_counts(disabled).values()) == {(0, 0, 0)}
