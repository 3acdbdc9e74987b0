"""`commlib bench pack`: MPI_Pack through commlib against the host MPI's own, in one run.

Builds native/bench/bench_pack.c with the MPI compiler wrapper, runs it on one rank with
libcommlib.so preloaded, and prints one row per shape: the median per-call time of
MPI_Pack (commlib) and of PMPI_Pack (the host MPI) measured interleaved in the same
process (which side goes first alternating by round, and the two output buffers trading
places every two rounds, so that where a buffer lies counts for both), the bandwidths, the
speedup host/commlib, whether both packed the same bytes, and which commlib path packed it
(its fast path, or forwarded to the host MPI).

Besides faces of a 256^3 array and strided byte vectors (repeated calls: warm wherever they
fit in the cache), the faces of the halo example's grids (examples/halo3d.c: Q quantities of
(N+2R)^3 doubles, N = 256 and 512), every axis, MPI_Pack and MPI_Unpack, each warm (repeated
calls) and cold (the last-level cache evicted before every timed call).  The summary gives
the slowest shape beside the geometric mean, and geomeans per group.

`--device` runs native/bench/bench_device_pack.c instead: MPI_Pack of GPU memory into GPU
memory through commlib's device engine, against a device-to-device cudaMemcpy of the same
byte count and a cudaMemcpy2D of the same blocks, measured call by call in the same run,
over TEMPI's grid (1 KiB / 1 MiB / 4 MiB of 1..512-byte blocks at stride 512, count 1 and
2, vector / hvector / subarray), with the ratio to TEMPI's anchor figures where the shape
matches.
"""
import argparse
import csv
import hashlib
import io
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from commlib import paths

SOURCE_NAME = "bench_pack.c"
CFLAGS = ["-O2", "-Wall", "-Wextra", "-Werror", "-std=gnu11"]
LIBS = ["-ldl"]

SMALL_BYTES = 4096      # "small messages" for the summary line
SMALL_BLOCK = 8         # "small blocks" for the summary line
SLOWER_THAN = 0.95      # speedups below this are listed as commlib being slower
HALO_KIND = "halo"      # the halo example's faces; the other kinds are "faces and vectors"

INT_FIELDS = ("total_bytes", "block_bytes", "stride_bytes", "extent_bytes", "grid_bytes", "rounds",
              "commlib_batch", "host_batch", "commlib_calls", "stat_calls", "stat_fast",
              "stat_fallback")
FLOAT_FIELDS = ("commlib_ns", "host_ns", "commlib_min_ns", "host_min_ns")


PAGE_POLICIES = ("default", "huge", "small")


class BenchError(RuntimeError):
    pass


def find_source(name=SOURCE_NAME):
    """The benchmark's C source in the repository checkout, else the copy in the package."""
    candidates = [
        os.path.join(os.path.dirname(paths.PACKAGE_DIR), "native", "bench", name),
        os.path.join(paths.PACKAGE_DIR, "_src", name),
    ]
    for path in candidates:
        if os.path.exists(path):
            return path
    raise BenchError(f"{name} not found (looked in {', '.join(candidates)})")


def cache_dir():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "commlib", "bench")


def build(source, out_dir, reuse, flags=()):
    """Compile source into out_dir (extra `flags`, e.g. -shared -fPIC for a library); the
    name carries a hash of what went into it."""
    mpicc = paths.mpicc()
    with open(source, "rb") as f:
        text = f.read()
    key = hashlib.sha256(b"\0".join([text, mpicc.encode(), " ".join([*CFLAGS, *flags, *LIBS]).encode()]))
    stem = os.path.splitext(os.path.basename(source))[0]
    binary = os.path.join(out_dir, f"{stem}-{key.hexdigest()[:16]}")
    if reuse and os.access(binary, os.X_OK):
        return binary
    os.makedirs(out_dir, exist_ok=True)
    tmp = f"{binary}.{os.getpid()}.tmp"
    cmd = [mpicc, *CFLAGS, *flags, "-o", tmp, source, *LIBS]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BenchError(f"compile failed: {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
    os.replace(tmp, binary)
    return binary


def launcher_kind(mpiexec):
    """'hydra' (MPICH), 'openmpi', or 'unknown', from `mpiexec --version`."""
    try:
        proc = subprocess.run([mpiexec, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = proc.stdout + proc.stderr
    if "HYDRA" in text:
        return "hydra"
    if "Open MPI" in text or "OpenRTE" in text or "open-mpi" in text:
        return "openmpi"
    return "unknown"


def launch_command(mpiexec, kind, binary, args, preload):
    """mpiexec command and environment that run binary on one rank, preloading `preload`.

    The launcher itself is not given the preload (it would load libmpi into mpiexec):
    hydra gets it through -genv, Open MPI through -x; an unknown launcher through the
    environment it passes on."""
    cmd = [mpiexec, "-n", "1"]
    env = dict(os.environ)
    if preload:
        value = preload + (":" + env["LD_PRELOAD"] if env.get("LD_PRELOAD") else "")
        if kind == "hydra":
            cmd += ["-genv", "LD_PRELOAD", value]
        elif kind == "openmpi":
            cmd += ["-x", f"LD_PRELOAD={value}"]
        else:
            env["LD_PRELOAD"] = value
    return cmd + [binary, *args], env


def split_output(text):
    """'# key=value' lines -> meta, other '#' lines -> notes, the rest -> CSV records
    (a line cut short by a crash is dropped)."""
    meta, notes, lines = {}, [], []
    for line in text.splitlines():
        if line.startswith("#"):
            body = line[1:].strip()
            key, sep, value = body.partition("=")
            if sep and " " not in key:
                meta[key] = value
            else:
                notes.append(body)
        elif line.strip():
            lines.append(line)
    records = [dict(r) for r in csv.DictReader(io.StringIO("\n".join(lines))) if None not in r.values()] \
        if lines else []
    return meta, notes, records


def parse_output(text):
    """(meta, notes, rows) of the host benchmark's output."""
    meta, notes, rows = split_output(text)
    for row in rows:
        for k in INT_FIELDS:
            row[k] = int(row.get(k, 0))
        for k in FLOAT_FIELDS:
            row[k] = float(row[k])
    return meta, notes, rows


def parse_stats(text):
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def commlib_path(row, stat_available):
    """Which way commlib packed a shape during the timed calls."""
    if not stat_available or row["stat_fast"] < 0 or row["stat_fallback"] < 0:
        return "n/a"
    fast, fallback = row["stat_fast"], row["stat_fallback"]
    if fast == 0 and fallback == 0:
        return "none"          # counters did not move: commlib disabled or not counting
    if fallback == 0:
        return "fast"
    if fast == 0:
        return "fallback"
    return "mixed"


def path_label(row):
    """The commlib path column: the path, and the reasons commlib gave when it forwarded."""
    label = row["commlib_path"]
    why = [w.split("=")[0] for w in row.get("fallback_reasons", "").split(";") if w]
    if row.get("commlib_type", "").startswith("unsupported:"):
        why.append("type " + row["commlib_type"].split(":", 1)[1].split("=")[0])
    return f"{label} ({', '.join(why)})" if why and label != "fast" else label


def derive(rows, stat_available):
    for row in rows:
        row["identical"] = row["identical"] == "ok"
        row.setdefault("op", "pack")
        row.setdefault("cache", "warm")
        row["commlib_gbps"] = row["total_bytes"] / row["commlib_ns"] if row["commlib_ns"] > 0 else 0.0
        row["host_gbps"] = row["total_bytes"] / row["host_ns"] if row["host_ns"] > 0 else 0.0
        row["speedup"] = row["host_ns"] / row["commlib_ns"] if row["commlib_ns"] > 0 else 0.0
        # The same ratio on the fastest batch of each side: less sensitive to interference
        # from other processes, a cross-check of the median's ratio.
        row["speedup_of_min"] = (row["host_min_ns"] / row["commlib_min_ns"]
                                 if row["commlib_min_ns"] > 0 else 0.0)
        row["commlib_path"] = commlib_path(row, stat_available)
        row["commlib_path_label"] = path_label(row)
    return rows


def page_use(notes):
    """{buffer: (bytes in huge pages, bytes)} from the benchmark's 'pages <buffer> <when>: H of
    B bytes in huge pages' notes, the last report of each buffer (when its shapes were done)."""
    use = {}
    for note in notes:
        m = re.match(r"pages (\S+) (filled|done): (-?\d+) of (\d+) bytes", note)
        if m:
            use[m.group(1)] = (int(m.group(3)), int(m.group(4)))
    return use


def format_pages(result):
    """One line: the kernel's setting, the policy asked for, the share of each typed buffer in
    huge pages (one figure when they all agree within a percent)."""
    use = result.get("pages_used") or {}
    if not use:
        return None
    pct = {name: (100.0 * h / b if h >= 0 and b else None) for name, (h, b) in use.items()}
    known = [v for v in pct.values() if v is not None]
    if not known:
        share = "unknown (no /proc/self/smaps)"
    elif len(known) == len(pct) and max(known) - min(known) <= 1:
        share = f"all {statistics.median(known):.0f} %"
    else:
        share = ", ".join(f"{name} {'?' if v is None else f'{v:.0f} %'}" for name, v in pct.items())
    return (f"pages: transparent huge pages '{result.get('thp') or 'unknown'}' in the kernel, "
            f"{result.get('pages') or 'default'} asked; typed buffers in huge pages: {share}")


def geomean(values):
    values = [v for v in values if v > 0]
    if not values:
        return None
    return math.exp(sum(math.log(v) for v in values) / len(values))


def slowest(rows):
    """{"name", "speedup"} of the shape with the lowest speedup, or None."""
    if not rows:
        return None
    r = min(rows, key=lambda r: r["speedup"])
    out = {"name": r["name"], "speedup": r["speedup"]}
    if r.get("speedup_runs"):  # --repeat: each run's ratio, the median's spread
        out["runs"] = list(r["speedup_runs"])
    return out


def halo_axis(row):
    """x, y or z of a halo shape (halo<N>_q<Q>_r<R>_<axis>_<op>_<cache>)."""
    return row["name"].split("_")[3]


def group_geomeans(rows):
    """{group: {"n", "geomean", "slowest"}}: the faces and vectors (the shapes from before the
    halo faces), the halo faces, and the halo faces by op and cache and by axis."""
    halo = [r for r in rows if r.get("kind") == HALO_KIND]
    groups = {"faces and vectors": [r for r in rows if r.get("kind") != HALO_KIND], "halo": halo}
    for op in ("pack", "unpack"):
        for cache in ("warm", "cold"):
            groups[f"halo {op} {cache}"] = [r for r in halo if r["op"] == op and r["cache"] == cache]
    for axis in "xyz":
        groups[f"halo {axis}"] = [r for r in halo if halo_axis(r) == axis]
    return {name: {"n": len(g), "geomean": geomean([r["speedup"] for r in g]), "slowest": slowest(g)}
            for name, g in groups.items() if g}


def summarize(rows):
    # The small-message figures keep their meaning from before the halo faces: over the
    # faces and vectors only (a halo face is never small; its x blocks are).
    plain = [r for r in rows if r.get("kind") != HALO_KIND]
    return {
        "n_shapes": len(rows),
        "n_mismatch": sum(1 for r in rows if not r["identical"]),
        "geomean_speedup": geomean([r["speedup"] for r in rows]),
        "geomean_speedup_of_min": geomean([r.get("speedup_of_min", 0) for r in rows]),
        "slowest": slowest(rows),
        "geomean_speedup_small": geomean([r["speedup"] for r in plain
                                          if r["total_bytes"] <= SMALL_BYTES]),
        "geomean_speedup_small_blocks": geomean([r["speedup"] for r in plain
                                                 if r["block_bytes"] <= SMALL_BLOCK]),
        "groups": group_geomeans(rows),
        "slower": [r["name"] for r in rows if r["speedup"] < SLOWER_THAN],
        "fallback": [r["name"] for r in rows if r["commlib_path"] in ("fallback", "mixed")],
        # MPI_Pack / MPI_Unpack calls that commlib's own counter did not see: not interposed.
        "not_intercepted": [r["name"] for r in rows
                            if r.get("stat_calls", -1) >= 0 and r["stat_calls"] < r["commlib_calls"]],
    }


def human_bytes(n):
    for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    if n >= 16 << 20:
        return f"{n / (1 << 20):.2f} MiB"
    if n >= 1 << 10:
        return f"{n / (1 << 10):.2f} KiB"
    return f"{n} B"


def format_table(rows, baseline_is_commlib=True):
    head = ["shape", "op", "cache", "bytes", "block", "commlib us", "host MPI us", "commlib GB/s",
            "host GB/s", "speedup", "identical", "commlib path"]
    if not baseline_is_commlib:
        head[5], head[7] = "A (host) us", "A GB/s"
    body = []
    for r in rows:
        body.append([r["name"], r["op"], r["cache"], human_bytes(r["total_bytes"]),
                     human_bytes(r["block_bytes"]),
                     f"{r['commlib_ns'] / 1e3:.3f}", f"{r['host_ns'] / 1e3:.3f}",
                     f"{r['commlib_gbps']:.2f}", f"{r['host_gbps']:.2f}",
                     f"{r['speedup']:.2f}x", "ok" if r["identical"] else "MISMATCH",
                     r["commlib_path_label"]])
    widths = [max(len(head[i]), *(len(b[i]) for b in body)) if body else len(head[i])
              for i in range(len(head))]
    numeric = {3, 4, 5, 6, 7, 8, 9}

    def fmt(cells):
        return " | ".join(c.rjust(w) if i in numeric else c.ljust(w)
                          for i, (c, w) in enumerate(zip(cells, widths)))

    lines = [fmt(head), "-+-".join("-" * w for w in widths)]
    lines += [fmt(b) for b in body]
    return "\n".join(lines)


def format_summary(summary, rows, control=False):
    def g(v):
        return "n/a" if v is None else f"{v:.2f}x"
    def low(s):
        if not s:
            return "n/a"
        runs = f" (runs {min(s['runs']):.2f}-{max(s['runs']):.2f}x)" if s.get("runs") else ""
        return f"{s['name']} {s['speedup']:.2f}x{runs}"
    what = "host/host ratio (A/A control)" if control else "speedup (host/commlib)"
    groups = summary.get("groups", {})
    lines = [f"geomean {what}: {g(summary['geomean_speedup'])} over "
             f"{summary['n_shapes']} shapes, slowest {low(summary.get('slowest'))} (ratio of "
             f"the fastest batches: {g(summary['geomean_speedup_of_min'])})"]
    plain = groups.get("faces and vectors")
    if plain:
        lines.append(f"  faces and vectors: {g(plain['geomean'])} over {plain['n']}; "
                     f"{g(summary['geomean_speedup_small'])} for <= {SMALL_BYTES // 1024} KiB; "
                     f"{g(summary['geomean_speedup_small_blocks'])} for blocks <= {SMALL_BLOCK} B; "
                     f"slowest {low(plain['slowest'])}")
    halo = groups.get("halo")
    if halo:
        parts = [f"{name[5:]} {g(v['geomean'])}" for name, v in groups.items()
                 if name.startswith("halo ")]
        lines.append(f"  halo faces: {g(halo['geomean'])} over {halo['n']}; " + ", ".join(parts)
                     + f"; slowest {low(halo['slowest'])}")
    if control and rows:
        ratios = [r["speedup"] for r in rows]
        lines.append(f"A/A ratios range {min(ratios):.2f}x .. {max(ratios):.2f}x: the noise of "
                     "the method on this machine now")
    elif summary["slower"]:
        lines.append(f"commlib slower than the host MPI (speedup < {SLOWER_THAN}): "
                     + ", ".join(summary["slower"]))
    if summary["fallback"]:
        lines.append("forwarded to the host MPI (pack.fallback moved): "
                     + ", ".join(summary["fallback"]))
    if summary.get("not_intercepted"):
        lines.append("MPI_Pack / MPI_Unpack calls that commlib did not count (pack.calls, "
                     "unpack.calls): "
                     + ", ".join(summary["not_intercepted"]))
    if summary["n_mismatch"]:
        lines.append(f"{summary['n_mismatch']} shape(s) packed DIFFERENT bytes than the host MPI")
    return "\n".join(lines)


def write_csv(path, rows):
    fields = ["name", "kind", "op", "cache", "total_bytes", "block_bytes", "stride_bytes",
              "extent_bytes", "grid_bytes",
              "commlib_ns", "host_ns", "commlib_gbps", "host_gbps", "speedup",
              "speedup_of_min", "identical",
              "commlib_path", "commlib_min_ns", "host_min_ns", "rounds", "commlib_batch",
              "host_batch", "commlib_calls", "stat_calls", "stat_fast", "stat_fallback",
              "fallback_reasons", "commlib_type"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**r, "identical": "ok" if r["identical"] else "MISMATCH"})


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="commlib bench pack",
        description="MPI_Pack through commlib against the host MPI's PMPI_Pack, measured "
                    "interleaved in one process, over faces, strided byte vectors and the halo "
                    "example's faces (MPI_Pack and MPI_Unpack, warm and out of cache).")
    p.add_argument("--csv", metavar="FILE", help="write the per-shape results as CSV")
    p.add_argument("--json", metavar="FILE", help="write the results and summary as JSON")
    p.add_argument("--quick", action="store_true",
                   help="fewer and shorter repetitions (10 ms per side per shape, 5 rounds)")
    p.add_argument("--keep", action="store_true",
                   help=f"build in {cache_dir()} (reused while the source is unchanged) and "
                        "keep the raw output there, instead of a temporary directory")
    p.add_argument("--target-ms", type=float, metavar="MS",
                   help="time spent per implementation per shape (default 60, quick 10)")
    p.add_argument("--rounds", type=int, metavar="N",
                   help="interleaved A/B rounds per shape (a cold shape: one call per side per "
                        "round); the median is reported (default 31, quick 5)")
    p.add_argument("--repeat", type=int, metavar="N",
                   help="run the whole benchmark N times, each in a new process (memory placed "
                        "anew), and report per shape the median over the runs (default 1; with "
                        "--compare 2 per setting)")
    p.add_argument("--compare", action="append", metavar="VAR=VALUE[,VAR=VALUE]",
                   help="run the benchmark with these environment variables set (commlib's knobs, "
                        "README), once per --repeat for each --compare given, the settings "
                        "alternated in separate processes, and print each shape's ratio under "
                        "each setting side by side (one --compare: against the environment as it is)")
    p.add_argument("--filter", metavar="TEXT", help="only shapes whose name contains TEXT")
    p.add_argument("--max-extent-mib", type=int, metavar="MIB",
                   help="skip shapes whose input spans more than this (a halo face: its whole "
                        "grid; default 1200)")
    p.add_argument("--grid-pages", choices=PAGE_POLICIES, metavar="|".join(PAGE_POLICIES),
                   help="the pages of the input and the halo grids: the kernel's transparent huge "
                        "page default, 2 MiB pages asked for (madvise), or 4 KiB ones; a face of "
                        "blocks a page apart costs a TLB miss a block in 4 KiB pages (default: "
                        "$BENCH_PACK_PAGES, else default; --compare BENCH_PACK_PAGES=huge compares)")
    p.add_argument("--no-preload", action="store_true",
                   help="do not preload commlib: both columns are the host MPI (A/A control "
                        "of the method's noise)")
    p.add_argument("--preload", metavar="LIB",
                   help="preload this library instead of the installed libcommlib.so (another "
                        "build of commlib, to compare builds)")
    p.add_argument("--timeout", type=float, default=600, metavar="S",
                   help="give up on the benchmark run after S seconds (default 600)")
    dev = p.add_argument_group("device mode")
    dev.add_argument("--device", action="store_true",
                     help="MPI_Pack of GPU memory into GPU memory (commlib's device engine) against "
                          "cudaMemcpy and cudaMemcpy2D of the same bytes, over TEMPI's grid "
                          "(--target-ms: time per shape, default 150, quick 20; "
                          "--max-extent-mib default 4608)")
    dev.add_argument("--min-calls", type=int, metavar="N",
                     help="device mode: at least N timed calls of each operation (default 30, quick 10)")
    dev.add_argument("--tempi", metavar="CSV",
                     help="device mode: TEMPI's figures to compare with (default: "
                          f"{TEMPI_CSV} in $COMMLIB_ANCHORS, ../shared/anchors or .device/anchors)")
    return p.parse_args(argv)


def combine_runs(runs):
    """One result from several runs of the benchmark: per shape (in the first run's order,
    shapes every run has) the median of each run's times and ratios, identical only if every
    run packed identically.  The run-to-run spread is kept: speedup_runs per shape."""
    first = runs[0]
    by_name = [{r["name"]: r for r in run["shapes"]} for run in runs]
    rows = []
    for row in first["shapes"]:
        same = [shapes[row["name"]] for shapes in by_name if row["name"] in shapes]
        if len(same) < len(runs):
            continue
        out = dict(row)
        for field in ("commlib_ns", "host_ns", "commlib_min_ns", "host_min_ns", "commlib_gbps",
                      "host_gbps", "speedup", "speedup_of_min"):
            out[field] = statistics.median(r[field] for r in same)
        out["identical"] = all(r["identical"] for r in same)
        out["speedup_runs"] = [r["speedup"] for r in same]
        rows.append(out)
    result = dict(first)
    result["shapes"] = rows
    result["summary"] = summarize(rows)
    result["repeat"] = len(runs)
    result["wall_s"] = sum(run["wall_s"] for run in runs)
    result["returncode"] = next((run["returncode"] for run in runs if run["returncode"]), 0)
    result["notes"] = [n for run in runs for n in run["notes"]]
    return result


def bench_args(opts):
    args = []
    if opts.quick:
        args.append("-q")
    if opts.target_ms is not None:
        args += ["-t", str(opts.target_ms)]
    if opts.rounds is not None:
        args += ["-r", str(opts.rounds)]
    if opts.max_extent_mib is not None:
        args += ["-m", str(opts.max_extent_mib)]
    if opts.filter:
        args += ["-f", opts.filter]
    if opts.grid_pages:
        args += ["-p", opts.grid_pages]
    return args


def run(opts, work_dir, reuse=False, setting=None):
    """Build (reuse: a binary already in work_dir, as with --keep), run (with the environment
    variables of `setting`, a dict, set), parse; returns (result dict, raw stdout, returncode)."""
    source = find_source()
    if opts.no_preload:
        preload = None
    elif opts.preload:
        preload = os.path.abspath(opts.preload)
        if not os.path.exists(preload):
            raise BenchError(f"--preload {opts.preload}: no such file")
    else:
        preload = paths.preload_library()
    binary = build(source, work_dir, reuse=opts.keep or reuse)
    mpiexec = paths.mpiexec()
    kind = launcher_kind(mpiexec)
    cmd, env = launch_command(mpiexec, kind, binary, bench_args(opts), preload)
    env.update(setting or {})
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=opts.timeout)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        raise BenchError(f"benchmark did not finish in {opts.timeout:.0f} s; output so far:\n{out}")
    wall = time.monotonic() - start
    meta, notes, rows = parse_output(proc.stdout)
    stat_available = meta.get("commlib_stat") == "available"
    derive(rows, stat_available)
    result = {
        "benchmark": "pack",
        "preload": preload,
        "commlib_active": stat_available,
        "launcher": kind,
        "command": cmd,
        "mpi_library": meta.get("mpi_library", ""),
        "target_ms": float(meta["target_ms"]) if "target_ms" in meta else None,
        "rounds": int(meta["rounds"]) if "rounds" in meta else None,
        "evict_bytes": int(meta["evict_bytes"]) if "evict_bytes" in meta else None,
        "setting": dict(setting or {}),
        "notes": notes,
        "thp": meta.get("thp"),
        "pages": meta.get("pages"),
        "pages_used": page_use(notes),
        "cpus": os.cpu_count(),
        "load_average_before": load_before,
        "wall_s": wall,
        "returncode": proc.returncode,
        "stderr_tail": proc.stderr[-4000:],
        "commlib_stats": parse_stats(meta.get("commlib_stats")),
        "shapes": rows,
        "summary": summarize(rows),
    }
    return result, proc.stdout, proc.returncode


# ------------------------------------------------------------------------- device mode
DEVICE_SOURCE_NAME = "bench_device_pack.c"
TEMPI_CSV = "tempi-h200-device-pack.csv"
DEVICE_OPS = ("pack", "unpack", "memcpy", "memcpy2d")
DEVICE_INT_FIELDS = ("count", "target_bytes", "block_bytes", "stride_bytes", "packed_bytes",
                     "extent_bytes", "calls", "stat_fast", "stat_fallback")
# What the device engine aims at, for the summary lines (measured in the same run).
GOAL_MEMCPY_PCT = 80.0      # >= this % of a D2D memcpy's bandwidth, blocks >= 32 B at 4 MiB
GOAL_TEMPI_SMALL = 4.0      # >= this many times TEMPI's bandwidth for 1-8 B blocks
GOAL_SMALL_TIME = 1.3       # <= this many times the memcpy's time at 1 KiB
TEMPI_KIND = {"vector": "2d_byte_vector (MiB/s)", "hvector": "2d_byte_hvector (MiB/s)",
              "subarray": "2d_byte_subarray (MiB/s)"}


def find_tempi(given=None):
    """Path of TEMPI's anchor CSV, or None."""
    if given:
        return given
    root = os.path.dirname(paths.PACKAGE_DIR)
    dirs = [os.environ.get("COMMLIB_ANCHORS"), os.path.join(root, "..", "shared", "anchors"),
            os.path.join(root, ".device", "anchors")]
    for d in dirs:
        if d and os.path.exists(os.path.join(d, TEMPI_CSV)):
            return os.path.normpath(os.path.join(d, TEMPI_CSV))
    return None


def load_tempi(path):
    """{(kind, count, target, block): MiB/s} from TEMPI's bench-mpi-pack output.  Its
    'numblocks' column holds the target bytes per element (numblocks = target / block)."""
    if not path:
        return {}
    with open(path) as f:
        lines = [line for line in f if line.strip() and not line.startswith("#")]
    table = {}
    for rec in csv.DictReader(lines):
        for kind, column in TEMPI_KIND.items():
            try:
                key = (kind, int(rec["count"]), int(rec["numblocks"]), int(rec["blocklengths"]))
                table[key] = float(rec[column])
            except (KeyError, TypeError, ValueError):
                continue
    return table


def parse_device_output(text):
    """(meta, notes, rows) of the device benchmark's output."""
    meta, notes, rows = split_output(text)
    for row in rows:
        for k in DEVICE_INT_FIELDS:
            row[k] = int(row[k])
        for op in DEVICE_OPS:
            row[f"{op}_ns"] = float(row[f"{op}_ns"])
            row[f"{op}_min_ns"] = float(row[f"{op}_min_ns"])
    return meta, notes, rows


def derive_device(rows, tempi):
    for r in rows:
        r["identical"] = r["identical"] == "ok"
        n = r["packed_bytes"]
        for op in DEVICE_OPS:
            r[f"{op}_gbps"] = n / r[f"{op}_ns"] if r[f"{op}_ns"] > 0 else 0.0
        # the same bytes moved: % of the copy's bandwidth is the ratio of the times
        r["pct_of_memcpy"] = 100.0 * r["memcpy_ns"] / r["pack_ns"] if r["pack_ns"] > 0 else 0.0
        r["time_vs_memcpy"] = r["pack_ns"] / r["memcpy_ns"] if r["memcpy_ns"] > 0 else 0.0
        r["pack_mibps"] = n / r["pack_ns"] * 1e9 / (1 << 20) if r["pack_ns"] > 0 else 0.0
        t = tempi.get((r["kind"], r["count"], r["target_bytes"], r["block_bytes"]))
        r["tempi_mibps"] = t
        r["vs_tempi"] = r["pack_mibps"] / t if t else None
        r["commlib_path"] = commlib_path({"stat_fast": r["stat_fast"], "stat_fallback": r["stat_fallback"]},
                                         r["stat_fast"] >= 0)
    return rows


def summarize_device(rows):
    big = [r for r in rows if r["target_bytes"] == 4 << 20 and r["block_bytes"] >= 32]
    small_blocks = [r for r in rows if r["block_bytes"] <= 8 and r["vs_tempi"]]
    tiny = [r for r in rows if r["target_bytes"] == 1 << 10]

    def stat(values, fn):
        return fn(values) if values else None
    s = {
        "n_shapes": len(rows),
        "n_mismatch": sum(1 for r in rows if not r["identical"]),
        "memcpy_pct_4mib_ge32": stat([r["pct_of_memcpy"] for r in big], geomean),
        "memcpy_pct_4mib_ge32_min": stat([r["pct_of_memcpy"] for r in big], min),
        "vs_tempi_le8": stat([r["vs_tempi"] for r in small_blocks], geomean),
        "vs_tempi_le8_min": stat([r["vs_tempi"] for r in small_blocks], min),
        "vs_tempi_all": stat([r["vs_tempi"] for r in rows if r["vs_tempi"]], geomean),
        "time_vs_memcpy_1kib": stat([r["time_vs_memcpy"] for r in tiny], geomean),
        "time_vs_memcpy_1kib_max": stat([r["time_vs_memcpy"] for r in tiny], max),
        "not_fast": [r["name"] for r in rows if r["commlib_path"] not in ("fast", "n/a")],
    }
    s["goals"] = {
        f"blocks >= 32 B at 4 MiB: every shape >= {GOAL_MEMCPY_PCT:g}% of memcpy":
            None if s["memcpy_pct_4mib_ge32_min"] is None else s["memcpy_pct_4mib_ge32_min"] >= GOAL_MEMCPY_PCT,
        f"blocks 1-8 B: every shape >= {GOAL_TEMPI_SMALL:g}x TEMPI":
            None if s["vs_tempi_le8_min"] is None else s["vs_tempi_le8_min"] >= GOAL_TEMPI_SMALL,
        f"1 KiB: every shape <= {GOAL_SMALL_TIME:g}x memcpy's time":
            None if s["time_vs_memcpy_1kib_max"] is None else s["time_vs_memcpy_1kib_max"] <= GOAL_SMALL_TIME,
    }
    return s


def format_device_table(rows):
    head = ["shape", "bytes", "block", "pack us", "pack GB/s", "% memcpy", "memcpy us",
            "memcpy2D GB/s", "unpack GB/s", "vs TEMPI", "identical", "path"]
    body = []
    for r in rows:
        body.append([r["name"], human_bytes(r["packed_bytes"]), human_bytes(r["block_bytes"]),
                     f"{r['pack_ns'] / 1e3:.2f}", f"{r['pack_gbps']:.2f}", f"{r['pct_of_memcpy']:.0f}%",
                     f"{r['memcpy_ns'] / 1e3:.2f}", f"{r['memcpy2d_gbps']:.2f}", f"{r['unpack_gbps']:.2f}",
                     f"{r['vs_tempi']:.2f}x" if r["vs_tempi"] else "n/a",
                     "ok" if r["identical"] else "MISMATCH", r["commlib_path"]])
    widths = [max(len(head[i]), *(len(b[i]) for b in body)) if body else len(head[i])
              for i in range(len(head))]
    numeric = set(range(1, 10))

    def fmt(cells):
        return " | ".join(c.rjust(w) if i in numeric else c.ljust(w)
                          for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(head), "-+-".join("-" * w for w in widths)] + [fmt(b) for b in body])


def format_device_summary(s, tempi_path):
    def g(v, unit="x"):
        return "n/a" if v is None else (f"{v:.0f}%" if unit == "%" else f"{v:.2f}x")
    lines = [
        f"4 MiB, blocks >= 32 B: pack at {g(s['memcpy_pct_4mib_ge32'], '%')} of D2D memcpy bandwidth "
        f"(geomean; lowest {g(s['memcpy_pct_4mib_ge32_min'], '%')})",
        f"blocks 1-8 B: {g(s['vs_tempi_le8'])} TEMPI's bandwidth (geomean; lowest "
        f"{g(s['vs_tempi_le8_min'])}); all shapes {g(s['vs_tempi_all'])}"
        + ("" if tempi_path else " (no TEMPI anchor file found: --tempi CSV)"),
        f"1 KiB: pack takes {g(s['time_vs_memcpy_1kib'])} memcpy's time (geomean; worst "
        f"{g(s['time_vs_memcpy_1kib_max'])})",
    ]
    for goal, met in s["goals"].items():
        lines.append(f"goal {'n/a' if met is None else 'MET' if met else 'MISSED':6}  {goal}")
    if s["not_fast"]:
        lines.append("not packed by commlib's fast path (stats): " + ", ".join(s["not_fast"]))
    if s["n_mismatch"]:
        lines.append(f"{s['n_mismatch']} shape(s) packed DIFFERENT bytes than PMPI_Pack of a host copy")
    return "\n".join(lines)


def write_device_csv(path, rows):
    fields = ["name", "kind", "count", "target_bytes", "block_bytes", "stride_bytes", "packed_bytes",
              "extent_bytes", "calls"]
    for op in DEVICE_OPS:
        fields += [f"{op}_ns", f"{op}_min_ns", f"{op}_gbps"]
    fields += ["pct_of_memcpy", "time_vs_memcpy", "pack_mibps", "tempi_mibps", "vs_tempi", "identical",
               "commlib_path", "stat_fast", "stat_fallback"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**r, "identical": "ok" if r["identical"] else "MISMATCH"})


def device_args(opts):
    args = []
    if opts.quick:
        args.append("-q")
    if opts.target_ms is not None:
        args += ["-t", str(opts.target_ms)]
    if opts.min_calls is not None:
        args += ["-n", str(opts.min_calls)]
    if opts.max_extent_mib is not None:
        args += ["-m", str(opts.max_extent_mib)]
    if opts.filter:
        args += ["-f", opts.filter]
    return args


def device_main(opts):
    """`commlib bench pack --device`: exit 0 when it ran and every shape packed the same
    bytes as the host MPI, 1 on a mismatch, 2 on an error, 77 without a GPU."""
    if opts.keep:
        work_dir, cleanup = cache_dir(), None
    else:
        work_dir = cleanup = tempfile.mkdtemp(prefix="commlib-bench-device-pack-")
    try:
        preload = None if opts.no_preload else (os.path.abspath(opts.preload) if opts.preload
                                                else paths.preload_library())
        binary = build(find_source(DEVICE_SOURCE_NAME), work_dir, reuse=opts.keep)
        mpiexec = paths.mpiexec()
        cmd, env = launch_command(mpiexec, launcher_kind(mpiexec), binary, device_args(opts), preload)
        start = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=opts.timeout)
        wall = time.monotonic() - start
    except (BenchError, FileNotFoundError, subprocess.TimeoutExpired) as e:
        print(f"commlib bench pack --device: {e}", file=sys.stderr)
        return 2
    finally:
        if cleanup:
            shutil.rmtree(cleanup, ignore_errors=True)
    meta, notes, rows = parse_device_output(proc.stdout)
    tempi_path = find_tempi(opts.tempi)
    derive_device(rows, load_tempi(tempi_path))
    summary = summarize_device(rows)
    result = {"benchmark": "pack --device", "preload": preload, "command": cmd,
              "device": meta.get("device"), "sm_count": meta.get("sm_count"),
              "mpi_library": meta.get("mpi_library", ""), "tempi_csv": tempi_path,
              "target_ms": float(meta["target_ms"]) if "target_ms" in meta else None,
              "notes": notes, "wall_s": wall, "returncode": proc.returncode,
              "stderr_tail": proc.stderr[-4000:], "shapes": rows, "summary": summary}
    for note in notes:
        if note.startswith(("skipped", "MISMATCH", "no CUDA")):
            print(f"note: {note}")
    if rows:
        print(format_device_table(rows))
        print(format_device_summary(summary, tempi_path))
    print(f"device: {meta.get('device', 'unknown')}; per call: median wall time including completion "
          f"(MPI_Pack returns packed; the copies are followed by a stream synchronisation); "
          f"{wall:.1f} s")
    if opts.csv:
        write_device_csv(opts.csv, rows)
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
    if proc.returncode == 77:
        print("commlib bench pack --device: no CUDA device", file=sys.stderr)
        return 77
    if proc.returncode not in (0, 1) or not rows:
        print(f"commlib bench pack --device: the benchmark exited with status {proc.returncode}"
              + (f" after {rows[-1]['name']}" if rows else "") + "\n" + proc.stderr[-4000:],
              file=sys.stderr)
        return 2
    return 1 if summary["n_mismatch"] or proc.returncode == 1 else 0


def runs_alternated(opts, settings, repeat):
    """The benchmark `repeat` times under each setting (a dict of environment variables), the
    settings alternated, each run its own process, the binary built once (in cache_dir() with
    --keep, else in a temporary directory).  Returns (per setting its results, the setting of the
    last run, its raw output, its returncode); stops after the first run that did not finish."""
    work_dir = cache_dir() if opts.keep else tempfile.mkdtemp(prefix="commlib-bench-pack-")
    runs, last, raw, rc = [[] for _ in settings], 0, "", 0
    try:
        for i in range(repeat):
            for k, setting in enumerate(settings):
                result, raw, rc = run(opts, work_dir, reuse=i > 0 or k > 0, setting=setting)
                runs[k].append(result)
                last = k
                if rc not in (0, 1) or not result["shapes"]:
                    return runs, last, raw, rc
        return runs, last, raw, rc
    finally:
        if not opts.keep:
            shutil.rmtree(work_dir, ignore_errors=True)


# ------------------------------------------------------------------------- --compare
SETTING_VAR = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_setting(text):
    """{VAR: VALUE} of 'VAR=VALUE[,VAR=VALUE]' (commas or spaces between them)."""
    setting = {}
    for item in re.split(r"[,\s]+", text.strip()):
        var, sep, value = item.partition("=")
        if not item or not sep or not SETTING_VAR.match(var):
            raise BenchError(f"--compare {text!r}: expected VAR=VALUE[,VAR=VALUE], not {item!r}")
        setting[var] = value
    return setting


def setting_label(setting):
    return ",".join(f"{k}={v}" for k, v in setting.items()) or "as is"


def compare_summary(result, first):
    """One setting's line: its geomean ratio, how many shapes under 1.00x and SLOWER_THAN, the
    slowest, and commlib's own time against the first setting's (geomean over the shapes both
    have; the ratios are same-process, commlib's own times are not)."""
    rows, summary = result["shapes"], result["summary"]
    own = {r["name"]: r["commlib_ns"] for r in first["shapes"]}
    mine = [r["commlib_ns"] / own[r["name"]] for r in rows if own.get(r["name"], 0) > 0 and r["commlib_ns"] > 0]
    slow = summary["slowest"]
    text = (f"geomean {summary['geomean_speedup'] or 0:.3f}x over {len(rows)} shapes, "
            f"{sum(r['speedup'] < 1 for r in rows)} under 1.00x, "
            f"{sum(r['speedup'] < SLOWER_THAN for r in rows)} under {SLOWER_THAN:.2f}x")
    if slow:
        text += f", slowest {slow['name']} {slow['speedup']:.2f}x"
    if mine and result is not first:
        text += f"; commlib's own time {geomean(mine):.3f} of the first setting's"
    return text


COMPARE_HEAD_MAX = 24  # settings named longer than this head their columns as [1], [2], ...


def format_compare(labels, results):
    """Per shape (the first setting's order) each setting's ratio, with the runs' spread, then
    a summary line per setting.  Where a setting's name would make its column wider than
    COMPARE_HEAD_MAX, the columns are headed [1], [2], ... and the settings listed first."""
    by_name = [{r["name"]: r for r in res["shapes"]} for res in results]
    numbered = any(len(label) > COMPARE_HEAD_MAX for label in labels)
    heads = [f"[{i}]" for i in range(1, len(labels) + 1)] if numbered else labels
    width = max(20, *(len(head) for head in heads))  # a cell: '1.23x (1.20-1.26)'
    lines = [f"{head} {label}" for head, label in zip(heads, labels)] if numbered else []
    lines.append(f"{'shape':34s} " + " ".join(f"{head:>{width}s}" for head in heads))
    for row in results[0]["shapes"]:
        cells = []
        for shapes in by_name:
            r = shapes.get(row["name"])
            if r is None:
                cells.append(f"{'-':>{width}s}")
                continue
            runs = r.get("speedup_runs") or []
            spread = f" ({min(runs):.2f}-{max(runs):.2f})" if len(runs) > 1 else ""
            cell = f"{r['speedup']:.2f}x{spread}"
            cells.append(f"{cell:>{width}s}")
        lines.append(f"{row['name']:34s} " + " ".join(cells))
    for head, label, res in zip(heads, labels, results):
        lines.append(f"{head + ' ' if numbered else ''}{label}: {compare_summary(res, results[0])}")
    return "\n".join(lines)


def compare_main(opts):
    """--compare: each setting --repeat times, alternated, each run its own process."""
    try:
        settings = [parse_setting(text) for text in opts.compare]
    except BenchError as e:
        print(f"commlib bench pack: {e}", file=sys.stderr)
        return 2
    if len(settings) == 1:
        settings.insert(0, {})  # against the environment as it is
    labels = [setting_label(s) for s in settings]
    if len(set(labels)) < len(labels):
        print("commlib bench pack: --compare names the same setting twice", file=sys.stderr)
        return 2
    if opts.grid_pages and any("BENCH_PACK_PAGES" in s for s in settings):
        print("commlib bench pack: --grid-pages would override the BENCH_PACK_PAGES of --compare",
              file=sys.stderr)
        return 2
    repeat = opts.repeat or 2
    try:
        runs, last, _, rc = runs_alternated(opts, settings, repeat)
    except (BenchError, FileNotFoundError) as e:
        print(f"commlib bench pack: {e}", file=sys.stderr)
        return 2
    if rc not in (0, 1) or not runs[last][-1]["shapes"]:
        print(f"commlib bench pack: the benchmark under {labels[last]} exited with status {rc}\n"
              + runs[last][-1]["stderr_tail"], file=sys.stderr)
        return 2
    results = [combine_runs(r) if len(r) > 1 else r[0] for r in runs]
    for label, res in zip(labels, results):
        if not res["commlib_active"]:
            print(f"warning: under {label} commlib_stat was not found in the process: its column may "
                  "be the host MPI's")
    print(format_compare(labels, results))
    first = results[0]
    mpi = " ".join(first["mpi_library"].split("MPICH Release")[0].split())
    print(f"host MPI: {mpi or 'unknown'}; per shape the median ratio of {repeat} run(s) a setting "
          f"(the runs' spread in brackets), {first['rounds']} interleaved rounds a run, each run its "
          f"own process, the settings alternated ({' '.join(labels)} ...); "
          f"{sum(r['wall_s'] for res in runs for r in res):.1f} s")
    for label, res in zip(labels, results):
        pages = format_pages(res)
        if pages:
            print(f"{label}: {pages}" + (" (the first run's)" if len(runs[0]) > 1 else ""))
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"benchmark": "pack", "compare": [{"setting": label, "env": s, "result": res}
                                                       for label, s, res in zip(labels, settings, results)],
                       "order": labels * repeat, "repeat": repeat}, f, indent=1)
            f.write("\n")
    return 1 if any(res["summary"]["n_mismatch"] for res in results) else 0


def main(argv=None):
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    if (opts.repeat is not None and opts.repeat < 1) or (opts.device and (opts.repeat or 1) != 1):
        print("commlib bench pack: --repeat takes N >= 1, and only for the host benchmark", file=sys.stderr)
        return 2
    if opts.compare and (opts.device or opts.no_preload or opts.csv):
        print("commlib bench pack: --compare is for the host benchmark with commlib preloaded, "
              "and writes --json only", file=sys.stderr)
        return 2
    if opts.device:
        return device_main(opts)
    if opts.compare:
        return compare_main(opts)
    try:
        (runs,), _, raw, rc = runs_alternated(opts, [{}], opts.repeat or 1)  # a failed run: reported below
        result = runs[-1]
        if len(runs) > 1:
            result = combine_runs(runs)
            rc = result["returncode"]
    except (BenchError, FileNotFoundError) as e:
        print(f"commlib bench pack: {e}", file=sys.stderr)
        if isinstance(e, FileNotFoundError) and "libcommlib" in str(e):
            print("(--no-preload runs the benchmark against the host MPI alone)", file=sys.stderr)
        return 2

    rows = result["shapes"]
    if opts.no_preload:
        print("commlib not preloaded (--no-preload): both columns are the host MPI (A/A control)")
    elif not result["commlib_active"]:
        print(f"warning: {result['preload']} was preloaded but commlib_stat was not found in "
              "the process: the commlib column may be the host MPI")
    load = result["load_average_before"]
    if load is not None and result["cpus"] and load > result["cpus"] - 1:
        print(f"note: load average {load:.1f} on {result['cpus']} CPUs before the run: other "
              "processes compete, expect noisy figures (ratios are still same-run)")
    for note in result["notes"]:
        if note.startswith(("skipped", "MISMATCH")):
            print(f"note: {note}")
    if rows:
        print(format_table(rows, baseline_is_commlib=not opts.no_preload))
        print(format_summary(result["summary"], rows, control=opts.no_preload))
    mpi = " ".join(result["mpi_library"].split("MPICH Release")[0].split())
    cold = (f"; cold: one call per side per round, {human_bytes(result['evict_bytes'])} read "
            "before each" if result.get("evict_bytes") else "")
    if result["target_ms"] is not None:  # else the benchmark did not start: reported below
        runs = (f"; per shape the median of {result['repeat']} runs, each its own process"
                if result.get("repeat", 1) > 1 else "")
        print(f"host MPI: {mpi or 'unknown'}; median per call of {result['rounds']} interleaved "
              f"rounds, ~{result['target_ms']:g} ms per side per shape{cold}{runs}; "
              f"{result['wall_s']:.1f} s")
    pages = format_pages(result)
    if pages:
        print(pages + (" (the first run's)" if result.get("repeat", 1) > 1 else ""))

    if opts.keep:
        raw_path = os.path.join(cache_dir(), "bench_pack-last.out")
        with open(raw_path, "w") as f:
            f.write(raw)
        print(f"raw output: {raw_path}")
    if opts.csv:
        write_csv(opts.csv, rows)
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")

    if rc not in (0, 1) or not rows:
        print(f"commlib bench pack: the benchmark exited with status {rc}"
              + (f" after {rows[-1]['name']}" if rows else "") + "\n" + result["stderr_tail"],
              file=sys.stderr)
        return 2
    if result["summary"]["n_mismatch"] or rc == 1:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
