"""`commlib bench overlap`: how much communication hides behind computation, OSU style.

Builds native/bench/bench_overlap.c and runs it once per configuration on the same ranks:
  A  the host MPI alone (no preload),
  C  commlib preloaded, no progress thread (COMMLIB_PROGRESS=none),
  P  commlib + progress thread, the program's MPI_Iallreduce left to the host MPI and
     progressed by the thread (COMMLIB_PROGRESS=thread COMMLIB_ENGINE_IALLREDUCE=0;
     MPI_Iallreduce only: the knob changes nothing else),
  T  commlib + progress thread, MPI_Iallreduce served by commlib's collective engine
     (COMMLIB_PROGRESS=thread COMMLIB_ENGINE_IALLREDUCE=1, the default),
and the same all-reduce posted from Python (commlib/bench/_overlap_python.py under mpiexec):
  M  mpi4py's Iallreduce + Wait (the host MPI alone),
  E  collectives.mpi.MPIComm.all_reduce(x, async_op=True) + Work.wait() (commlib's engine),
  R  (only with --configs ...,py-ring) E over the engine's MPI transport
     (COMMLIB_ENGINE_TRANSPORT=mpi) instead of shared memory.
Operations: MPI_Iallreduce of doubles (sum; the Python rows the same), MPI_Isend/MPI_Irecv
pairs; host buffers, and device buffers when every rank has a CUDA device (C program only).

Per operation, buffer, size and configuration: pure comm (post + wait), compute calibrated
to the pure comm and timed alone, overall (post, compute, wait), overlap % = max(0, 100 *
(1 - (overall - compute) / pure)), the step speed-up (pure + compute) / overall - how much
faster one step of compute + communication is than the same two done one after the other
(2x at most, with compute = comm) - and "vs base": the baseline configuration's overall time
over this one's (the C rows: A, or C where A has no row; the Python rows: M).  The compute
uses one core and, in the Python rows, releases the GIL: by default the C program's own
floating-point dependency chain (native/bench/compute_spin.c through ctypes); `--py-compute
matmul`: numpy products of a cache-resident matrix with OPENBLAS_NUM_THREADS=OMP_NUM_THREADS=
MKL_NUM_THREADS=1 set for the Python runs.  The host MPI alone is not given device buffers
unless --mpi-cuda-aware says it can read them.

Goals, printed MET or MISSED:
  issue 9: the engine's all-reduce (T from C, E from Python), host, 1 MiB to 64 MiB:
  overlap >= 90 % and the step >= 1.8x faster than without overlap (2 ranks, MPICH and
  Open MPI);
  background progress: overlap >= 90 % for messages >= 1 MiB with the progress thread (T).
No figure is asserted; the exit status is 1 only when a result was wrong (the "verified"
check), 2 on errors.
"""
import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from commlib import paths
from commlib.bench import pass_environment
from commlib.bench.pack import (BenchError, build, cache_dir, find_source, human_bytes, launch_command,
                                launcher_kind, parse_output)

SOURCE_NAME = "bench_overlap.c"
SPIN_SOURCE = "compute_spin.c"
PYTHON_WORKER = "commlib.bench._overlap_python"
GOAL_OVERLAP = 90.0          # % with the progress thread ...
GOAL_MIN_BYTES = 1 << 20     # ... for messages of at least this size
GOAL_STEP = 1.8              # issue 9: step speed-up of the engine's all-reduce ...
GOAL_MAX_BYTES = 64 << 20    # ... for 1 MiB .. 64 MiB
ONE_CORE = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class Config:
    def __init__(self, label, title, program, preload, knobs, ops=None, baseline=()):
        self.label, self.title, self.program, self.preload = label, title, program, preload
        self.knobs = knobs        # COMMLIB_* (and thread-count) environment of the ranks
        self.ops = ops            # None: every --ops; else only these
        self.baseline = baseline  # configurations whose overall time "vs base" divides, first present


CONFIGS = {
    "mpi": Config("A", "host MPI alone", "c", False, {}, baseline=("mpi", "commlib")),
    "commlib": Config("C", "commlib, no progress thread", "c", True, {"COMMLIB_PROGRESS": "none"},
                      baseline=("mpi", "commlib")),
    "thread-mpi": Config("P", "commlib + progress thread, MPI_Iallreduce by the host MPI (COMMLIB_ENGINE_IALLREDUCE=0)",
                         "c", True, {"COMMLIB_PROGRESS": "thread", "COMMLIB_ENGINE_IALLREDUCE": "0"},
                         ops=("iallreduce",), baseline=("mpi", "commlib")),
    "thread": Config("T", "commlib + progress thread, MPI_Iallreduce served by the engine (COMMLIB_ENGINE_IALLREDUCE=1)",
                     "c", True, {"COMMLIB_PROGRESS": "thread", "COMMLIB_ENGINE_IALLREDUCE": "1"},
                     baseline=("mpi", "commlib")),
    "py-mpi": Config("M", "Python: mpi4py Iallreduce + Wait (host MPI alone)", "py", False, dict(ONE_CORE),
                     ops=("iallreduce",), baseline=("py-mpi",)),
    "py": Config("E", "Python: MPIComm.all_reduce(async_op=True) + wait (commlib's engine)", "py", True,
                 dict(ONE_CORE), ops=("iallreduce",), baseline=("py-mpi",)),
    "py-ring": Config("R", "Python: as E over the engine's MPI transport (COMMLIB_ENGINE_TRANSPORT=mpi)", "py", True,
                      {**ONE_CORE, "COMMLIB_ENGINE_TRANSPORT": "mpi"}, ops=("iallreduce",), baseline=("py-mpi",)),
}
DEFAULT_CONFIGS = "mpi,commlib,thread-mpi,thread,py-mpi,py"
ENGINE_CONFIGS = ("thread", "py", "py-ring")   # the issue-9 goal is theirs
OPS = ("iallreduce", "isend_irecv")
FIELDS = ("iters", "pure_us", "compute_us", "overall_us", "overlap_pct", "post_us", "wait_us", "verified",
          "progress_completed", "engine_served", "step_speedup")


def parse_size(text):
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)i?[bB]?\s*", text)
    if not m:
        raise ValueError(f"not a size: {text!r}")
    return int(float(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()])


def size_list(opts):
    """The sizes the C program measures, rounded down to whole doubles as it does."""
    if opts.sizes:
        sizes = [parse_size(s) for s in opts.sizes.split(",") if s.strip()]
    elif opts.quick:
        sizes = [1 << 10, 64 << 10, 1 << 20]
    else:
        sizes = [1 << s for s in range(10, 27, 2)]
    return [s // 8 * 8 for s in sizes if s >= 8]


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="commlib bench overlap",
        description="Communication/computation overlap (OSU method) of MPI_Iallreduce and Isend/Irecv, host and "
                    "device buffers, for the host MPI alone, commlib, commlib with its progress thread (the host "
                    "MPI's MPI_Iallreduce or the engine's), and the all-reduce posted from Python (mpi4py, "
                    "MPIComm).")
    p.add_argument("--ranks", type=int, default=2, metavar="N", help="ranks (default 2)")
    p.add_argument("--quick", action="store_true", help="1 KiB, 64 KiB and 1 MiB, ~20 ms per figure")
    p.add_argument("--json", metavar="FILE", help="write the results and summary as JSON")
    p.add_argument("--csv", metavar="FILE", help="write one line per (row, configuration) as CSV")
    p.add_argument("--sizes", metavar="LIST",
                   help="message sizes, e.g. 1K,1M,64M (default 1 KiB to 64 MiB by factors of 4)")
    p.add_argument("--ops", default="iallreduce,isend_irecv", metavar="LIST",
                   help="iallreduce, isend_irecv (default both; the Python rows are iallreduce)")
    p.add_argument("--configs", default=DEFAULT_CONFIGS, metavar="LIST",
                   help=f"which of {', '.join(CONFIGS)} to run (default {DEFAULT_CONFIGS}; see the module help)")
    p.add_argument("--host-only", action="store_true", help="host buffers only, even with a GPU")
    p.add_argument("--mpi-cuda-aware", action="store_true",
                   help="give device buffers to the host MPI alone too (only for a CUDA-aware MPI)")
    p.add_argument("--target-ms", type=float, metavar="MS",
                   help="time spent per figure (default 200, quick 20)")
    p.add_argument("--interval-us", type=int, metavar="US",
                   help="COMMLIB_PROGRESS_INTERVAL_US for the progress-thread runs")
    p.add_argument("--py-compute", choices=("spin", "matmul"), default="spin",
                   help="the Python rows' compute: spin (default: the C program's loop, through ctypes) or matmul "
                        "(numpy, one thread)")
    p.add_argument("--py-matrix", type=int, default=64, metavar="N",
                   help="--py-compute matmul: the order of the cache-resident matrix (default 64)")
    p.add_argument("--bind", default="none", metavar="POLICY",
                   help="Open MPI's --bind-to for the runs (default none: its default binds 2 ranks to one core "
                        "each, which the progress thread would share); '' keeps the launcher's default")
    p.add_argument("--keep", action="store_true", help=f"build in {cache_dir()} and reuse the binary")
    p.add_argument("--timeout", type=float, default=1800, metavar="S", help="per configuration (default 1800)")
    opts = p.parse_args(argv)
    opts.config_list = [c.strip() for c in opts.configs.split(",") if c.strip()]
    unknown = [c for c in opts.config_list if c not in CONFIGS]
    if unknown or not opts.config_list:
        p.error(f"--configs: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(CONFIGS)}")
    opts.op_list = [o.strip() for o in opts.ops.split(",") if o.strip()]
    if not opts.op_list or any(o not in OPS for o in opts.op_list):
        p.error(f"--ops: choose from {', '.join(OPS)}")
    if opts.ranks < 1:
        p.error("--ranks must be at least 1")
    try:
        opts.size_list = size_list(opts)
    except ValueError as e:
        p.error(f"--sizes: {e}")
    if not opts.size_list:
        p.error("--sizes: no size of at least 8 bytes")
    # configurations with nothing to measure under --ops (P and the Python rows: iallreduce only)
    opts.config_list = [c for c in opts.config_list if ops_of(opts, c)]
    if not opts.config_list:
        p.error("--configs/--ops: nothing to measure")
    return opts


def ops_of(opts, config):
    only = CONFIGS[config].ops
    return [o for o in opts.op_list if only is None or o in only]


def bench_args(opts, config):
    """The C program's arguments."""
    args = []
    if opts.quick:
        args.append("-q")
    if opts.target_ms is not None:
        args += ["-t", str(opts.target_ms)]
    args += ["-s", ",".join(str(s) for s in opts.size_list)]
    args += ["-o", ",".join(ops_of(opts, config))]
    if opts.host_only or (config == "mpi" and not opts.mpi_cuda_aware):
        args.append("-H")
    return args


def python_args(opts, config, spin):
    args = ["-m", PYTHON_WORKER, "--method", "engine" if CONFIGS[config].preload else "mpi4py",
            "--sizes", ",".join(str(s) for s in opts.size_list), "--target-ms",
            str(opts.target_ms if opts.target_ms is not None else 20 if opts.quick else 200),
            "--compute", opts.py_compute, "--matrix", str(opts.py_matrix)]
    if opts.quick:
        args.append("--quick")
    if opts.py_compute == "spin":
        args += ["--spin-library", spin]
    return args


def command_for(opts, config, mpiexec, kind, binary, spin, preload):
    """pack.launch_command's command on opts.ranks ranks, with the knobs of `config`."""
    cfg = CONFIGS[config]
    if cfg.program == "c":
        program, args = binary, bench_args(opts, config)
    else:
        program, args = sys.executable, python_args(opts, config, spin)
    cmd, env = launch_command(mpiexec, kind, program, args, preload if cfg.preload else None)
    at = cmd.index("-n") + 1
    cmd[at] = str(opts.ranks)
    knobs = dict(cfg.knobs)
    if knobs.get("COMMLIB_PROGRESS") == "thread" and opts.interval_us is not None:
        knobs["COMMLIB_PROGRESS_INTERVAL_US"] = str(opts.interval_us)
    pass_environment(cmd, at + 1, env, kind, knobs, opts.bind)
    return cmd, env, knobs


def parse_rows(text):
    """parse_output's meta and notes; rows as dicts with numbers converted."""
    meta, notes, _ = parse_output("\n".join(line for line in text.splitlines() if line.startswith("#")))
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    rows = []
    for rec in csv.DictReader(lines):
        if None in rec.values():            # a line cut short by a crash
            continue
        try:
            row = {"op": rec["op"], "buffer": rec["buffer"], "bytes": int(rec["bytes"]), "iters": int(rec["iters"]),
                   "verified": rec["verified"] == "yes", "progress_completed": int(rec["progress_completed"]),
                   "engine_served": int(rec.get("engine_served") or -1)}
            for k in ("pure_us", "compute_us", "overall_us", "overlap_pct", "post_us", "wait_us"):
                row[k] = float(rec[k])
        except (KeyError, ValueError):
            continue
        row["step_speedup"] = ((row["pure_us"] + row["compute_us"]) / row["overall_us"]
                               if row["overall_us"] > 0 else None)
        rows.append(row)
    return meta, notes, rows


def run_config(opts, config, mpiexec, kind, binary, spin, preload):
    cmd, env, knobs = command_for(opts, config, mpiexec, kind, binary, spin, preload)
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=opts.timeout)
        out, err, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = f"timed out after {opts.timeout:.0f} s"
        rc = None
    meta, notes, rows = parse_rows(out)
    cfg = CONFIGS[config]
    return {"label": cfg.label, "title": cfg.title, "program": cfg.program,
            "preload": preload if cfg.preload else None, "knobs": knobs, "command": cmd, "returncode": rc,
            "wall_s": time.monotonic() - start, "meta": meta, "notes": notes, "stderr_tail": err[-4000:],
            "stdout_tail": out[-2000:], "rows": rows}


def merge(configs):
    """One row per (op, buffer, bytes), in the order the benchmark printed them; per
    configuration its figures and "vs_base" (the baseline's overall time / its own)."""
    merged, order = {}, []
    for name, res in configs.items():
        for r in res["rows"]:
            key = (r["op"], r["buffer"], r["bytes"])
            if key not in merged:
                merged[key] = {"op": key[0], "buffer": key[1], "bytes": key[2]}
                order.append(key)
            merged[key][name] = {k: r[k] for k in FIELDS}
    order.sort(key=lambda k: (OPS.index(k[0]) if k[0] in OPS else len(OPS), k[1] != "host", k[2]))
    rows = [merged[k] for k in order]
    for r in rows:
        for name in configs:
            x = r.get(name)
            if not x:
                continue
            base = next((b for b in CONFIGS[name].baseline if r.get(b)), None)
            x["baseline"] = base
            x["vs_base"] = (r[base]["overall_us"] / x["overall_us"] if base and x["overall_us"] > 0 else None)
        base = r.get("mpi") or r.get("commlib")
        t = r.get("thread")
        # overall time of the host MPI alone (commlib alone for device rows) / with the thread
        r["thread_speedup"] = (base["overall_us"] / t["overall_us"]
                               if base and t and t["overall_us"] > 0 else None)
    return rows


def lowest(rows, config, key):
    values = [r[config][key] for r in rows if r.get(config) and r[config][key] is not None]
    return min(values) if values else None


def summarize(rows, config_names):
    groups = {}
    for r in rows:
        if r["bytes"] >= GOAL_MIN_BYTES:
            groups.setdefault((r["op"], r["buffer"]), []).append(r)
    per_group = []
    for (op, buf), rs in groups.items():
        entry = {"op": op, "buffer": buf, "min_overlap_ge_1mib": {}, "max_overlap_ge_1mib": {},
                 "min_step_speedup_ge_1mib": {}}
        for c in config_names:
            values = [r[c]["overlap_pct"] for r in rs if r.get(c)]
            entry["min_overlap_ge_1mib"][c] = min(values) if values else None
            entry["max_overlap_ge_1mib"][c] = max(values) if values else None
            entry["min_step_speedup_ge_1mib"][c] = lowest(rs, c, "step_speedup")
        per_group.append(entry)
    thread_mins = [g["min_overlap_ge_1mib"].get("thread") for g in per_group]
    goal = None
    if "thread" in config_names and thread_mins and all(v is not None for v in thread_mins):
        goal = min(thread_mins) >= GOAL_OVERLAP
    # issue 9: the engine's all-reduce, host, 1..64 MiB
    in_range = [r for r in rows if r["op"] == "iallreduce" and r["buffer"] == "host"
                and GOAL_MIN_BYTES <= r["bytes"] <= GOAL_MAX_BYTES]
    engine_goals = {}
    for c in config_names:
        if c not in ENGINE_CONFIGS:
            continue
        o, s = lowest(in_range, c, "overlap_pct"), lowest(in_range, c, "step_speedup")
        engine_goals[c] = {"min_overlap": o, "min_step_speedup": s,
                           "met": None if o is None or s is None else (o >= GOAL_OVERLAP and s >= GOAL_STEP)}
    unverified = [f"{r['op']} {r['buffer']} {human_bytes(r['bytes'])} ({c})"
                  for r in rows for c in config_names if r.get(c) and not r[c]["verified"]]
    # T's MPI_Iallreduce should have been the engine's, P's the host MPI's
    not_served = [f"{human_bytes(r['bytes'])} {r['buffer']}" for r in rows if r["op"] == "iallreduce"
                  and r.get("thread") and r["thread"]["engine_served"] == 0]
    served_by_p = [f"{human_bytes(r['bytes'])} {r['buffer']}" for r in rows if r["op"] == "iallreduce"
                   and r.get("thread-mpi") and r["thread-mpi"]["engine_served"] > 0]
    return {"groups": per_group, "goal_met": goal, "engine_goals": engine_goals, "unverified": unverified,
            "engine_not_serving_T": not_served, "engine_serving_P": served_by_p}


def pct(v):
    return "n/a" if v is None else f"{v:.0f}%"


def times(v):
    return "n/a" if v is None else f"{v:.2f}x"


def format_table(rows, config_names):
    head = ["op", "buffer", "size", "cfg", "pure us", "compute us", "overall us", "overlap", "step x", "vs base"]
    body = []
    for r in rows:
        first = True
        for c in config_names:
            x = r.get(c)
            if not x:
                continue
            cells = [r["op"], r["buffer"], human_bytes(r["bytes"])] if first else ["", "", ""]
            first = False
            mark = "" if x["verified"] else " WRONG"
            base = CONFIGS[x["baseline"]].label if x.get("baseline") else ""
            cells += [CONFIGS[c].label, f"{x['pure_us']:.1f}", f"{x['compute_us']:.1f}", f"{x['overall_us']:.1f}",
                      f"{x['overlap_pct']:.0f}%{mark}", times(x["step_speedup"]),
                      f"{x['vs_base']:.2f}x {base}" if x.get("vs_base") and base != CONFIGS[c].label else "-"]
            body.append(cells)
    widths = [max(len(head[i]), *(len(b[i]) for b in body)) if body else len(head[i]) for i in range(len(head))]

    def fmt(cells):
        return " | ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(head), "-+-".join("-" * w for w in widths)] + [fmt(b) for b in body])


def format_summary(summary, config_names):
    lines = []
    for g in summary["groups"]:
        parts = [f"{CONFIGS[c].label} {pct(g['min_overlap_ge_1mib'][c])} / {times(g['min_step_speedup_ge_1mib'][c])}"
                 for c in config_names if g["min_overlap_ge_1mib"][c] is not None]
        lines.append(f"{g['op']} {g['buffer']}, >= 1 MiB: lowest overlap / step speed-up: " + ", ".join(parts))
    for c, g in summary["engine_goals"].items():
        status = "n/a" if g["met"] is None else "MET" if g["met"] else "MISSED"
        lowest_seen = ("" if g["met"] is None else
                       f" (lowest: {pct(g['min_overlap'])}, {times(g['min_step_speedup'])})")
        lines.append(f"goal {status:6}  {CONFIGS[c].label}: overlap >= {GOAL_OVERLAP:g}% and step >= {GOAL_STEP:g}x "
                     f"for the all-reduce of 1 MiB to 64 MiB, host{lowest_seen}")
    if "thread" in config_names:
        met = summary["goal_met"]
        status = "n/a" if met is None else "MET" if met else "MISSED"
        mpi = [g["max_overlap_ge_1mib"].get("mpi") for g in summary["groups"]]
        mpi = [v for v in mpi if v is not None]
        lines.append(f"goal {status:6}  T: overlap >= {GOAL_OVERLAP:g}% for messages >= 1 MiB with the progress thread"
                     + (f" (host MPI alone: at most {max(mpi):.0f}%)" if mpi else ""))
    if summary["engine_not_serving_T"]:
        lines.append("note (T): the engine served none of these MPI_Iallreduce calls (engine.iallreduce did not "
                     "move): " + ", ".join(summary["engine_not_serving_T"]))
    if summary["engine_serving_P"]:
        lines.append("note (P): the engine served MPI_Iallreduce calls despite COMMLIB_ENGINE_IALLREDUCE=0: "
                     + ", ".join(summary["engine_serving_P"]))
    if summary["unverified"]:
        lines.append("WRONG results: " + ", ".join(summary["unverified"]))
    return "\n".join(lines)


def write_csv(path, rows, config_names):
    fields = ["op", "buffer", "bytes", "config", "label", *FIELDS, "baseline", "vs_base"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            for c in config_names:
                x = r.get(c)
                if x:
                    w.writerow({"op": r["op"], "buffer": r["buffer"], "bytes": r["bytes"], "config": c,
                                "label": CONFIGS[c].label,
                                **{k: ("yes" if x[k] else "no") if k == "verified" else x[k] for k in FIELDS},
                                "baseline": x.get("baseline") or "", "vs_base": x.get("vs_base")})


def legend(config_names):
    lines = [f"  {CONFIGS[c].label} = {CONFIGS[c].title}" for c in config_names]
    return ("configurations:\n" + "\n".join(lines) + "\n"
            "per row: pure = post + wait; compute calibrated to pure, timed alone; overall = post, compute, wait; "
            "overlap = 1 - (overall - compute) / pure; step x = (pure + compute) / overall (the step with overlap vs "
            "without; 2x at most); vs base = the baseline's overall time / this one's (A, or C without A, for the C "
            "rows; M for the Python rows); every time the largest over the ranks")


def main(argv=None):
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    if opts.keep:
        work_dir, cleanup = cache_dir(), None
    else:
        work_dir = cleanup = tempfile.mkdtemp(prefix="commlib-bench-overlap-")
    try:
        preload = paths.preload_library() if any(CONFIGS[c].preload for c in opts.config_list) else None
        binary = spin = None
        if any(CONFIGS[c].program == "c" for c in opts.config_list):
            binary = build(find_source(SOURCE_NAME), work_dir, reuse=opts.keep)
        if opts.py_compute == "spin" and any(CONFIGS[c].program == "py" for c in opts.config_list):
            spin = build(find_source(SPIN_SOURCE), work_dir, reuse=opts.keep, flags=("-shared", "-fPIC"))
        mpiexec = paths.mpiexec()
        kind = launcher_kind(mpiexec)
        configs = {c: run_config(opts, c, mpiexec, kind, binary, spin, preload) for c in opts.config_list}
    except (BenchError, FileNotFoundError) as e:
        print(f"commlib bench overlap: {e}", file=sys.stderr)
        return 2
    finally:
        if cleanup:
            shutil.rmtree(cleanup, ignore_errors=True)

    rows = merge(configs)
    summary = summarize(rows, opts.config_list)
    cpus = os.cpu_count() or 1
    print(legend(opts.config_list))
    if cpus < 4 * opts.ranks:
        print(f"note: {cpus} CPUs for {opts.ranks} ranks: each rank needs a core to compute and one to progress "
              "(commlib's thread or the MPI's own polling); oversubscribed like this the figures are meaningless")
    for name, res in configs.items():
        for note in res["notes"]:
            if "not measured" in note or "skipped" in note:
                print(f"note ({res['label']}): {note}")
        if name in ("thread", "thread-mpi") and res["meta"].get("progress_thread") == "0":
            print(f"note ({res['label']}): no progress thread ran (see the warning below): "
                  f"{res['label']} is commlib without it")
        if res["program"] == "py" and res["meta"].get("transport"):
            print(f"note ({res['label']}): {res['meta'].get('method')} (transport {res['meta']['transport']}), "
                  f"compute {res['meta'].get('compute')}, MPI thread level {res['meta'].get('thread_level')}")
        if res["returncode"] != 0 or not res["rows"]:
            print(f"commlib bench overlap: {res['title']} exited with status {res['returncode']}\n"
                  f"{res['stderr_tail'] or res['stdout_tail']}", file=sys.stderr)
        elif res["stderr_tail"].strip():
            print(f"stderr ({res['label']}): {res['stderr_tail'].strip().splitlines()[-1]}")
    if rows:
        print(format_table(rows, opts.config_list))
        print(format_summary(summary, opts.config_list))
    first = next(iter(configs.values()))
    mpi = " ".join(first["meta"].get("mpi_library", "").split("MPICH Release")[0].split())
    device = next((r["meta"]["device"] for r in configs.values() if r["meta"].get("device", "none") != "none"), "none")
    print(f"host MPI: {mpi or 'unknown'}; {opts.ranks} ranks, launcher {kind}; device: {device}; "
          f"{sum(r['wall_s'] for r in configs.values()):.1f} s")

    result = {"benchmark": "overlap", "ranks": opts.ranks, "quick": opts.quick, "launcher": kind, "cpus": cpus,
              "py_compute": opts.py_compute, "configs": configs, "rows": rows, "summary": summary}
    if opts.csv:
        write_csv(opts.csv, rows, opts.config_list)
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
    if any(res["returncode"] != 0 or not res["rows"] for res in configs.values()):
        return 2
    return 1 if summary["unverified"] else 0


if __name__ == "__main__":
    sys.exit(main())
