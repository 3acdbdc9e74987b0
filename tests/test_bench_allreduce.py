"""`commlib bench allreduce`: the engine's columns (MPIComm.all_reduce over shared memory and
over the MPI transport) beside MPI_Allreduce and gloo, the ratios and the goal lines come
out of the times the run measured.  No timing is asserted."""
import csv
import json
import subprocess

import pytest

from harness import clean_env, commlib_cli

QUICK_SIZES = [1 << 10, 1 << 12, 1 << 14, 1 << 16, 1 << 18, 1 << 20]


def bench(args, cwd, timeout=600):
    proc = subprocess.run([*commlib_cli(), "bench", "allreduce", *args], env=clean_env(), capture_output=True,
                          text=True, timeout=timeout, cwd=cwd)
    print(proc.stdout, proc.stderr)
    return proc


def torch_installed():
    try:
        import torch.distributed  # noqa: F401
        return True
    except ImportError:
        return False


def check_world(w, columns, world):
    rows = w["rows"]
    assert [r["bytes"] for r in rows] == QUICK_SIZES
    for r in rows:
        assert sorted(r["busbw_GBps"]) == sorted(columns), r
        for c in columns:
            assert r["seconds"][c] > 0
            assert r["busbw_GBps"][c] == pytest.approx(r["bytes"] / r["seconds"][c] * 2 * (world - 1) / world / 1e9)
        for name, (a, b) in {"engine/MPI": ("engine", "MPI"), "engine/gloo": ("engine", "gloo"),
                             "engine-mpi/MPI": ("engine-mpi", "MPI")}.items():
            if a in columns and b in columns:
                assert r["ratios"][name] == pytest.approx(r["busbw_GBps"][a] / r["busbw_GBps"][b])
            else:
                assert name not in r["ratios"]


def test_engine_columns_quick(tmp_path):
    out, table = tmp_path / "allreduce.json", tmp_path / "allreduce.csv"
    proc = bench(["--quick", "--columns", "engine,engine-mpi,mpi,gloo", "--json", str(out), "--csv", str(table)],
                 cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert list(report["worlds"]) == ["2"] and report["recovery_s"] is None
    w = report["worlds"]["2"]
    columns = ["engine", "engine-mpi", "MPI"] + (["gloo"] if torch_installed() else [])
    check_world(w, columns, 2)
    assert "engine: transport shm, results checked" in w["notes"]
    assert "engine-mpi: transport mpi, results checked" in w["notes"]
    for col in ("engine", "engine-mpi"):
        g = w["goals"][col]
        big = [r for r in w["rows"] if r["bytes"] >= 1 << 20]
        assert g["min_vs_mpi"] == pytest.approx(min(r["ratios"][f"{col}/MPI"] for r in big))
        assert g["met"] in (True, False)
        assert f"world 2, {col}: >= MPI_Allreduce" in proc.stdout
    assert "engine/MPI" in proc.stdout and "elastic" not in proc.stdout
    with open(table) as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == len(QUICK_SIZES) * len(columns)
    assert all(float(line["busbw_GBps"]) > 0 for line in lines)


def test_engine_and_elastic_three_ranks(tmp_path):
    out = tmp_path / "allreduce.json"
    proc = bench(["--quick", "--worlds", "3", "--k", "2", "--iters", "1", "--columns", "elastic,engine,mpi",
                  "--json", str(out)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    check_world(report["worlds"]["3"], ["elastic k=2", "engine", "MPI"], 3)
    assert "engine: transport shm, results checked" in report["worlds"]["3"]["notes"]


@pytest.mark.parametrize("args", [["--columns", "nccl"], ["--worlds", "1"], ["--iters", "0"], ["--k", "x"],
                                  ["--columns", "mpi", "--no-mpi"]])
def test_bad_arguments(tmp_path, args):
    proc = bench(args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "usage:" in proc.stderr
