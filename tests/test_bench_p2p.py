"""`commlib bench p2p`: every measurement runs and is verified by its receiver, the tables
and files hold what the benchmark says, and wrong data fails the run.  No timing is
asserted: the figures are for people.

Without a GPU only the host rows run; the fake CUDA driver (tests/c/fake_cuda.c) gives the
device rows a device whose memory the CPU cannot touch, so they run here too (through
commlib's staging; their times mean nothing there).  The device-ipc rows run there as well:
the fake driver has no IPC, so they take the staged path too, and what is checked is that
they exist, verify, and that COMMLIB_IPC=1 reached both ranks.  Small windows and few
iterations keep the runs short."""
import argparse
import csv
import json
import os
import subprocess

import pytest

from commlib.bench import p2p
from harness import commlib_cli

SIZES = [8, 64, 1024]
LAYOUTS = ["contiguous", "strided"]
FAST = ["--sizes", "8,64,1K", "--window", "4", "--target-ms", "2", "--min-iters", "3"]


def bench(args, cwd, env=None, timeout=120):
    full_env = dict(os.environ)
    full_env.pop("COMMLIB_IPC", None)      # the runs set it; the shell's must not leak in
    full_env.update(env or {})
    proc = subprocess.run([*commlib_cli(), "bench", "p2p", *args], capture_output=True, text=True,
                          cwd=cwd, env=full_env, timeout=timeout)
    print(proc.stdout, proc.stderr)
    return proc


def check_result(result, gpu, ipc=None):
    ipc = gpu if ipc is None else ipc
    assert result["benchmark"] == "p2p" and result["sizes"] == SIZES and result["layouts"] == LAYOUTS
    assert result["gpu"] == gpu and result["ipc"] == ipc
    summary = result["summary"]
    assert summary["failed"] == [] and summary["mismatched"] == []
    runs = result["runs"]
    assert [run["memory"] for run in runs] == ["host"] + (["device"] if gpu else []) + (["device-ipc"] if ipc else [])
    # what the ranks found in their environment (bench_p2p.c prints both ranks' COMMLIB_IPC)
    want_env = {"host": "unset,unset", "device": "0,0", "device-ipc": "1,1"}
    for run in runs:
        assert run["meta"]["commlib_ipc_env"] == want_env[run["memory"]], run["meta"]
        assert run["env"] == ({} if run["memory"] == "host" else {"COMMLIB_IPC": want_env[run["memory"]][0]})
    for run in runs:
        assert run["returncode"] == 0 and run["error"] is None, run
        kinds = {(m["memory"], m["layout"], m["op"], m["bytes"]) for m in run["measurements"]}
        memories = {"device": ["memcpy", "memcpy2d", "device"], "device-ipc": ["device-ipc"]}.get(run["memory"],
                                                                                            ["host"])
        # memcpy: the payload contiguously; memcpy2d: the strided layout by the driver's 2D copy
        only = {"memcpy": "contiguous", "memcpy2d": "strided"}
        want = {(mem, layout, op, size) for mem in memories for layout in LAYOUTS for op in ("latency", "bandwidth")
                for size in SIZES if only.get(mem, layout) == layout}
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
        if ipc:
            assert r["device-ipc_latency_us"] > 0 and r["device-ipc_bandwidth_gbps"] > 0, r
            assert r["ipc_latency_ratio"] == pytest.approx(r["device-ipc_latency_us"] / r["host_latency_us"]), r
            assert r["ipc_bandwidth_ratio"] == pytest.approx(
                r["device-ipc_bandwidth_gbps"] / r["memcpy_bandwidth_gbps"]), r
        else:
            assert r["device-ipc_latency_us"] is None and r["ipc_latency_ratio"] is None, r
            assert r["ipc_bandwidth_ratio"] is None, r
        if not gpu:
            assert r["device_latency_us"] is None and r["latency_ratio"] is None and r["bandwidth_ratio"] is None
        # host 2, device and memcpy 4, memcpy2d 2 (strided rows), device-ipc 2
        assert r["measurements"] == 2 + 4 * gpu + 2 * (gpu and r["layout"] == "strided") + 2 * ipc, r
    if gpu:
        lat, bw = summary["latency_ratio"], summary["bandwidth_ratio"]
        assert lat["n"] == bw["n"] == len(rows)
        assert lat["slowest"]["ratio"] == max(r["latency_ratio"] for r in rows)
        assert bw["slowest"]["ratio"] == min(r["bandwidth_ratio"] for r in rows)
        latency_goal = summary["goals"][next(g for g in summary["goals"] if "latency" in g)]
        assert set(latency_goal["values"]) == set(LAYOUTS) and latency_goal["met"] is not None
        # the better of device and device-ipc per layout, and which
        for layout in LAYOUTS:
            row = next(r for r in rows if r["layout"] == layout and r["bytes"] == 8)
            best = min(v for v in (row["latency_ratio"], row["ipc_latency_ratio"]) if v)
            assert latency_goal["values"][layout] == best
            assert latency_goal["from"][layout] == ("device" if best == row["latency_ratio"] else "device-ipc")
        assert set(latency_goal["device"]) == set(LAYOUTS)
        assert set(latency_goal.get("device-ipc", {})) == (set(LAYOUTS) if ipc else set())
    if ipc:
        lat, bw = summary["ipc_latency_ratio"], summary["ipc_bandwidth_ratio"]
        assert lat["n"] == bw["n"] == len(rows)
        assert lat["slowest"]["ratio"] == max(r["ipc_latency_ratio"] for r in rows)
        assert bw["slowest"]["ratio"] == min(r["ipc_bandwidth_ratio"] for r in rows)
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
    for device in result["runs"][1:]:
        assert device["meta"]["device"] == "fake_cuda" and device["meta"]["commlib"] == "preloaded"
        assert device["meta"]["memory"] == device["memory"]
        # commlib moved the device messages: staged, or GPU to GPU (every size, the 8-byte ones
        # too: COMMLIB_IPC_SMALL is on with COMMLIB_IPC=1)
        stats = device["commlib_stats"]
        if device["memory"] == "device-ipc":
            assert stats["p2p.ipc_send"] > 0 and stats.get("p2p.staged_send", 0) == 0, stats
        else:
            assert stats["p2p.staged_send"] > 0 and stats.get("p2p.ipc_send", 0) == 0, stats
    assert result["runs"][0]["meta"]["commlib"] == "absent"     # the baseline is the plain host MPI
    assert "device bandwidth / device-to-device memcpy bandwidth (higher is better)" in proc.stdout
    assert "device-ipc (COMMLIB_IPC=1) bandwidth / device-to-device memcpy bandwidth" in proc.stdout
    lines = proc.stdout.splitlines()
    latency_head = lines[lines.index("latency: half round trip, median") + 1]
    bandwidth_head = lines[lines.index("bandwidth: a window of messages and a 1-byte answer, median window") + 1]
    assert [c.strip() for c in latency_head.split("|")][3:7] == ["device us", "device/host", "ipc us", "ipc/host"]
    assert [c.strip() for c in bandwidth_head.split("|")][-5:] == \
        ["ipc GB/s", "ipc/memcpy", "2d GB/s", "best/2d", "verified"]
    # the strided layout's own baseline: the driver's 2D copy, verified like every row
    copies2d = [m for run in result["runs"] for m in run["measurements"] if m["memory"] == "memcpy2d"]
    assert {(m["layout"], m["op"]) for m in copies2d} == {("strided", "latency"), ("strided", "bandwidth")}
    assert all(m["verified"] for m in copies2d)
    strided = [r for r in p2p.make_rows(argparse.Namespace(layouts=LAYOUTS, sizes=SIZES), result["runs"])
               if r["layout"] == "strided"]
    assert all(r["bandwidth_2d_ratio"] == max(r["device_bandwidth_gbps"], r["device-ipc_bandwidth_gbps"]) /
               r["memcpy2d_bandwidth_gbps"] for r in strided)
    assert "strided: best of device and device-ipc bandwidth / the driver's 2D copy" in proc.stdout
    goal = next(line for line in lines if "latency at 8 B <=" in line)
    assert goal.startswith(("goal MET", "goal MISSED")) and "(best of device and device-ipc: contiguous" in goal
    counters = next(line for line in lines if line.startswith("commlib counters, device-ipc run, rank 0: "))
    assert "p2p.ipc_send=" in counters and "p2p.staged_send=" not in counters, counters
    assert "was set but the ranks found" not in proc.stdout


def test_no_ipc(tmp_path, fake_cuda_env):
    out = tmp_path / "p2p.json"
    proc = bench([*FAST, "--no-ipc", "--json", str(out)], cwd=tmp_path, env=fake_cuda_env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    check_result(result, True, ipc=False)
    assert "ipc" not in proc.stdout.split("commlib counters")[0]      # no ipc column, summary or goal line
    goal = next(line for line in proc.stdout.splitlines() if "latency at 8 B <=" in line)
    assert "best of" not in goal and goal.endswith(" device)")


def goal_rows(latency):
    """Rows at 8 B: layout -> (device / host latency, device-ipc / host latency)."""
    return [{"layout": layout, "bytes": 8, "name": f"{layout} 8 B", "latency_ratio": d, "ipc_latency_ratio": i,
             "bandwidth_ratio": None, "ipc_bandwidth_ratio": None} for layout, (d, i) in latency.items()]


def test_goals_take_the_better_of_device_and_ipc():
    s = p2p.summarize(goal_rows({"contiguous": (3.0, 1.5), "strided": (1.8, 2.5)}), [])
    g = s["goals"][p2p.GOAL_LATENCY]
    assert g["values"] == {"contiguous": 1.5, "strided": 1.8} and g["met"] is True
    assert g["from"] == {"contiguous": "device-ipc", "strided": "device"}
    assert g["device"] == {"contiguous": 3.0, "strided": 1.8} and g["device-ipc"] == {"contiguous": 1.5, "strided": 2.5}
    assert "goal MET     device latency at 8 B <= 2x the host-memory MPI's (best of device and device-ipc: " \
        "contiguous 1.50x device-ipc, strided 1.80x device)" in p2p.format_summary(s, True, None, ipc=True)
    g = p2p.summarize(goal_rows({"contiguous": (3.0, 2.1), "strided": (1.0, None)}), [])["goals"][p2p.GOAL_LATENCY]
    assert g["met"] is False and g["from"] == {"contiguous": "device-ipc", "strided": "device"}
    assert s["goals"][p2p.GOAL_BANDWIDTH]["met"] is None        # no 4 MiB row


def test_wrong_data_fails_the_run(tmp_path, fake_cuda_env):
    """BENCH_P2P_CORRUPT=1: rank 1 flips a byte of the first message it checks, in each run."""
    out = tmp_path / "p2p.json"
    proc = bench([*FAST, "--layouts", "contiguous", "--json", str(out)], cwd=tmp_path,
                 env={**fake_cuda_env, "BENCH_P2P_CORRUPT": "1"})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert result["summary"]["mismatched"] == ["host latency contiguous 8 B", "device latency contiguous 8 B",
                                               "device-ipc latency contiguous 8 B"]
    assert "DATA WRONG (the receiver's check failed) in: host latency contiguous 8 B, device latency" in proc.stdout
    assert "note: device-ipc run: MISMATCH device-ipc contiguous latency 8 bytes: rank 1, message 0" in proc.stdout
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


def test_pipeline_column(tmp_path, fake_cuda_env):
    """--pipeline: a device-pipe run (COMMLIB_PIPELINE=1) whose 2 MiB messages go in chunks
    (the built-in model cuts them in 3), verified, beside the device run's staged ones."""
    out = tmp_path / "p2p.json"
    proc = bench(["--sizes", "8,2M", "--window", "4", "--target-ms", "2", "--min-iters", "3", "--no-ipc",
                  "--pipeline", "--json", str(out)], cwd=tmp_path, env={**fake_cuda_env, "COMMLIB_MODEL": "0"},
                 timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert [run["memory"] for run in result["runs"]] == ["host", "device", "device-pipe"] and result["pipeline"]
    piped = result["runs"][2]
    assert piped["env"] == {"COMMLIB_IPC": "0", "COMMLIB_PIPELINE": "1"}
    assert {m["memory"] for m in piped["measurements"]} == {"device-pipe"} and len(piped["measurements"]) == 8
    assert all(m["verified"] for m in piped["measurements"])
    assert piped["commlib_stats"]["p2p.pipelined_send"] > 0 and piped["commlib_stats"]["p2p.pipelined_chunks"] > 0
    assert not result["runs"][1]["commlib_stats"].get("p2p.pipelined_send")  # off in the device run
    for r in result["rows"]:
        assert r["pipe_gain"] == pytest.approx(r["device-pipe_bandwidth_gbps"] / r["device_bandwidth_gbps"]), r
    gain = result["summary"]["pipe_gain"]
    assert gain["n"] == 2 and gain["slowest"]["name"].endswith("2 MiB"), gain  # 8 B rows are never cut
    lines = proc.stdout.splitlines()
    bandwidth_head = lines[lines.index("bandwidth: a window of messages and a 1-byte answer, median window") + 1]
    assert [c.strip() for c in bandwidth_head.split("|")][-3:] == ["pipe GB/s", "pipe/device", "verified"]
    assert any(line.startswith("device-pipe (COMMLIB_PIPELINE=1) bandwidth / device bandwidth, sizes >= 1 MiB")
               for line in lines), proc.stdout
