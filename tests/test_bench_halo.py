"""`commlib bench halo`: every configuration runs and verifies, the table and the files
hold what the benchmark says.  No timing is asserted: the figures are for people.

On a machine without a GPU only the host rows run; the fake CUDA driver
(tests/c/fake_cuda.c) gives the GPU rows a device whose memory the CPU cannot touch, so
they run here too (their times mean nothing there)."""
import csv
import json
import os
import subprocess

import pytest

from commlib.bench import halo
from harness import build_c, commlib_cli

QUICK_SIZES = [8, 16]
MODES = ["pack", "direct"]
HOST_VARIANTS = ["host", "host+commlib"]
ALL_VARIANTS = HOST_VARIANTS + ["stage-host", "device", "device-ipc"]


def bench(args, cwd, env=None, timeout=600):
    full_env = dict(os.environ)
    full_env.pop("COMMLIB_IPC", None)      # the variants set it; the shell's must not leak in
    full_env.update(env or {})
    proc = subprocess.run([*commlib_cli(), "bench", "halo", *args], capture_output=True, text=True,
                          cwd=cwd, env=full_env, timeout=timeout)
    print(proc.stdout, proc.stderr)
    return proc


def check_result(result, sizes, variants):
    assert result["benchmark"] == "halo"
    assert result["variants"] == variants
    assert result["summary"]["failed"] == [] and result["summary"]["mismatched"] == []
    results = result["results"]
    assert [(r["edge"], r["mode"], r["variant"]) for r in results] == \
        [(e, m, v) for e in sizes for m in MODES for v in variants]
    for r in results:
        assert r["verified"] and r["time_us"] > 0 and r["runs"] == result["repeat"], r
        assert r["grid_bytes"] == 3 * (r["edge"] + 4) ** 3 * 8, r
        assert r["commlib"] == (r["variant"] in ("host+commlib", "device", "device-ipc")), r
        if r["baseline"]:
            assert r["speedup"] == pytest.approx(r["baseline_us"] / r["time_us"]), r
        if r["variant"] in ("device", "device-ipc"):
            assert r["baseline"] == "stage-host" and r["memory"] == "device", r
            assert r["speedup_vs_host"] == pytest.approx(r["host_us"] / r["time_us"]), r
        else:
            assert r["speedup_vs_host"] is None, r
    assert len(result["rows"]) == len(sizes) * len(MODES)
    for row in result["rows"]:
        assert row["host+commlib_speedup"] > 0
        if "device" in variants:
            assert row["device_speedup"] > 0
            assert row["device_vs_host"] == pytest.approx(row["host_us"] / row["device_us"])
        if "device-ipc" in variants:
            assert row["device-ipc_speedup"] == pytest.approx(row["stage-host_us"] / row["device-ipc_us"])
            assert row["device-ipc_vs_host"] == pytest.approx(row["host_us"] / row["device-ipc_us"])
        else:
            assert row["device-ipc_us"] is None and row["device-ipc_speedup"] is None
    # every run printed its own verified summary line
    assert all(run["verified"] and run["error"] is None for run in result["runs"])


def test_quick_json_and_csv(tmp_path):
    # cwd outside the checkout: `commlib` must be the installed package
    out, table = tmp_path / "halo.json", tmp_path / "halo.csv"
    proc = bench(["--quick", "--json", str(out), "--csv", str(table)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    variants = ALL_VARIANTS if result["gpu"] else HOST_VARIANTS
    check_result(result, QUICK_SIZES, variants)
    assert result["ranks"] == 2 and result["rank_counts"] == [2] and result["repeat"] == 1
    if not result["gpu"]:
        assert "GPU rows (stage-host, device, device-ipc) skipped" in proc.stdout
    assert "host memory, commlib vs the host MPI alone" in proc.stdout
    with open(table) as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["edge"]), r["mode"], r["variant"]) for r in rows] == \
        [(r["edge"], r["mode"], r["variant"]) for r in result["results"]]




@pytest.fixture(scope="module")
def halo3d(tmp_path_factory):
    """The example built from this checkout (the installed one may predate a change)."""
    return build_c("examples/halo3d.c", tmp_path_factory.mktemp("halo3d"))


def env_logging_example(tmp_path, halo3d):
    """halo3d behind a script that logs, per rank, the COMMLIB_IPC it was started with,
    whether commlib was preloaded, and the arguments."""
    log = tmp_path / "ranks.log"
    script = tmp_path / "halo3d-logged"
    script.write_text("#!/bin/sh\n"
                      f"echo \"ipc=${{COMMLIB_IPC-unset}} preload=${{LD_PRELOAD:+yes}} $*\" >> '{log}'\n"
                      f"exec '{halo3d}' \"$@\"\n")
    script.chmod(0o755)
    return str(script), log


def test_gpu_rows_on_the_fake_driver(tmp_path, fake_cuda_env, halo3d):
    """Every variant, device-ipc too; the fake driver has no IPC, and today's library knows no
    COMMLIB_IPC, so device-ipc takes the device path: the plumbing is what is checked."""
    out = tmp_path / "halo.json"
    example, log = env_logging_example(tmp_path, halo3d)
    proc = bench(["--quick", "--sizes", "6", "--repeat", "2", "--example", example, "--json", str(out)],
                 cwd=tmp_path, env=fake_cuda_env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert result["gpu"] and result["ipc"] and result["example"] == example
    check_result(result, [6], ALL_VARIANTS)
    assert len(result["runs"]) == 2 * len(MODES) * len(ALL_VARIANTS)
    head = next(line for line in proc.stdout.splitlines() if line.startswith("ranks |"))
    for words in ("device vs stage-host", "device-ipc us", "ipc vs stage-host", "ipc vs host"):
        assert words in head, words
    # what each rank was started with: 2 ranks x 2 modes x 2 rounds per variant
    lines = log.read_text().splitlines()
    assert len(lines) == 2 * len(result["runs"])
    seen = {}
    for line in lines:
        ipc, preload, *args = line.split()
        memory = "--device" if "--device" in args else "--stage-host" if "--stage-host" in args else "host"
        seen[(ipc, preload, memory)] = seen.get((ipc, preload, memory), 0) + 1
    assert seen == {("ipc=1", "preload=yes", "--device"): 8, ("ipc=0", "preload=yes", "--device"): 8,
                    ("ipc=unset", "preload=", "--stage-host"): 8, ("ipc=unset", "preload=yes", "host"): 8,
                    ("ipc=unset", "preload=", "host"): 8}
    assert {run["variant"]: run["env"] for run in result["runs"]} == {
        "host": {}, "host+commlib": {}, "stage-host": {}, "device": {"COMMLIB_IPC": "0"},
        "device-ipc": {"COMMLIB_IPC": "1"}}
    # edge 6 lies outside the goals' 32..192: not judged, and the lines say so
    goals = result["summary"]["goals"]
    assert [g["variant"] for g in goals.values()] == ["device-ipc", "device-ipc"]
    assert all(g["met"] is None and g["n"] == 0 for g in goals.values())
    assert "goal n/a     2x faster than whole-grid staging at 32^3..192^3 (no device-ipc figure" in proc.stdout
    assert "goal n/a     no slower than host memory under the plain MPI at 32^3..192^3" in proc.stdout


def test_no_ipc(tmp_path, fake_cuda_env, halo3d):
    out = tmp_path / "halo.json"
    proc = bench(["--quick", "--no-ipc", "--sizes", "5", "--modes", "direct", "--example", halo3d,
                  "--json", str(out)], cwd=tmp_path, env=fake_cuda_env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert result["gpu"] and not result["ipc"]
    assert result["variants"] == ["host", "host+commlib", "stage-host", "device"]
    assert all(r["verified"] for r in result["results"])
    assert "device-ipc" not in proc.stdout and "device vs stage-host" in proc.stdout
    assert [g["variant"] for g in result["summary"]["goals"].values()] == ["device", "device"]


def goal_rows(figures):
    """Table rows as table_rows makes them: (edge, ipc vs stage-host, ipc vs host) each."""
    return [{"ranks": 2, "edge": e, "mode": "pack", "device-ipc_speedup": s, "device-ipc_vs_host": h}
            for e, s, h in figures]


def test_goals_judge_the_slowest_row_in_range():
    # 16^3 and 256^3 lie outside 32..192: their poor figures do not count
    g = halo.goals(goal_rows([(16, 0.5, 0.1), (32, 2.5, 1.1), (64, 2.0, 1.0), (192, 3.0, 1.4),
                              (256, 0.1, 0.1)]), "device-ipc")
    assert g["vs_stage_host"]["met"] is True and g["vs_host"]["met"] is True
    assert g["vs_stage_host"]["slowest"] == {"name": "2 ranks 64^3 pack", "speedup": 2.0}
    assert g["vs_host"]["n"] == 3 and g["vs_host"]["sizes"] == [32, 64, 192]
    g = halo.goals(goal_rows([(32, 2.5, 1.1), (128, 1.99, 0.97)]), "device-ipc")
    assert g["vs_stage_host"]["met"] is False and g["vs_host"]["met"] is False
    assert g["vs_host"]["slowest"] == {"name": "2 ranks 128^3 pack", "speedup": 0.97}
    assert "goal MISSED  x: device-ipc, slowest 2 ranks 128^3 pack 1.99x over 2 rows (edges 32,128)" == \
        halo.format_goal("x", g["vs_stage_host"])
    # a row of the range without a figure (its run failed) is not a goal met
    g = halo.goals(goal_rows([(32, 2.5, 1.1), (64, None, None)]), "device-ipc")
    assert g["vs_stage_host"]["met"] is False
    assert "1 of 2 rows without a figure" in halo.format_goal("x", g["vs_stage_host"])
    assert halo.goals(goal_rows([(8, 9.0, 9.0)]), "device-ipc")["vs_host"]["met"] is None


def test_host_only(tmp_path, fake_cuda_env, halo3d):
    out = tmp_path / "halo.json"
    proc = bench(["--quick", "--host-only", "--sizes", "5", "--modes", "direct", "--ranks", "3",
                  "--example", halo3d, "--json", str(out)], cwd=tmp_path, env=fake_cuda_env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert not result["gpu"] and result["ranks"] == 3 and result["modes"] == ["direct"]
    assert result["variants"] == HOST_VARIANTS
    assert all(r["ranks"] == 3 for r in result["results"])


def test_several_rank_counts(tmp_path, halo3d):
    """-n 2,3: a row per rank count, each run at its own count; the summary over all rows."""
    out, table = tmp_path / "halo.json", tmp_path / "halo.csv"
    proc = bench(["--quick", "--host-only", "--sizes", "5,6", "--modes", "direct", "-n", "2,3",
                  "--example", halo3d, "--json", str(out), "--csv", str(table)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert result["ranks"] == [2, 3] and result["rank_counts"] == [2, 3]
    assert result["summary"]["failed"] == [] and result["summary"]["mismatched"] == []
    assert [(r["ranks"], r["edge"], r["variant"]) for r in result["results"]] == \
        [(n, e, v) for n in (2, 3) for e in (5, 6) for v in HOST_VARIANTS]
    assert all(r["verified"] and r["time_us"] > 0 for r in result["results"])
    # each run says (halo3d's own summary line) how many ranks it ran on
    assert sorted(run["ranks"] for run in result["runs"]) == [2] * 4 + [3] * 4
    assert all(f"-n {run['ranks']} " in run["command"] for run in result["runs"])
    rows = result["rows"]
    assert [(r["ranks"], r["edge"]) for r in rows] == [(2, 5), (2, 6), (3, 5), (3, 6)]
    spread = result["summary"]["host_commlib_vs_host"]
    speedups = [r["host+commlib_speedup"] for r in rows]
    assert spread["n"] == 4 and spread["min"] == min(speedups) and spread["max"] == max(speedups)
    low = rows[speedups.index(min(speedups))]
    assert spread["slowest"] == {"name": f"{low['ranks']} ranks {low['edge']}^3 direct", "speedup": min(speedups)}
    assert f"slowest {spread['slowest']['name']}" in proc.stdout
    lines = proc.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("ranks"))
    assert [line.split("|")[0].strip() for line in lines[head + 2:head + 6]] == ["2", "2", "3", "3"]
    assert "2,3 ranks, radius 2" in proc.stdout
    with open(table) as f:
        assert [int(r["ranks"]) for r in csv.DictReader(f)] == [2, 2, 2, 2, 3, 3, 3, 3]


@pytest.mark.parametrize("args", [["--modes", "sideways"], ["--sizes", "0"], ["--sizes", "x"],
                                  ["--repeat", "0"], ["-n", "2,0"], ["-n", "two"]])
def test_bad_arguments(tmp_path, args):
    proc = bench(args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "usage:" in proc.stderr


def test_missing_example(tmp_path):
    proc = bench(["--quick", "--example", str(tmp_path / "nothing")], cwd=tmp_path)
    assert proc.returncode == 2
    assert "not an executable" in proc.stderr
