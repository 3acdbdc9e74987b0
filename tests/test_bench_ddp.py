"""`commlib bench ddp --quick`: DDP over the commlib torch backend beside gloo, one row per
(model, world, backend), the ratios and goal lines derived from the times the run measured,
and parameter parity verified across the ranks of every run.  No timing is asserted."""
import csv
import json
import re
import subprocess

import pytest

from harness import clean_env, commlib_cli

pytest.importorskip("torch.distributed")

HEAD = ["model", "ranks", "backend", "step ms", "compute ms", "exposed ms", "comm", "vs gloo", "parity"]
GOAL = "DDP step >= 1.5x faster than gloo on CPU at 4 ranks where gloo spends >= 30 % of its step communicating"


def bench(args, cwd, timeout=600):
    proc = subprocess.run([*commlib_cli(), "bench", "ddp", *args], env=clean_env(), capture_output=True,
                          text=True, timeout=timeout, cwd=cwd)
    print(proc.stdout, proc.stderr)
    return proc


def table(stdout):
    """The rows of the printed table, as lists of cells (a row's model and ranks carried down)."""
    lines = stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if [c.strip() for c in line.split("|")] == HEAD)
    assert set(lines[at + 1]) <= set("-+"), lines[at + 1]
    rows, model, ranks = [], None, None
    for line in lines[at + 2:]:
        cells = [c.strip() for c in line.split("|")]
        if len(cells) != len(HEAD):
            break
        model, ranks = cells[0] or model, cells[1] or ranks
        rows.append([model, ranks, *cells[2:]])
    return rows


def test_quick(tmp_path):
    out, sheet = tmp_path / "ddp.json", tmp_path / "ddp.csv"
    proc = bench(["--quick", "--json", str(out), "--csv", str(sheet)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    rows = table(proc.stdout)
    assert [(r[0], r[1], r[2]) for r in rows] == [("transformer", "2", "gloo"), ("transformer", "2", "commlib"),
                                                  ("mlp", "2", "gloo"), ("mlp", "2", "commlib")]
    for r in rows:
        step, compute, exposed = (float(v) for v in r[3:6])
        assert step > 0 and compute > 0
        assert exposed == pytest.approx(step - compute, abs=0.016)  # each printed to 0.01 ms
        assert re.fullmatch(r"-?\d+%", r[6]), r
        if r[2] == "gloo":
            assert r[7] == "-"
        else:
            assert re.fullmatch(r"\d+\.\d\dx", r[7]), r
        assert r[8] == "ok", r

    result = json.loads(out.read_text())
    assert result["quick"] and result["device"] == "cpu" and result["rounds"] == 1
    assert [(r["world"], r["backend"], r["returncode"]) for r in result["runs"]] == [(2, "gloo", 0), (2, "commlib", 0)]
    assert result["runs"][1]["meta"]["transport"] == "shm"
    for r in result["runs"]:
        assert r["threads"] == max(1, result["cores"] // 2) == r["meta"]["threads"]
    cases = result["cases"]
    assert [(c["model"], c["ranks"]) for c in cases] == [("transformer", 2), ("mlp", 2)]
    for c in cases:
        assert c["params"] > 0 and c["grad_bytes"] == 4 * c["params"]
        gloo, mine = c["backends"]["gloo"], c["backends"]["commlib"]
        for x in (gloo, mine):
            assert x["exposed_s"] == pytest.approx(x["step_s"] - x["compute_s"])
            assert x["comm_share"] == pytest.approx(x["exposed_s"] / x["step_s"])
            [r] = x["rounds"]  # one round: the figures are its own, the slowest rank's medians
            assert len(r["rank_step_s"]) == len(r["rank_compute_s"]) == 2
            assert x["step_s"] == r["step_s"] == max(r["rank_step_s"])
            assert x["compute_s"] == r["compute_s"] == max(r["rank_compute_s"])
            p = x["parity"]
            assert p["ok"] and p["checksums_equal"] and p["bitwise_equal"] and p["moved"], p
        assert mine["vs_gloo"] == pytest.approx(gloo["step_s"] / mine["step_s"])
        assert gloo["vs_gloo"] is None
        # the same steps on the same data: the backends end with (nearly) the same parameters
        assert mine["checksum_rel_diff_vs_gloo"] < 1e-4

    s = result["summary"]
    assert s["parity_failed"] == []
    ratios = [c["backends"]["commlib"]["vs_gloo"] for c in cases]
    assert s["backends"]["commlib"]["slowest"]["vs_gloo"] == min(ratios)
    assert s["backends"]["commlib"]["geomean_vs_gloo"] == pytest.approx((ratios[0] * ratios[1]) ** 0.5)
    assert "commlib vs gloo (gloo's step / commlib's): geomean" in proc.stdout and "slowest" in proc.stdout
    for m in ("transformer", "mlp"):  # no 4-rank run in --quick
        assert s["goals"][m]["status"] == "NOT APPLICABLE"
        assert f"goal NOT APPLICABLE  {m}: {GOAL} (no 4-rank run)" in proc.stdout
    assert "parity verified: in all 4 runs" in proc.stdout
    assert "torch.set_num_threads(" in proc.stdout

    with open(sheet) as f:
        lines = list(csv.DictReader(f))
    assert [(x["model"], x["backend"]) for x in lines] == [(r[0], r[2]) for r in rows]
    assert all(x["parity_ok"] == "yes" for x in lines)


def test_goal_decision():
    """The goal line's MET / MISSED / NOT APPLICABLE from made-up figures (no run)."""
    from commlib.bench import ddp

    def case(model, ranks, gloo_step, gloo_compute, commlib_step):
        def x(step, compute):
            return {"step_s": step, "compute_s": compute, "comm_share": (step - compute) / step}
        c = {"model": model, "ranks": ranks, "backends": {"gloo": x(gloo_step, gloo_compute),
                                                          "commlib": x(commlib_step, gloo_compute)}}
        c["backends"]["commlib"]["vs_gloo"] = gloo_step / commlib_step
        return c
    cases = [case("mlp", 4, 10.0, 5.0, 6.0),           # gloo 50 % communicating, 1.67x: met
             case("transformer", 4, 10.0, 5.0, 8.0),   # 1.25x: missed
             case("transformer", 2, 10.0, 1.0, 1.0)]   # 2 ranks: not the goal's
    assert ddp.goal_for(cases, "mlp", "cpu")[0] == "MET"
    assert ddp.goal_for(cases, "transformer", "cpu")[0] == "MISSED"
    assert ddp.goal_for(cases, "mlp", "cuda")[0] == "NOT APPLICABLE"
    assert ddp.goal_for([case("mlp", 4, 10.0, 8.0, 1.0)], "mlp", "cpu")[0] == "NOT APPLICABLE"  # gloo 20 %
    assert ddp.goal_for([case("mlp", 2, 10.0, 5.0, 1.0)], "mlp", "cpu") == ("NOT APPLICABLE", "no 4-rank run")


@pytest.mark.parametrize("args", [["--worlds", "1"], ["--models", "resnet"], ["--backends", "nccl"],
                                  ["--steps", "0"], ["--tf-dim", "30", "--tf-heads", "4"], ["--backends", "mpi"]])
def test_bad_arguments(tmp_path, args):
    proc = bench(args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "usage:" in proc.stderr
