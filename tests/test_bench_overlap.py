"""`commlib bench overlap` runs every configuration, verifies its results and reports sane
rows (the C program's MPI_Iallreduce served by the engine in T and not in P; the Python
rows through MPIComm and mpi4py).  No timing is asserted: the figures are for people, and
on a 2-core machine they mean nothing."""
import csv
import json
import subprocess

import pytest

from harness import clean_env, commlib_cli

QUICK_SIZES = (1 << 10, 64 << 10, 1 << 20)
ALL = ("mpi", "commlib", "thread-mpi", "thread", "py-mpi", "py")
C_CONFIGS = ("mpi", "commlib", "thread-mpi", "thread")


def bench(args, cwd, timeout=600):
    proc = subprocess.run([*commlib_cli(), "bench", "overlap", *args], env=clean_env(), capture_output=True,
                          text=True, timeout=timeout, cwd=cwd)
    print(proc.stdout, proc.stderr)
    return proc


def check_figures(x, where):
    assert x["verified"], where
    assert x["iters"] >= 3 and x["pure_us"] > 0 and x["compute_us"] > 0 and x["overall_us"] > 0, where
    assert 0 <= x["overlap_pct"] <= 100, where
    assert x["step_speedup"] == pytest.approx((x["pure_us"] + x["compute_us"]) / x["overall_us"]), where


def test_quick_json_and_csv(tmp_path):
    out = tmp_path / "overlap.json"
    proc = bench(["--quick", "--json", str(out), "--csv", str(tmp_path / "overlap.csv")], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert result["ranks"] == 2 and list(result["configs"]) == list(ALL)
    meta = {name: c["meta"] for name, c in result["configs"].items()}
    assert meta["mpi"]["commlib_stat"] == "unavailable"
    assert meta["commlib"]["commlib_stat"] == "available" and meta["commlib"]["progress_thread"] == "0"
    for name in ("thread", "thread-mpi"):
        assert meta[name]["progress_thread"] == "1" and meta[name]["thread_level"] == "multiple", name
    assert meta["thread"]["commlib_engine_iallreduce"] == "1" and meta["thread-mpi"]["commlib_engine_iallreduce"] == "0"
    assert meta["py"]["method"] == "engine" and meta["py"]["transport"] == "shm"
    assert meta["py-mpi"]["method"] == "mpi4py" and meta["py"]["compute"] == "spin"

    host = [r for r in result["rows"] if r["buffer"] == "host"]
    assert [(r["op"], r["bytes"]) for r in host] == [(op, s) for op in ("iallreduce", "isend_irecv")
                                                      for s in QUICK_SIZES]
    for r in host:
        names = ALL if r["op"] == "iallreduce" else ("mpi", "commlib", "thread")  # P, M, E: all-reduce only
        assert [c for c in ALL if r.get(c)] == list(names), r
        for name in names:
            x = r[name]
            check_figures(x, (r["op"], r["bytes"], name))
            base = "mpi" if name in C_CONFIGS else "py-mpi"
            assert x["baseline"] == base
            assert x["vs_base"] == pytest.approx(r[base]["overall_us"] / x["overall_us"])
        if r["op"] == "iallreduce":
            # every timed MPI_Iallreduce of T went to the engine, none of P's; E is the engine's
            assert r["thread"]["engine_served"] == r["thread"]["iters"], r
            assert r["thread-mpi"]["engine_served"] == 0 and r["commlib"]["engine_served"] == 0, r
            assert r["py"]["engine_served"] == r["py"]["iters"] and r["py-mpi"]["engine_served"] == -1, r
            assert r["mpi"]["engine_served"] == -1, r
    summary = result["summary"]
    assert set(summary["engine_goals"]) == {"thread", "py"}
    for goal in summary["engine_goals"].values():  # 1 MiB is in the goal's range
        assert goal["met"] in (True, False) and goal["min_step_speedup"] > 0
    assert summary["unverified"] == [] and summary["engine_not_serving_T"] == [] and summary["engine_serving_P"] == []

    for label in ("A", "C", "P", "T", "M", "E"):
        assert f"  {label} = " in proc.stdout
    assert "step x" in proc.stdout and "vs base" in proc.stdout
    assert proc.stdout.count("goal ") == 3   # T and E (issue 9), T (background progress)
    with open(tmp_path / "overlap.csv") as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == sum(1 for r in result["rows"] for c in ALL if r.get(c))
    assert {line["label"] for line in lines} == {"A", "C", "P", "T", "M", "E"}
    assert all(float(line["step_speedup"]) > 0 and float(line["vs_base"]) > 0 for line in lines)
    for r in result["rows"]:  # device rows (with a GPU): the host MPI alone is not given device memory
        assert r["buffer"] == "host" or (r.get("mpi") is None and r["commlib"]["verified"] and r["thread"]["verified"])


def test_python_rows_matmul_compute_and_mpi_transport(tmp_path):
    out = tmp_path / "overlap.json"
    proc = bench(["--configs", "py-mpi,py,py-ring", "--py-compute", "matmul", "--py-matrix", "32", "--sizes",
                  "4K,2M", "--target-ms", "10", "--quick", "--json", str(out)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert list(result["configs"]) == ["py-mpi", "py", "py-ring"] and result["py_compute"] == "matmul"
    assert result["configs"]["py-ring"]["meta"]["transport"] == "mpi"
    assert result["configs"]["py"]["meta"]["transport"] == "shm"
    assert result["configs"]["py-ring"]["knobs"]["OPENBLAS_NUM_THREADS"] == "1"
    assert [(r["op"], r["bytes"]) for r in result["rows"]] == [("iallreduce", 4096), ("iallreduce", 2 << 20)]
    for r in result["rows"]:
        for name in ("py-mpi", "py", "py-ring"):
            check_figures(r[name], (r["bytes"], name))
    assert set(result["summary"]["engine_goals"]) == {"py", "py-ring"}
    assert "  R = " in proc.stdout


def test_only_p_under_isend_irecv_is_dropped(tmp_path):
    # P and the Python rows measure MPI_Iallreduce only: with --ops isend_irecv they drop out
    out = tmp_path / "overlap.json"
    proc = bench(["--configs", "thread-mpi,thread,py", "--ops", "isend_irecv", "--sizes", "8K", "--quick",
                  "--json", str(out)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert list(result["configs"]) == ["thread"]
    assert [(r["op"], r["bytes"]) for r in result["rows"]] == [("isend_irecv", 8192)]


@pytest.mark.parametrize("args", [["--configs", "nonesuch"], ["--ops", "ibcast"], ["--sizes", "x"],
                                  ["--configs", "py", "--ops", "isend_irecv"]])
def test_bad_arguments(tmp_path, args):
    proc = bench(args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "usage:" in proc.stderr
