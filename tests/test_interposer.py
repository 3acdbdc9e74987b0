"""The interposer on programs it never saw: results unchanged, stats reported, the
disable knob, and the guard against a program of another MPI family."""
import os
import re
import subprocess

import pytest

from commlib import native, paths
from harness import build_c, run_mpi


@pytest.fixture(scope="module")
def foreign_app(tmp_path_factory):
    return build_c("tests/c/foreign_app.c", tmp_path_factory.mktemp("foreign"))


def rank_lines(out):
    return sorted(line for line in out.splitlines() if line.startswith("rank "))


@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_unseen_program_gives_identical_results(foreign_app, ranks):
    plain = run_mpi(ranks, [foreign_app], preload=False)
    assert plain.returncode == 0, plain.stderr
    with_commlib = run_mpi(ranks, [foreign_app], env={"COMMLIB_STATS": "1"})
    assert with_commlib.returncode == 0, with_commlib.stderr
    assert rank_lines(with_commlib.stdout) == rank_lines(plain.stdout)
    assert len(rank_lines(plain.stdout)) == ranks
    # commlib really handled the pack and unpack (not just forwarded them).
    stats = re.findall(r"commlib\[rank \d+\]: MPI_Pack calls=(\d+) fast=(\d+)", with_commlib.stderr)
    assert len(stats) == ranks, with_commlib.stderr
    assert all(calls == "2" and fast == "2" for calls, fast in stats)  # struct array + dup of MPI_DOUBLE
    assert re.search(r"MPI_Unpack calls=1 fast=1", with_commlib.stderr)


def test_plain_ld_preload_without_commlib_run(foreign_app):
    env = dict(os.environ, LD_PRELOAD=paths.preload_library(), COMMLIB_STATS="1")
    proc = subprocess.run([paths.mpiexec(), "-n", "2", foreign_app], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(rank_lines(proc.stdout)) == 2
    assert proc.stderr.count("MPI_Pack calls=2 fast=2") == 2


def test_disable_passes_everything_through(foreign_app):
    plain = run_mpi(2, [foreign_app], preload=False)
    disabled = run_mpi(2, [foreign_app], env={"COMMLIB_DISABLE": "1", "COMMLIB_STATS": "1"})
    assert disabled.returncode == 0, disabled.stderr
    assert rank_lines(disabled.stdout) == rank_lines(plain.stdout)
    assert "commlib[" not in disabled.stderr  # nothing intercepted, nothing reported


def test_no_pack_knob_forwards_and_says_why(foreign_app):
    proc = run_mpi(1, [foreign_app], env={"COMMLIB_NO_PACK": "1", "COMMLIB_STATS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "MPI_Pack calls=2 fast=0 fallback=2" in proc.stderr
    assert "no-pack-knob=3" in proc.stderr  # two packs and the unpack


VERSION_STRINGS = {"MPICH": "MPICH Version: 5.0.2", "Open MPI": "Open MPI v4.1.6, package: Debian"}


def test_other_mpi_family_is_refused_in_one_line(tmp_path):
    exe = build_c("tests/c/fake_family.c", tmp_path, extra_flags=["-rdynamic"])
    built = native.build_info()["mpi_family"]
    other = "Open MPI" if built != "Open MPI" else "MPICH"
    env = dict(os.environ, LD_PRELOAD=paths.preload_library(), FAKE_MPI_VERSION=VERSION_STRINGS[other])
    env.pop("COMMLIB_REEXECUTED", None)
    proc = subprocess.run([exe], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("commlib:")]
    assert len(lines) == 1, proc.stderr
    assert f"uses {other}" in lines[0] and f"built for {built}" in lines[0], proc.stderr
    # ran exactly once, and without the interposer
    assert proc.stdout.count("ran:") == 1
    assert "libcommlib" not in proc.stdout


def test_same_family_runs_with_the_interposer(tmp_path):
    exe = build_c("tests/c/fake_family.c", tmp_path, extra_flags=["-rdynamic"])
    built = native.build_info()["mpi_family"]
    env = dict(os.environ, LD_PRELOAD=paths.preload_library(), FAKE_MPI_VERSION=VERSION_STRINGS[built])
    proc = subprocess.run([exe], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0 and "commlib:" not in proc.stderr
    assert "libcommlib" in proc.stdout


def test_threads_commit_pack_and_free_concurrently(tmp_path):
    exe = build_c("tests/c/threads_pack.c", tmp_path, extra_flags=["-pthread"])
    proc = run_mpi(1, [exe])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = next(line for line in proc.stdout.splitlines() if line.startswith("threads_pack:"))
    if "skipped" in line:
        pytest.skip(line)
    fields = dict(kv.split("=") for kv in line.split()[1:])
    assert fields["mismatches"] == "0"
    assert int(fields["fast"]) == 4 * 400  # every pack went through commlib's own path
