"""`commlib measure`: times the send/receive methods for device buffers on this machine
and writes the model file libcommlib.so reads (native/transfer/model.c).

The timing program (native/bench/measure_methods.c, built at install) runs on 2 ranks
under `commlib run` once per method, COMMLIB_METHOD forcing it: rank 0 holds device
memory, rank 1 host memory, and each line is the median round trip of one message of a
size plus a 1-byte reply, per direction and layout.  The `aware` method is measured only
when the MPI is CUDA-aware (as the library finds it, COMMLIB_CUDA_AWARE included).  The
model is these curves; the library interpolates between the sizes and picks the fastest.

Without a GPU nothing is measured or written (exit status 0).  The stand-in driver of
the tests (tests/c/fake_cuda.c) counts as a GPU: it is measured, for the tests' sake.
"""
import argparse
import datetime
import json
import os
import socket
import subprocess
import sys

from commlib import __version__, cli, paths

METHODS = ("oneshot", "device", "aware")
DEFAULT_SIZES = [1 << k for k in range(10, 27, 2)]  # 1 KiB .. 64 MiB
QUICK_SIZES = [1 << 10, 1 << 14, 1 << 18]


def default_model_path(env=None):
    """Where the library looks when COMMLIB_MODEL is unset (same rule as model.c)."""
    env = os.environ if env is None else env
    cache = env.get("XDG_CACHE_HOME", "")
    if not cache.startswith("/"):
        cache = os.path.join(env.get("HOME") or os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "commlib", f"model-{socket.gethostname()}.txt")


def model_path(env=None):
    """The file the library reads: COMMLIB_MODEL when it names one, else the default."""
    env = os.environ if env is None else env
    knob = env.get("COMMLIB_MODEL", "")
    return knob if knob not in ("", "auto", "0") else default_model_path(env)


def _run(ranks, args, env, timeout):
    argv, run_env = cli.run_command(["-n", str(ranks), "--", paths.example_binary("measure_methods"), *args], env=env)
    return subprocess.run(argv, capture_output=True, text=True, env=run_env, timeout=timeout)


def probe(env=None, timeout=120):
    """The library's view on one rank: CUDA-awareness, GPU and MPI names, model in effect.
    Raises RuntimeError when the probe does not answer."""
    env = dict(os.environ if env is None else env)
    proc = _run(1, ["--probe"], env, timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("# model="):
            return json.loads(line[len("# model="):])
    raise RuntimeError(f"the probe did not answer (status {proc.returncode}): "
                       f"{(proc.stdout + proc.stderr).strip()[-1000:]}")


def measure_method(method, sizes, budget_ms, env, timeout):
    """{(direction, layout, bytes): us} for one method, or (None, why not)."""
    env = dict(env, COMMLIB_METHOD=method)
    proc = _run(2, ["--method", method, "--sizes", ",".join(map(str, sizes)), "--budget-ms", str(budget_ms)],
                env, timeout)
    points, counts, skipped = {}, {}, None
    for line in proc.stdout.splitlines():
        if line.startswith("# skipped="):
            skipped = line.split("=", 1)[1]
        elif line.startswith("# counts="):
            counts = {k: int(v) for k, v in (item.split(":") for item in line.split("=", 1)[1].split(","))}
        elif line and not line.startswith("#"):
            direction, m, layout, size, us = line.split()
            points[(direction, layout, int(size))] = float(us)
    if skipped:
        return None, skipped
    if proc.returncode != 0 or not points:
        return None, f"status {proc.returncode}: {(proc.stdout + proc.stderr).strip()[-800:]}"
    # every message must have taken the forced method (aware falls back on its own)
    if not counts.get(f"send_{method}") or not counts.get(f"recv_{method}") or \
            any(n for k, n in counts.items() if not k.endswith(method)):
        return None, f"the library did not use {method} throughout (counters {counts})"
    return points, None


def model_text(identity, curves):
    """The file: header, what it was measured on, one line per point."""
    lines = ["# commlib send/receive method model, written by `commlib measure`.",
             "# DIRECTION METHOD LAYOUT BYTES MICROSECONDS: median round trip of one message of BYTES",
             "# between device memory (through METHOD) and a host rank, plus a 1-byte reply.",
             "commlib-model 1",
             f"gpu {identity['gpu']}",
             f"mpi {identity['mpi']}",
             f"commlib {identity.get('commlib') or __version__}",
             f"measured {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')}"]
    for method, points in curves.items():
        for (direction, layout, size), us in sorted(points.items()):
            lines.append(f"{direction} {method} {layout} {size} {us:.3f}")
    return "\n".join(lines) + "\n"


def format_table(curves, sizes):
    out = []
    for direction in ("send", "recv"):
        for layout in ("contig", "derived"):
            out.append(f"{direction} {layout}: microseconds per message (+ 1-byte reply)")
            out.append("  " + f"{'bytes':>10}" + "".join(f"{m:>11}" for m in curves) + "   fastest")
            for size in sizes:
                row = {m: p.get((direction, layout, size)) for m, p in curves.items()}
                known = {m: v for m, v in row.items() if v is not None}
                best = min(known, key=known.get) if known else "-"
                cells = "".join(f"{row[m]:>11.1f}" if row[m] is not None else f"{'-':>11}" for m in curves)
                out.append(f"  {size:>10}{cells}   {best}")
    return "\n".join(out)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="commlib measure", description=__doc__.split("\n\n")[0])
    p.add_argument("--output", help=f"model file to write (default: COMMLIB_MODEL or {default_model_path()})")
    p.add_argument("--sizes", help="message sizes in bytes, comma-separated, multiples of 256 (default 1 KiB..64 MiB)")
    p.add_argument("--quick", action="store_true", help="3 sizes up to 256 KiB, short budget (a smoke test)")
    p.add_argument("--budget-ms", type=float, default=None, help="time budget per point (default 20 ms)")
    p.add_argument("--methods", default=",".join(METHODS), help="methods to measure (default all that apply)")
    p.add_argument("--dry-run", action="store_true", help="measure and print, write nothing")
    opts = p.parse_args(argv)
    opts.size_list = [int(s) for s in opts.sizes.split(",")] if opts.sizes else \
        (QUICK_SIZES if opts.quick else DEFAULT_SIZES)
    if any(s < 256 or s % 256 or s > 1 << 30 for s in opts.size_list):
        p.error("--sizes: each a multiple of 256 bytes, at most 1 GiB")
    opts.budget_ms = opts.budget_ms or (2.0 if opts.quick else 20.0)
    opts.method_list = [m for m in opts.methods.split(",") if m]
    if not opts.method_list or any(m not in METHODS for m in opts.method_list):
        p.error(f"--methods: a comma-separated list of {', '.join(METHODS)}")
    return opts


def main(argv=None):
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    env = dict(os.environ)
    env.pop("COMMLIB_DISABLE", None)
    env["COMMLIB_MODEL"] = "0"  # the forced method decides; no file is read while measuring
    try:
        identity = probe(env)
    except (RuntimeError, FileNotFoundError, subprocess.TimeoutExpired, ValueError) as e:
        print(f"commlib measure: {e}", file=sys.stderr)
        return 1
    if not identity.get("gpu"):
        print("commlib measure: no GPU (no CUDA driver with a device here): nothing measured, nothing written")
        return 0
    print(f"commlib measure: GPU {identity['gpu']}; MPI {identity['mpi']}; "
          f"CUDA-aware: {'yes' if identity['cuda_aware'] else 'no'} ({identity['cuda_aware_how']})")
    curves = {}
    for method in opts.method_list:
        if method == "aware" and not identity["cuda_aware"]:
            print("  aware: not measured (the MPI is not CUDA-aware)")
            continue
        try:
            points, why = measure_method(method, opts.size_list, opts.budget_ms, env, timeout=900)
        except subprocess.TimeoutExpired:
            points, why = None, "timed out"
        if points is None:
            print(f"  {method}: not measured ({why})")
            continue
        curves[method] = points
    if not curves:
        print("commlib measure: no method could be measured; nothing written", file=sys.stderr)
        return 1
    print(format_table(curves, opts.size_list))
    if opts.dry_run:
        return 0
    path = opts.output or model_path()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(model_text(identity, curves))
    os.replace(tmp, path)
    print(f"commlib measure: wrote {path}")
    if os.environ.get("COMMLIB_MODEL") == "0":
        print("note: COMMLIB_MODEL=0 is set here: the library ignores every model file while it is")
    elif opts.output and opts.output != model_path():
        print(f"note: the library reads {model_path()}; point COMMLIB_MODEL={path} at this file to use it")
    return 0
