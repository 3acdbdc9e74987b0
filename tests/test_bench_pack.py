"""`commlib bench pack`: every shape runs, both implementations pack the same bytes.

No timing is asserted: the figures are for people; these tests check that the benchmark
measures what it says (the shapes, positive times, the byte comparison, the counters).
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from commlib import paths
from harness import clean_env
from commlib.bench import pack

TARGETS = {"1KiB": 1 << 10, "1MiB": 1 << 20, "4MiB": 4 << 20}
MAX_EXTENT = 512 << 20      # the benchmark's default -m


def expected_shapes():
    """The shape names of the default run, from the rules of the benchmark (not its code)."""
    names = [f"face_{axis}_t{t}" for t in (1, 2) for axis in "xyz"]
    for label in TARGETS:
        for b in (1, 8, 24, 64, 512):
            names.append(f"vec_{label}_b{b}_s{max(2 * b, 16)}")
    for label, target in TARGETS.items():
        for b in (1, 2, 4, 8, 32, 64, 128, 256, 512):
            count = target // b
            if (count - 1) * 512 + b <= MAX_EXTENT:
                names.append(f"vec_{label}_b{b}_s512")
    names += ["hvec_1MiB_b8_s512", "subarr_1MiB_b8_s512"]
    return names


def have_core():
    return os.path.exists(os.path.join(paths.PACKAGE_DIR, "libcommlib.so"))


def check_rows(rows):
    for r in rows:
        assert r["commlib_ns"] > 0 and r["host_ns"] > 0, r
        assert r["commlib_gbps"] > 0 and r["host_gbps"] > 0, r
        assert r["rounds"] >= 1 and r["commlib_calls"] >= 1, r
        assert r["total_bytes"] > 0 and 0 < r["block_bytes"] <= r["total_bytes"], r


@pytest.mark.skipif(not have_core(), reason="libcommlib.so not built")
def test_bench_pack_quick(tmp_path):
    # cwd outside the checkout: `-m commlib` must find the installed package, not the
    # unbuilt source tree
    out = tmp_path / "pack.json"
    proc = subprocess.run([sys.executable, "-m", "commlib", "bench", "pack", "--quick",
                           "--json", str(out), "--csv", str(tmp_path / "pack.csv")],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path, env=clean_env())
    print(proc.stdout, proc.stderr)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    rows = result["shapes"]
    assert [r["name"] for r in rows] == expected_shapes()
    mismatched = [r["name"] for r in rows if not r["identical"]]
    assert not mismatched, f"commlib packed different bytes than the host MPI: {mismatched}"
    check_rows(rows)
    # The preload took: commlib's counters are in the process and moved.
    assert result["commlib_active"], "commlib_stat not found: libcommlib.so was not preloaded"
    assert sum(r["stat_fast"] + r["stat_fallback"] for r in rows) > 0
    assert result["summary"]["geomean_speedup"] > 0
    assert (tmp_path / "pack.csv").read_text().count("\n") == len(rows) + 1


def test_bench_pack_control_without_commlib(tmp_path):
    """--no-preload: both columns are the host MPI; runs before the core exists."""
    out = tmp_path / "pack.json"
    proc = subprocess.run([sys.executable, "-m", "commlib.bench.pack", "--no-preload", "--quick",
                           "--filter", "1KiB", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=clean_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    rows = result["shapes"]
    assert [r["name"] for r in rows] == [n for n in expected_shapes() if "1KiB" in n]
    assert all(r["identical"] for r in rows)
    assert not result["commlib_active"]
    assert all(r["commlib_path"] == "n/a" for r in rows)
    check_rows(rows)


FAKE_PRELOAD = textwrap.dedent("""\
    /* A broken "commlib": packs through the host MPI, then corrupts the last byte. */
    #include <mpi.h>
    static long long calls;
    long long commlib_stat(const char *name)
    {
        return name[5] == 'f' && name[6] == 'a' && name[7] == 's' ? calls : 0;
    }
    int MPI_Pack(const void *in, int count, MPI_Datatype t, void *out, int size, int *pos,
                 MPI_Comm comm)
    {
        int rc = PMPI_Pack(in, count, t, out, size, pos, comm);
        if (rc == MPI_SUCCESS && *pos > 0)
            ((unsigned char *)out)[*pos - 1] ^= 0xff;
        calls++;
        return rc;
    }
""")


def test_bench_pack_detects_mismatch(tmp_path, monkeypatch, capsys):
    """A preload that packs wrong bytes is reported MISMATCH, with exit status 1."""
    src = tmp_path / "fake.c"
    src.write_text(FAKE_PRELOAD)
    lib = tmp_path / "libfake.so"
    cc = subprocess.run([paths.mpicc(), "-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-o",
                         str(lib), str(src)], capture_output=True, text=True)
    assert cc.returncode == 0, cc.stdout + cc.stderr
    monkeypatch.setattr(paths, "preload_library", lambda: str(lib))
    out = tmp_path / "pack.json"
    rc = pack.main(["--quick", "--target-ms", "2", "--filter", "vec_1KiB_b8",
                    "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 1, text
    assert "MISMATCH" in text
    result = json.loads(out.read_text())
    rows = result["shapes"]
    assert [r["name"] for r in rows] == ["vec_1KiB_b8_s16", "vec_1KiB_b8_s512"]
    assert not any(r["identical"] for r in rows)
    assert result["commlib_active"]
    # The fake counts every MPI_Pack as "pack.fast": the timed calls show up as fast.
    for r in rows:
        assert r["stat_fast"] == r["commlib_calls"] and r["stat_fallback"] == 0, r
        assert r["commlib_path"] == "fast"


def test_launch_command_passes_preload_to_ranks_only():
    cmd, env = pack.launch_command("mpiexec", "hydra", "/b", ["-q"], "/lib.so")
    assert cmd[:6] == ["mpiexec", "-n", "1", "-genv", "LD_PRELOAD", "/lib.so"]
    assert cmd[-2:] == ["/b", "-q"]
    cmd, env = pack.launch_command("mpirun", "openmpi", "/b", [], "/lib.so")
    assert "-x" in cmd and "LD_PRELOAD=/lib.so" in cmd
    cmd, env = pack.launch_command("srun", "unknown", "/b", [], "/lib.so")
    assert env["LD_PRELOAD"].split(":")[0] == "/lib.so"
    cmd, env = pack.launch_command("mpiexec", "hydra", "/b", [], None)
    assert "LD_PRELOAD" not in cmd


def test_summary_geomeans():
    rows = [
        {"name": "a", "total_bytes": 1024, "block_bytes": 1, "speedup": 4.0, "identical": True,
         "commlib_path": "fast"},
        {"name": "b", "total_bytes": 1 << 20, "block_bytes": 512, "speedup": 0.25,
         "identical": True, "commlib_path": "fallback"},
        {"name": "c", "total_bytes": 2048, "block_bytes": 64, "speedup": 1.0, "identical": False,
         "commlib_path": "fast"},
    ]
    s = pack.summarize(rows)
    assert s["geomean_speedup"] == pytest.approx(1.0)
    assert s["geomean_speedup_small"] == pytest.approx(2.0)
    assert s["geomean_speedup_small_blocks"] == pytest.approx(4.0)
    assert s["slower"] == ["b"] and s["fallback"] == ["b"] and s["n_mismatch"] == 1


def test_device_output_parsing():
    """The device benchmark's raw output: meta, notes, numbers converted, a cut line dropped."""
    fields = ["name", *pack.DEVICE_INT_FIELDS] + [f"{op}_{s}" for op in pack.DEVICE_OPS for s in ("ns", "min_ns")]
    fields = list(dict.fromkeys(fields))
    values = ["vec_1KiB_b1_c1" if f == "name" else ("7" if f in pack.DEVICE_INT_FIELDS else "1.5") for f in fields]
    text = "\n".join(["# device=NVIDIA H200", "# a free-form note", ",".join(fields), ",".join(values),
                      ",".join(values[:2])])
    meta, notes, rows = pack.parse_device_output(text)
    assert meta == {"device": "NVIDIA H200"} and notes == ["a free-form note"]
    assert len(rows) == 1
    assert all(rows[0][k] == 7 for k in pack.DEVICE_INT_FIELDS)
    assert all(rows[0][f"{op}_ns"] == 1.5 for op in pack.DEVICE_OPS)
