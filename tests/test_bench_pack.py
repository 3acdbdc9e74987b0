"""`commlib bench pack`: every shape runs, both implementations pack (and unpack) the same
bytes.

No timing is asserted: the figures are for people; these tests check that the benchmark
measures what it says (the shapes, positive times, the byte comparison, the counters).
"""
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from commlib import paths
from harness import clean_env
from commlib.bench import pack

TARGETS = {"1KiB": 1 << 10, "1MiB": 1 << 20, "4MiB": 4 << 20}
MAX_EXTENT = 1200 << 20     # the benchmark's default -m
# The halo example's grids (N, Q, R): N^3 interior, Q quantities, halo radius R.
HALO_GRIDS = [(256, q, r) for q in range(1, 5) for r in range(1, 4)] + [(512, 1, 1), (512, 1, 3)]


HALO_NAME = re.compile(r"^halo(?P<n>\d+)_q(?P<q>\d)_r(?P<r>\d)_(?P<axis>[xyz])_(?P<op>pack|unpack)_"
                       r"(?P<cache>warm|cold)$")


def halo_grid_bytes(n, q, r):
    return q * (n + 2 * r) ** 3 * 8


def expected_shapes():
    """The shape names of the default run, from the rules of the benchmark (not its code)."""
    names = [f"face_{axis}_t{t}" for t in (1, 2, 3) for axis in "xyz"]
    for label in TARGETS:
        for b in (1, 8, 24, 64, 512):
            names.append(f"vec_{label}_b{b}_s{max(2 * b, 16)}")
    for label, target in TARGETS.items():
        for b in (1, 2, 4, 8, 32, 64, 128, 256, 512):
            count = target // b
            if (count - 1) * 512 + b <= MAX_EXTENT:
                names.append(f"vec_{label}_b{b}_s512")
    names += ["dense_8B", "dense_64B", "dense_256B"]  # one contiguous run: the per-call cost
    names += ["hvec_1MiB_b8_s512", "subarr_1MiB_b8_s512"]
    for n, q, r in HALO_GRIDS:
        if halo_grid_bytes(n, q, r) <= MAX_EXTENT:
            names += [f"halo{n}_q{q}_r{r}_{axis}_{op}_{cache}" for axis in "xyz"
                      for op in ("pack", "unpack") for cache in ("warm", "cold")]
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
    # every halo face went through commlib's own MPI_Pack / MPI_Unpack, each timed call counted
    for r in rows:
        m = HALO_NAME.match(r["name"])
        assert (r["kind"] == "halo") == bool(m), r
        if m:
            assert (r["op"], r["cache"]) == (m["op"], m["cache"]), r
            assert r["grid_bytes"] == halo_grid_bytes(int(m["n"]), int(m["q"]), int(m["r"])), r
            assert r["stat_fast"] == r["commlib_calls"] and r["stat_fallback"] == 0, r
        else:
            assert (r["op"], r["cache"]) == ("pack", "warm"), r
    summary = result["summary"]
    slowest = min(rows, key=lambda r: r["speedup"])
    assert summary["slowest"] == {"name": slowest["name"], "speedup": slowest["speedup"]}
    assert summary["groups"]["halo"]["n"] == sum(1 for r in rows if r["kind"] == "halo")
    assert "slowest " + slowest["name"] in proc.stdout
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


def test_bench_pack_reports_a_benchmark_that_did_not_start(tmp_path):
    """A launcher that fails at once (no MPI output at all): exit 2 and its stderr, not a
    traceback from the summary line."""
    launcher = tmp_path / "mpiexec"
    launcher.write_text("#!/bin/sh\necho 'cannot start the job' >&2\nexit 7\n")
    launcher.chmod(0o755)
    proc = subprocess.run([sys.executable, "-m", "commlib.bench.pack", "--no-preload", "--quick",
                           "--filter", "dense"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env=clean_env(COMMLIB_MPIEXEC=str(launcher)))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "exited with status 7" in proc.stderr and "cannot start the job" in proc.stderr, proc.stderr


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


# Broken "commlib"s for MPI_Unpack: one that changes a byte of what it unpacks, one that also
# writes a byte outside the strip (the grid's first byte: a corner, in no face).
FAKE_UNPACK = textwrap.dedent("""\
    #include <mpi.h>
    #include <stdlib.h>
    #include <string.h>
    static long long calls;
    long long commlib_stat(const char *name)
    {
        return strcmp(name, "unpack.fast") == 0 || strcmp(name, "unpack.calls") == 0 ? calls : 0;
    }
    int MPI_Unpack(const void *in, int size, int *pos, void *out, int count, MPI_Datatype t,
                   MPI_Comm comm)
    {
        int rc = PMPI_Unpack(in, size, pos, out, count, t, comm);
        calls++;
        if (getenv("FAKE_OUTSIDE"))
            ((unsigned char *)out)[0] += 1;  /* calls do not undo each other */
        else
            ((unsigned char *)in)[*pos - 1] ^= 0xff;  /* the caller's bytes no longer match */
        return rc;
    }
""")


@pytest.mark.parametrize("outside", [False, True])
def test_bench_pack_detects_unpack_mismatch(tmp_path, monkeypatch, capsys, outside):
    """An MPI_Unpack that unpacks wrong bytes, or writes outside the strip, is a MISMATCH."""
    src = tmp_path / "fake_unpack.c"
    src.write_text(FAKE_UNPACK)
    lib = tmp_path / "libfake_unpack.so"
    cc = subprocess.run([paths.mpicc(), "-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-o",
                         str(lib), str(src)], capture_output=True, text=True)
    assert cc.returncode == 0, cc.stdout + cc.stderr
    monkeypatch.setattr(paths, "preload_library", lambda: str(lib))
    if outside:
        monkeypatch.setenv("FAKE_OUTSIDE", "1")
    out = tmp_path / "pack.json"
    rc = pack.main(["--quick", "--target-ms", "2", "--filter", "halo256_q1_r1_y_unpack_warm",
                    "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 1, text
    assert ("outside the strip" if outside else "not in the strip") in text, text
    rows = json.loads(out.read_text())["shapes"]
    assert [(r["name"], r["identical"], r["op"]) for r in rows] == [
        ("halo256_q1_r1_y_unpack_warm", False, "unpack")]


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
    assert s["slowest"] == {"name": "b", "speedup": 0.25}
    assert set(s["groups"]) == {"faces and vectors"}


def test_summary_halo_groups():
    """Halo faces: their own geomeans (by op and cache, by axis) and slowest shape; the
    small-message figures stay over the faces and vectors."""
    def halo(name, speedup):
        return {"name": name, "kind": "halo", "op": name.split("_")[4], "cache": name.split("_")[5],
                "total_bytes": 1 << 20, "block_bytes": 8, "speedup": speedup, "identical": True,
                "commlib_path": "fast"}
    rows = [
        {"name": "vec", "kind": "vector", "op": "pack", "cache": "warm", "total_bytes": 1024,
         "block_bytes": 1, "speedup": 2.0, "identical": True, "commlib_path": "fast"},
        halo("halo256_q1_r1_x_pack_warm", 1.0), halo("halo256_q1_r1_x_unpack_cold", 0.5),
        halo("halo256_q1_r1_y_pack_warm", 4.0), halo("halo256_q1_r1_z_unpack_cold", 2.0),
    ]
    s = pack.summarize(rows)
    g = s["groups"]
    assert g["faces and vectors"]["n"] == 1 and g["faces and vectors"]["geomean"] == pytest.approx(2.0)
    assert g["halo"]["n"] == 4 and g["halo"]["geomean"] == pytest.approx(4 ** 0.25)
    assert g["halo"]["slowest"] == {"name": "halo256_q1_r1_x_unpack_cold", "speedup": 0.5}
    assert g["halo pack warm"]["geomean"] == pytest.approx(2.0)
    assert g["halo unpack cold"]["geomean"] == pytest.approx(1.0)
    assert g["halo x"]["geomean"] == pytest.approx(0.5 ** 0.5) and g["halo y"]["n"] == 1
    assert "halo pack cold" not in g
    assert s["slowest"]["name"] == "halo256_q1_r1_x_unpack_cold"
    assert s["geomean_speedup_small_blocks"] == pytest.approx(2.0)  # the vector alone
    text = pack.format_summary(s, rows)
    assert "slowest halo256_q1_r1_x_unpack_cold 0.50x" in text
    assert "halo faces: 1.41x over 4" in text and "pack warm 2.00x" in text


def test_repeated_runs_take_each_shapes_median():
    """--repeat: per shape the median over the runs of each time and ratio, identical only if
    every run was, a shape some run lacks left out, the runs' ratios kept."""
    def row(name, commlib_ns, host_ns, identical=True):
        return {"name": name, "kind": "vector", "op": "pack", "cache": "warm", "total_bytes": 1024,
                "block_bytes": 8, "commlib_ns": commlib_ns, "host_ns": host_ns,
                "commlib_min_ns": commlib_ns, "host_min_ns": host_ns, "commlib_gbps": 1.0, "host_gbps": 1.0,
                "speedup": host_ns / commlib_ns, "speedup_of_min": host_ns / commlib_ns,
                "identical": identical, "commlib_path": "fast"}
    def result(rows, wall=1.0, rc=0):
        return {"shapes": rows, "wall_s": wall, "returncode": rc, "notes": [f"n{len(rows)}"]}
    runs = [result([row("a", 10, 20), row("b", 10, 5), row("c", 1, 1)]),
            result([row("a", 10, 8), row("b", 10, 6, identical=False), row("c", 1, 1)], rc=1),
            result([row("a", 10, 30), row("b", 10, 7)])]
    r = pack.combine_runs(runs)
    assert [x["name"] for x in r["shapes"]] == ["a", "b"]
    a, b = r["shapes"]
    assert a["speedup"] == pytest.approx(2.0) and a["host_ns"] == 20 and a["speedup_runs"] == [2.0, 0.8, 3.0]
    assert b["speedup"] == pytest.approx(0.6) and not b["identical"] and a["identical"]
    assert r["repeat"] == 3 and r["wall_s"] == pytest.approx(3.0) and r["returncode"] == 1
    assert r["summary"]["slowest"] == {"name": "b", "speedup": pytest.approx(0.6), "runs": [0.5, 0.6, 0.7]}
    assert r["summary"]["n_mismatch"] == 1
    assert "slowest b 0.60x (runs 0.50-0.70x)" in pack.format_summary(r["summary"], r["shapes"])


@pytest.mark.parametrize("args", [["--repeat", "0"], ["--device", "--repeat", "2"]])
def test_repeat_refuses_what_it_cannot_do(args, capsys):
    assert pack.main(args) == 2
    assert "--repeat" in capsys.readouterr().err


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


def test_compare_settings_parse_and_refuse(capsys):
    """--compare VAR=VALUE[,VAR=VALUE]: commas or spaces between them; anything else, the same
    setting twice, or a mode it does not serve is refused before anything runs."""
    assert pack.parse_setting("COMMLIB_A=1,COMMLIB_B=auto C=") == {"COMMLIB_A": "1", "COMMLIB_B": "auto", "C": ""}
    assert pack.setting_label({"A": "1", "B": "0"}) == "A=1,B=0" and pack.setting_label({}) == "as is"
    for args in (["--compare", "COMMLIB_A"], ["--compare", "=1"], ["--compare", "A=1", "--compare", "A=1"],
                 ["--compare", "A=1", "--device"], ["--compare", "A=1", "--no-preload"],
                 ["--compare", "A=1", "--repeat", "0"], ["--compare", "BENCH_PACK_PAGES=huge", "--grid-pages", "small"]):
        assert pack.main(args) == 2, args
        assert "commlib bench pack:" in capsys.readouterr().err


def test_compare_lines_side_by_side():
    """Each shape's ratio under each setting (median of the runs, their spread), a line per
    setting: geomean, shapes under 1.00x and 0.95x, slowest, commlib's own time against the
    first setting's; long setting names head their columns by number."""
    def row(name, commlib_ns, host_ns):
        return {"name": name, "kind": "vector", "op": "pack", "cache": "warm", "total_bytes": 1024,
                "block_bytes": 8, "commlib_ns": commlib_ns, "host_ns": host_ns,
                "commlib_min_ns": commlib_ns, "host_min_ns": host_ns, "commlib_gbps": 1.0, "host_gbps": 1.0,
                "speedup": host_ns / commlib_ns, "speedup_of_min": host_ns / commlib_ns,
                "identical": True, "commlib_path": "fast"}
    def result(rows):
        return {"shapes": rows, "wall_s": 1.0, "returncode": 0, "notes": []}
    off = pack.combine_runs([result([row("a", 10, 20), row("b", 10, 9)]), result([row("a", 10, 16), row("b", 10, 9)])])
    on = pack.combine_runs([result([row("a", 5, 20), row("b", 20, 19)]), result([row("a", 5, 20), row("b", 20, 18)])])
    text = pack.format_compare(["K=0", "K=1"], [off, on]).splitlines()
    assert text[1].split() == ["a", "1.80x", "(1.60-2.00)", "4.00x", "(4.00-4.00)"]
    assert text[2].split() == ["b", "0.90x", "(0.90-0.90)", "0.93x", "(0.90-0.95)"]
    assert text[3] == "K=0: geomean 1.273x over 2 shapes, 1 under 1.00x, 1 under 0.95x, slowest b 0.90x"
    assert text[4] == ("K=1: geomean 1.924x over 2 shapes, 1 under 1.00x, 1 under 0.95x, slowest b 0.93x; "
                       "commlib's own time 1.000 of the first setting's")
    # settings with long names: numbered columns, the settings listed above them and in their summaries
    long = ["COMMLIB_UNPACK_PREFETCH=1,COMMLIB_UNPACK_PROBE=0", "COMMLIB_UNPACK_PREFETCH=0"]
    text = pack.format_compare(long, [off, on]).splitlines()
    assert text[:2] == ["[1] COMMLIB_UNPACK_PREFETCH=1,COMMLIB_UNPACK_PROBE=0", "[2] COMMLIB_UNPACK_PREFETCH=0"]
    assert text[2].split() == ["shape", "[1]", "[2]"] and len(text[2]) == 34 + 2 * 21
    assert text[3].split() == ["a", "1.80x", "(1.60-2.00)", "4.00x", "(4.00-4.00)"]
    assert text[5].startswith("[1] COMMLIB_UNPACK_PREFETCH=1,COMMLIB_UNPACK_PROBE=0: geomean 1.273x over 2 shapes")
    assert text[6].startswith("[2] COMMLIB_UNPACK_PREFETCH=0: geomean 1.924x")


@pytest.mark.skipif(not have_core(), reason="libcommlib.so not built")
def test_compare_runs_each_setting_in_its_own_process(tmp_path):
    """--compare: the settings alternate, each run its own process with its variables set -
    COMMLIB_NO_PACK=1 hands every call to the host MPI, so its rows are the host's."""
    out = tmp_path / "compare.json"
    proc = subprocess.run([sys.executable, "-m", "commlib", "bench", "pack", "--quick", "--filter", "vec_1KiB_b8",
                           "--compare", "COMMLIB_NO_PACK=0", "--compare", "COMMLIB_NO_PACK=1", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=clean_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert result["order"] == ["COMMLIB_NO_PACK=0", "COMMLIB_NO_PACK=1"] * 2 and result["repeat"] == 2
    fast, host = (c["result"]["shapes"] for c in result["compare"])
    names = [n for n in expected_shapes() if n.startswith("vec_1KiB_b8_")]
    assert [r["name"] for r in fast] == names and [r["name"] for r in host] == names
    assert all(r["commlib_path"] == "fast" and len(r["speedup_runs"]) == 2 and r["identical"] for r in fast)
    assert all(r["commlib_path"] == "fallback" and r["identical"] for r in host)
    check_rows(fast + host)
    assert "COMMLIB_NO_PACK=1: geomean" in proc.stdout and "commlib's own time" in proc.stdout


def test_page_use_reads_the_last_report_of_each_buffer():
    notes = ["pages input filled: 0 of 4096 bytes in huge pages",
             "pages input done: 2048 of 4096 bytes in huge pages",
             "pages halo256_q1_r1 filled: -1 of 8192 bytes in huge pages", "skipped x"]
    use = pack.page_use(notes)
    assert use == {"input": (2048, 4096), "halo256_q1_r1": (-1, 8192)}
    line = pack.format_pages({"thp": "always", "pages": "default", "pages_used": use})
    assert line.endswith("typed buffers in huge pages: input 50 %, halo256_q1_r1 ?"), line
    same = pack.format_pages({"thp": "madvise", "pages": "small",
                              "pages_used": {"input": (0, 4096), "halo512_q1_r3": (0, 1 << 30)}})
    assert "'madvise' in the kernel, small asked" in same and same.endswith("all 0 %"), same
    assert pack.format_pages({"pages_used": {}}) is None


@pytest.mark.skipif(not have_core(), reason="libcommlib.so not built")
def test_grid_pages_are_asked_for_and_reported(tmp_path):
    """BENCH_PACK_PAGES (--grid-pages) pages the typed buffers: small keeps every byte of the
    grid out of huge pages (MADV_NOHUGEPAGE); what the kernel gave is reported per buffer.
    (Whether huge gets 2 MiB pages is the kernel's to decide - its setting, free memory - so
    only that it was asked and reported is checked.)"""
    out = tmp_path / "pages.json"
    proc = subprocess.run([sys.executable, "-m", "commlib", "bench", "pack", "--quick", "--repeat", "1",
                           "--filter", "halo256_q1_r1_x_pack_warm", "--compare", "BENCH_PACK_PAGES=small",
                           "--compare", "BENCH_PACK_PAGES=huge", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=clean_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    small, huge = (c["result"] for c in json.loads(out.read_text())["compare"])
    grid = halo_grid_bytes(256, 1, 1)
    assert small["pages"] == "small" and huge["pages"] == "huge"
    assert small["pages_used"] == {"halo256_q1_r1": [0, grid]}, small["pages_used"]  # (JSON: lists)
    assert list(huge["pages_used"]) == ["halo256_q1_r1"] and huge["pages_used"]["halo256_q1_r1"][1] == grid
    assert small["shapes"][0]["identical"] and huge["shapes"][0]["identical"]
    assert "BENCH_PACK_PAGES=small: pages: transparent huge pages" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "commlib", "bench", "pack", "--grid-pages", "giant"],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path, env=clean_env())
    assert bad.returncode == 2 and "--grid-pages" in bad.stderr
