"""`commlib bench pipeline` runs every backend and operation, checks each pipelined result
against the GEMM then the collective, and derives its figures from the times it printed.
No timing is asserted: on a 2-core machine the figures mean nothing."""
import csv
import json
import subprocess

import pytest

from harness import clean_env, commlib_cli

OPS = ["all_reduce", "reduce_scatter", "all_gather"]


def bench(args, cwd, timeout=600):
    proc = subprocess.run([*commlib_cli(), "bench", "pipeline", *args], env=clean_env(), capture_output=True,
                          text=True, timeout=timeout, cwd=cwd)
    print(proc.stdout, proc.stderr)
    return proc


def torch_installed():
    try:
        import torch  # noqa: F401
        return True
    except ImportError:
        return False


def check_case(c, chunks):
    assert [x["k"] for x in c["chunks"]] == chunks
    for key in ("produce_us", "collective_us", "sequential_us"):
        assert c[key] > 0, (key, c)
    for x in c["chunks"]:
        assert x["verified"], (c["backend"], c["op"], x)
        assert x["pipelined_us"] > 0 and x["chunked_us"] > 0 and x["products_in_pipeline_us"] > 0, x
        assert x["exposed_us"] == pytest.approx(x["pipelined_us"] - c["produce_us"])
        assert x["hidden"] == pytest.approx(1 - x["exposed_us"] / c["collective_us"])
        assert x["speedup"] == pytest.approx(c["sequential_us"] / x["pipelined_us"])
        assert x["gemm_slowdown"] == pytest.approx(x["products_in_pipeline_us"] / c["produce_us"])
    best = min(c["chunks"], key=lambda x: x["pipelined_us"])
    assert c["best_k"] == best["k"]
    assert c["goal_met"] == (best["speedup"] >= 1.3 and best["exposed_share"] <= 0.2)


def test_quick_every_op_json_and_csv(tmp_path):
    out, table = tmp_path / "pipeline.json", tmp_path / "pipeline.csv"
    proc = bench(["--quick", "--backends", "numpy,torch,cuda", "--json", str(out), "--csv", str(table)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert [r["ranks"] for r in result["runs"]] == [2]
    run = result["runs"][0]
    assert run["meta"]["transport"] == "shm" and run["threads"] >= 1
    backends = ["numpy"] + (["torch"] if torch_installed() else [])
    assert run["meta"]["backends"][:len(backends)] == backends
    cases = result["cases"]
    assert [(c["backend"], c["op"]) for c in cases if c["backend"] != "cuda"] == [(b, o) for b in backends for o in OPS]
    for c in cases:
        check_case(c, [1, 2, 4])
        assert c["calibrated"] and c["rows"] == 256 and c["cols"] == 256 and c["comm_bytes"] == 256 * 256 * 4
        assert 32 <= c["free"] <= 32768
        # the calibrated dimension: K for all_reduce and reduce_scatter, N for all_gather
        assert (c["m"], c["n"] if c["op"] != "all_gather" else c["k_inner"]) == (256, 256)
    s = result["summary"]
    assert s["cases"] == len(cases) and s["unverified"] == [] and s["geomean_best_speedup"] > 0
    assert s["slowest"]["speedup"] == min(c["best"]["speedup"] for c in cases)
    assert "best k per case: geomean speed-up" in proc.stdout and "goal " in proc.stdout
    assert proc.stdout.count("best k=") == len(cases)
    with open(table) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * len(cases)
    assert sum(r["best"] == "yes" for r in rows) == len(cases)
    assert all(float(r["speedup"]) > 0 for r in rows)


def test_four_ranks_given_sizes_mpi_transport(tmp_path):
    out = tmp_path / "pipeline.json"
    proc = bench(["--ranks", "4", "--backends", "numpy", "--ops", "all_reduce,all_gather", "--sizes", "96x40x24",
                  "--chunks", "1,3", "--target-ms", "2", "--rounds", "2", "--engine-transport", "mpi",
                  "--json", str(out)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    run = result["runs"][0]
    assert run["ranks"] == 4 and run["meta"]["transport"] == "mpi"
    assert [c["op"] for c in result["cases"]] == ["all_reduce", "all_gather"]
    for c in result["cases"]:
        check_case(c, [1, 3])
        assert not c["calibrated"] and c["free"] == 24 and c["ranks"] == 4
    ar, ag = result["cases"]
    assert (ar["m"], ar["n"], ar["k_inner"]) == (96, 40, 24)   # the all-reduce moves M x N
    assert (ag["m"], ag["k_inner"], ag["n"]) == (96, 40, 24)   # the all-gather moves M x K


@pytest.mark.parametrize("args", [["--ops", "broadcast"], ["--backends", "cupy"], ["--sizes", "12"],
                                  ["--chunks", "0"], ["--ranks", "x"], ["--rounds", "0"]])
def test_bad_arguments(tmp_path, args):
    proc = bench(args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "usage:" in proc.stderr
