"""The `commlib` command line."""
import os
import subprocess

from commlib import cli, native, paths
from harness import commlib_cli


def run_cli(*args, env=None):
    return subprocess.run([*commlib_cli(), *args], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, **(env or {})))


def test_lib_prints_an_existing_shared_library():
    proc = run_cli("lib")
    path = proc.stdout.strip()
    assert proc.returncode == 0 and os.path.isabs(path) and path.endswith("libcommlib.so")
    with open(path, "rb") as f:
        assert f.read(4) == b"\x7fELF"


def test_info_reports_build_and_knobs():
    proc = run_cli("info", env={"COMMLIB_STATS": "1"})
    assert proc.returncode == 0, proc.stderr
    info = native.build_info()
    assert info["mpi_family"] in proc.stdout
    assert "CUDA" in proc.stdout
    stats_line = next(line for line in proc.stdout.splitlines() if "COMMLIB_STATS" in line)
    assert "= 1" in stats_line and "<- set" in stats_line
    for knob in ("COMMLIB_DISABLE", "COMMLIB_NO_PACK", "COMMLIB_LOG"):
        assert knob in proc.stdout


def test_info_shows_what_a_cpu_choice_came_to():
    """`auto` host-pack choices differ by CPU: `commlib info` says on or off, and a value given
    in the environment wins over `auto` (each run is a fresh process: knobs are read once)."""
    for value, shown in (("0", "0 (off)"), ("1", "1 (on)")):
        proc = run_cli("info", env={"COMMLIB_NEXT_GROUP": value, "COMMLIB_TAIL_FIRST": value})
        assert proc.returncode == 0, proc.stderr
        for name in ("COMMLIB_NEXT_GROUP", "COMMLIB_TAIL_FIRST"):
            line = next(line for line in proc.stdout.splitlines() if name in line)
            assert f"= {shown}" in line and "<- set" in line, line
    proc = run_cli("info")
    line = next(line for line in proc.stdout.splitlines() if "COMMLIB_ROW_RACE" in line)
    assert "= auto (on)" in line or "= auto (off)" in line, line
    line = next(line for line in proc.stdout.splitlines() if "COMMLIB_DISABLE" in line)
    assert "(on)" not in line and "(off)" not in line, line  # not a CPU choice


def test_every_host_pack_choice_reports_what_it_came_to():
    """The host-pack knobs whose `auto` is a CPU choice: each must be set through cpu_choice() in
    native/util/config.c (which records what it came to for `commlib info`), not by hand."""
    host_pack = [k for k in native.knobs() if k["default"] == "auto" and k["meaning"].startswith("host MPI_")]
    assert len(host_pack) >= 15
    missing = [k["name"] for k in host_pack if "in_effect" not in k]
    assert not missing, f"CPU choices without their in_effect (set without cpu_choice() in config.c): {missing}"
    assert all(k["in_effect"] in (0, 1) for k in host_pack)


def test_knob_table_in_readme_matches_the_library():
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    for knob in native.knobs():
        row = next((line for line in readme.splitlines() if line.startswith(f"| `{knob['name']}`")), None)
        assert row is not None, f"{knob['name']} missing from the README knobs table"
        assert f"`{knob['default']}`" in row, f"README default of {knob['name']} differs"


def test_run_command_preloads_only_the_ranks():
    argv, env = cli.run_command(["-n", "3", "./app", "-x", "1"], env={"LD_PRELOAD": "/other.so"})
    assert argv[0] == paths.mpiexec() and argv[1:3] == ["-n", "3"]
    assert argv[-3:] == ["./app", "-x", "1"]
    if cli.launcher_kind(paths.mpiexec()) == "hydra":
        i = argv.index("-genv")
        assert argv[i + 1] == "LD_PRELOAD" and argv[i + 2] == paths.preload_library() + ":/other.so"
        assert env["LD_PRELOAD"] == "/other.so"  # the launcher itself is left alone


def test_run_resolves_the_program_on_the_callers_path(tmp_path):
    # Open MPI's mpiexec, started by its absolute path, puts its own bin directory first on the
    # ranks' PATH: a bare `python3` ran /usr/bin/python3 there, not the caller's (a virtual
    # environment's, with numpy), and examples/halo3d.py failed to import numpy.
    fake = tmp_path / "python3"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    argv, _ = cli.run_command(["-n", "2", "python3", "x.py"], env={"PATH": f"{tmp_path}:/usr/bin:/bin"})
    assert argv[-2:] == [str(fake), "x.py"]
    argv, _ = cli.run_command(["-n", "2", "./app"], env={"PATH": str(tmp_path)})
    assert argv[-1] == "./app"  # a path stays as given


def test_run_passes_mpiexec_options_before_double_dash():
    argv, _ = cli.run_command(["-n", "2", "-l", "--", "prog"], env={})
    assert argv[1:4] == ["-n", "2", "-l"] and argv[-1] == "prog"


def test_run_without_program_is_an_error():
    proc = run_cli("run", "-n", "2")
    assert proc.returncode != 0 and "no program" in proc.stderr


def test_unknown_command_and_benchmark():
    assert run_cli("frobnicate").returncode == 2
    proc = run_cli("bench", "nonesuch")
    assert proc.returncode == 2 and "unknown benchmark" in proc.stderr


def test_example_path():
    proc = run_cli("example", "halo3d")
    assert proc.returncode == 0 and os.access(proc.stdout.strip(), os.X_OK)


def test_bench_usage_lists_every_benchmark():
    """`commlib` and `commlib bench` name every benchmark commlib/bench holds."""
    bench_dir = os.path.join(os.path.dirname(cli.__file__), "bench")
    modules = sorted(os.path.splitext(f)[0] for f in os.listdir(bench_dir)
                     if f.endswith(".py") and not f.startswith("_"))  # _overlap_python: a benchmark's own ranks
    assert sorted(cli.BENCHMARKS) == modules
    top = run_cli()
    bench_line = next(line for line in top.stdout.splitlines() if line.strip().startswith("bench NAME"))
    bench = run_cli("bench")
    assert top.returncode == 2 and bench.returncode == 2, top.stderr + bench.stderr
    for name in modules:
        assert name in bench_line.split(":", 1)[1], (name, bench_line)
        assert name in bench.stdout.split("NAME:", 1)[1], (name, bench.stdout)
