"""End-to-end tests of examples/halo3d.c, the project's reference workload.

halo3d checks every halo cell itself and prints one summary line; these tests
run it at several rank counts and in both transfer modes (MPI_Pack + MPI_PACKED,
and the subarray datatypes handed straight to MPI), under the interposer and
under plain mpiexec, and make sure its checker really can fail.

Set COMMLIB_TEST_PRELOAD=0 to run the preload tests under plain mpiexec (while
the interposer is not built, say); the comparison test always runs both.
"""
import os
import re

import pytest

from harness import build_c, run_mpi

PRELOAD = os.environ.get("COMMLIB_TEST_PRELOAD", "1") != "0"

SMALL = ["--n", "8", "--radius", "2", "--quantities", "2", "--iters", "3", "--warmup", "1"]

SUMMARY = re.compile(
    r"^halo3d: ranks=(?P<ranks>\d+) dims=(?P<dims>\d+x\d+x\d+) local=(?P<local>\d+x\d+x\d+) "
    r"radius=(?P<radius>\d+) quantities=(?P<q>\d+) mode=(?P<mode>pack|direct) "
    r"iters=(?P<iters>\d+) time/exchange=(?P<time>[0-9.]+) us verified=(?P<verdict>.*)$",
    re.M)


@pytest.fixture(scope="module")
def halo3d(tmp_path_factory):
    return build_c("examples/halo3d.c", tmp_path_factory.mktemp("halo3d"))


def run(binary, n, args, preload=PRELOAD):
    return run_mpi(n, [binary, *args], preload=preload, timeout=240)


def summary(proc):
    """The one summary line rank 0 prints, parsed; fails the test if absent."""
    found = SUMMARY.findall(proc.stdout)
    assert len(found) == 1, f"expected one summary line\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return SUMMARY.search(proc.stdout)


def without_time(line):
    return re.sub(r"time/exchange=[0-9.]+ us ", "", line)


def check_ok(proc, n, mode, local):
    m = summary(proc)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert m["verdict"] == "OK", m.group(0)
    assert int(m["ranks"]) == n
    px, py, pz = map(int, m["dims"].split("x"))
    assert px * py * pz == n
    assert m["mode"] == mode
    assert m["local"] == local
    assert float(m["time"]) > 0


@pytest.mark.parametrize("mode", ["pack", "direct"])
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_verified(halo3d, n, mode):
    proc = run(halo3d, n, [*SMALL, "--mode", mode])
    check_ok(proc, n, mode, "8x8x8")


@pytest.mark.parametrize("mode", ["pack", "direct"])
@pytest.mark.parametrize("n", [1, 3, 6])
def test_uneven_box(halo3d, n, mode):
    # Unequal edges catch a swapped axis in the subarray sizes or the
    # neighbour lookup; 3 and 6 ranks give unequal process grids too.
    proc = run(halo3d, n, ["--nx", "6", "--ny", "7", "--nz", "5", "--radius", "1",
                           "--quantities", "2", "--iters", "3", "--mode", mode])
    check_ok(proc, n, mode, "6x7x5")


@pytest.mark.parametrize("mode", ["pack", "direct"])
def test_radius_equals_edge(halo3d, mode):
    # The widest halo allowed: send strips of opposite sides meet in the middle.
    proc = run(halo3d, 2, ["--nx", "3", "--ny", "4", "--nz", "3", "--radius", "3",
                           "--iters", "2", "--mode", mode])
    check_ok(proc, 2, mode, "3x4x3")


def test_defaults(halo3d):
    proc = run(halo3d, 2, ["--iters", "2", "--warmup", "0"])
    m = summary(proc)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (m["local"], m["radius"], m["q"], m["mode"]) == ("32x32x32", "2", "3", "pack")
    assert m["verdict"] == "OK"


@pytest.mark.parametrize("mode", ["pack", "direct"])
@pytest.mark.parametrize("n", [1, 4])
def test_corrupt_is_detected(halo3d, n, mode):
    # --corrupt (hidden) bumps one halo cell on the last rank after the
    # exchange; the checker must notice it, whichever rank it lands on.
    proc = run(halo3d, n, [*SMALL, "--mode", mode, "--corrupt"])
    m = summary(proc)
    assert m["verdict"] == "FAILED (1 mismatched cells)", m.group(0)
    assert proc.returncode != 0


@pytest.mark.parametrize("args", [
    ["--bogus"],
    ["--mode", "sideways"],
    ["--n", "four"],
    ["--n", "4", "--radius", "5"],
    ["--radius", "0"],
    ["--iters"],
])
def test_bad_flag_exits_2(halo3d, args):
    proc = run(halo3d, 2, args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "usage:" in proc.stderr
    assert "verified=" not in proc.stdout


def test_help(halo3d):
    proc = run(halo3d, 1, ["--help"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "usage:" in proc.stdout and "--mode" in proc.stdout


@pytest.mark.parametrize("mode", ["pack", "direct"])
def test_same_with_and_without_preload(halo3d, mode):
    args = ["--nx", "6", "--ny", "5", "--nz", "4", "--radius", "2", "--quantities", "3",
            "--iters", "2", "--mode", mode]
    plain = run(halo3d, 4, args, preload=False)
    preloaded = run(halo3d, 4, args, preload=True)
    assert plain.returncode == 0, plain.stdout + plain.stderr
    assert preloaded.returncode == 0, preloaded.stdout + preloaded.stderr
    a, b = summary(plain).group(0), summary(preloaded).group(0)
    assert without_time(a) == without_time(b)
    assert a.endswith("verified=OK")
