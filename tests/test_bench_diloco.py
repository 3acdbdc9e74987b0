"""`commlib bench diloco --quick`: every mode trained over throttled links beside the
baseline, the table's ratios derived from the times and losses the runs measured, state
parity held in every run.  No timing is asserted."""
import json
import math
import subprocess

import pytest

from harness import clean_env, commlib_cli

pytest.importorskip("torch")


def test_quick_bench_reports_every_mode(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([*commlib_cli(), "bench", "diloco", "--quick", "--rates", "400",
                           "--modes", "ddp,diloco,overlap,streaming,co2", "--quantize", "uint8", "--json", str(out)],
                          env=clean_env(), capture_output=True, text=True, timeout=900, cwd=tmp_path)
    print(proc.stdout, proc.stderr)
    assert proc.returncode == 0
    data = json.loads(out.read_text())
    rows = {r["mode"]: r for r in data["rows"]}
    assert sorted(rows) == ["co2", "ddp", "diloco", "overlap", "streaming"]
    alone = min(a["seconds"] for a in data["alone"])
    for mode, r in rows.items():
        assert r["rate_mbit"] == 400 and r["divergences"] == 0 and r["failures"] == 0
        assert math.isclose(r["util"], alone / r["seconds"], rel_tol=1e-3)
        assert math.isclose(r["loss_vs_ddp"], r["loss"] / rows["ddp"]["loss"], rel_tol=1e-9)
        assert r["loss"] < 4.0  # from about 5.8: every mode learned
        curve = data["curves"][f"{mode}@400"]
        assert len(curve) == 4 and [c[1] for c in curve] == [15, 30, 45, 60]
        assert f"    400 {mode:<10}" in proc.stdout
    goal = data["goal"]
    assert goal is None  # the goal line is for 100 Mbit/s runs
