"""`commlib bench p2p`: every measurement runs and is verified by its receiver, the tables
and files hold what the benchmark says, and wrong data fails the run.  No timing is
asserted: the figures are for people.

Without a GPU only the host rows run; the fake CUDA driver (tests/c/fake_cuda.c) gives the
device rows a device whose memory the CPU cannot touch, so they run here too (through
commlib's staging; their times mean nothing there).  Small windows and few iterations keep
the runs short."""
import csv
import json
import os
import subprocess

import pytest

from harness import commlib_cli

SIZES = [8, 64, 1024]
LAYOUTS = ["contiguous", "strided"]
FAST = ["--sizes", "8,64,1K", "--window", "4", "--target-ms", "2", "--min-iters", "3"]


def bench(args, cwd, env=None, timeout=120):
    full_env = dict(os.environ)
    full_env.update(env or {})
    proc = subprocess.run([*commlib_cli(), "bench", "p2p", *args], capture_output=True, text=True,
                          cwd=cwd, env=full_env, timeout=timeout)
    print(proc.stdout, proc.stderr)
    return proc


def check_result(result, gpu):
    assert result["benchmark"] == "p2p" and result["sizes"] == SIZES and result["layouts"] == LAYOUTS
    assert result["gpu"] == gpu
    summary = result["summary"]
    assert summary["failed"] == [] and summary["mismatched"] == []
    runs = result["runs"]
    assert [run["memory"] for run in runs] == (["host", "device"] if gpu else ["host"])
    for run in runs:
        assert run["returncode"] == 0 and run["error"] is None, run
        kinds = {(m["memory"], m["layout"], m["op"], m["bytes"]) for m in run["measurements"]}
        memories = ["memcpy", "device"] if run["memory"] == "device" else ["host"]
        want = {(mem, layout, op, size) for mem in memories for layout in LAYOUTS for op in ("latency", "bandwidth")
                for size in SIZES if mem != "memcpy" or layout == "contiguous"}
        assert kinds == want, run
        for m in run["measurements"]:
            assert m["verified"] and m["time_us"] > 0 and 0 < m["min_us"] <= m["time_us"], m
            assert m["iters"] >= 3, m
            if m["op"] == "bandwidth":
                assert m["window"] == 4 and m["gbps"] == pytest.approx(4 * m["bytes"] / (m["time_us"] * 1e3)), m
            else:
                assert m["window"] == 1 and m["gbps"] is None, m
            # strided: every other double, so the buffer spans twice the payload less a gap
            span = 2 * m["bytes"] - 8 if m["layout"] == "strided" and m["memory"] != "memcpy" else m["bytes"]
            assert m["span_bytes"] == span, m
    rows = result["rows"]
    assert [(r["layout"], r["bytes"]) for r in rows] == [(layout, s) for layout in LAYOUTS for s in SIZES]
    for r in rows:
        assert r["verified"] and r["host_latency_us"] > 0 and r["host_bandwidth_gbps"] > 0, r
        if gpu:
            assert r["device_latency_us"] > 0 and r["memcpy_bandwidth_gbps"] > 0, r
            assert r["latency_ratio"] == pytest.approx(r["device_latency_us"] / r["host_latency_us"]), r
            assert r["bandwidth_ratio"] == pytest.approx(r["device_bandwidth_gbps"] / r["memcpy_bandwidth_gbps"]), r
            assert r["measurements"] == 6, r
        else:
            assert r["device_latency_us"] is None and r["latency_ratio"] is None and r["bandwidth_ratio"] is None
            assert r["measurements"] == 2, r
    if gpu:
        lat, bw = summary["latency_ratio"], summary["bandwidth_ratio"]
        assert lat["n"] == bw["n"] == len(rows)
        assert lat["slowest"]["ratio"] == max(r["latency_ratio"] for r in rows)
        assert bw["slowest"]["ratio"] == min(r["bandwidth_ratio"] for r in rows)
        latency_goal = summary["goals"][next(g for g in summary["goals"] if "latency" in g)]
        assert set(latency_goal["values"]) == set(LAYOUTS) and latency_goal["met"] is not None
    # no 4 MiB row: the bandwidth goal cannot be judged
    assert summary["goals"][next(g for g in summary["goals"] if "bandwidth" in g)]["met"] is None


def test_host_rows_json_and_csv(tmp_path):
    # cwd outside the checkout: `commlib` must be the installed package
    out, table = tmp_path / "p2p.json", tmp_path / "p2p.csv"
    proc = bench([*FAST, "--json", str(out), "--csv", str(table)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    check_result(result, result["gpu"])
    if not result["gpu"]:
        assert "device rows (device through commlib, memcpy) skipped" in proc.stdout
        assert result["device_skipped"]
    assert "latency: half round trip, median" in proc.stdout
    assert "goal n/a     device bandwidth at 4 MiB >= 50% of device-to-device memcpy" in proc.stdout
    with open(table) as f:
        lines = list(csv.DictReader(f))
    measured = [m for run in result["runs"] for m in run["measurements"]]
    assert [(r["memory"], r["layout"], r["op"], int(r["bytes"]), r["verified"]) for r in lines] == \
        [(m["memory"], m["layout"], m["op"], m["bytes"], "True") for m in measured]


def test_device_rows_on_the_fake_driver(tmp_path, fake_cuda_env):
    out = tmp_path / "p2p.json"
    proc = bench([*FAST, "--json", str(out)], cwd=tmp_path, env=fake_cuda_env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    check_result(result, True)
    device = result["runs"][1]
    assert device["meta"]["device"] == "fake_cuda" and device["meta"]["commlib"] == "preloaded"
    assert result["runs"][0]["meta"]["commlib"] == "absent"     # the baseline is the plain host MPI
    assert "device bandwidth / device-to-device memcpy bandwidth (higher is better)" in proc.stdout
    assert "goal MET" in proc.stdout or "goal MISSED" in proc.stdout


def test_wrong_data_fails_the_run(tmp_path, fake_cuda_env):
    """BENCH_P2P_CORRUPT=1: rank 1 flips a byte of the first message it checks, in each run."""
    out = tmp_path / "p2p.json"
    proc = bench([*FAST, "--layouts", "contiguous", "--json", str(out)], cwd=tmp_path,
                 env={**fake_cuda_env, "BENCH_P2P_CORRUPT": "1"})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert result["summary"]["mismatched"] == ["host latency contiguous 8 B", "device latency contiguous 8 B"]
    assert "DATA WRONG (the receiver's check failed) in: host latency contiguous 8 B, device latency" in proc.stdout
    assert "note: host run: MISMATCH host contiguous latency 8 bytes: rank 1, message 0" in proc.stdout
    bad = [r for r in result["rows"] if not r["verified"]]
    assert [(r["layout"], r["bytes"]) for r in bad] == [("contiguous", 8)]
    assert "MISMATCH" in proc.stdout.split("bandwidth:")[0]      # the latency table's row says so


@pytest.mark.parametrize("args", [["--sizes", "12"], ["--sizes", "4"], ["--sizes", "x"],
                                  ["--layouts", "diagonal"], ["--window", "0"]])
def test_bad_arguments(tmp_path, args):
    proc = bench(args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "usage:" in proc.stderr
