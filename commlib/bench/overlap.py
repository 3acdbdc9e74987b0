"""`commlib bench overlap`: how much communication hides behind computation, OSU style.

Builds native/bench/bench_overlap.c and runs it three times on the same ranks:
  A  the host MPI alone (no preload),
  C  commlib preloaded, no progress thread (COMMLIB_PROGRESS=none),
  T  commlib preloaded with its progress thread (COMMLIB_PROGRESS=thread),
and puts them side by side per operation (MPI_Iallreduce of doubles, MPI_Isend/MPI_Irecv
pairs), buffer (host; device when every rank has a CUDA device) and message size.  Per
row: pure comm (post + wait), compute calibrated to the pure comm, overall (post,
compute, wait) and overlap % = max(0, 100 * (1 - (overall - compute) / pure comm)).  The
host MPI alone is not given device buffers unless --mpi-cuda-aware says it can read them.

The goal (issue: background progress): overlap >= 90 % for messages >= 1 MiB with the
progress thread, where the host MPI alone stays far lower.  No figure is asserted; the
exit status is 1 only when a result was wrong (the "verified" check), 2 on errors.
"""
import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from commlib import paths
from commlib.bench.pack import (BenchError, build, cache_dir, find_source, human_bytes, launch_command,
                                launcher_kind, parse_output)

SOURCE_NAME = "bench_overlap.c"
GOAL_OVERLAP = 90.0          # % with the progress thread ...
GOAL_MIN_BYTES = 1 << 20     # ... for messages of at least this size
CONFIGS = {                  # name: (label, preload commlib, COMMLIB_PROGRESS)
    "mpi": ("A", "host MPI alone", False, None),
    "commlib": ("C", "commlib, no progress thread", True, "none"),
    "thread": ("T", "commlib + progress thread", True, "thread"),
}
FIELDS = ("iters", "pure_us", "compute_us", "overall_us", "overlap_pct", "post_us", "wait_us", "verified",
          "progress_completed")


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="commlib bench overlap",
        description="Communication/computation overlap (OSU method) of MPI_Iallreduce and Isend/Irecv, host and "
                    "device buffers, for the host MPI alone, commlib, and commlib with its progress thread.")
    p.add_argument("--ranks", type=int, default=2, metavar="N", help="ranks (default 2)")
    p.add_argument("--quick", action="store_true", help="1 KiB, 64 KiB and 1 MiB, ~20 ms per figure")
    p.add_argument("--json", metavar="FILE", help="write the results and summary as JSON")
    p.add_argument("--csv", metavar="FILE", help="write one line per (row, configuration) as CSV")
    p.add_argument("--sizes", metavar="LIST",
                   help="message sizes, e.g. 1K,1M,64M (default 1 KiB to 64 MiB by factors of 4)")
    p.add_argument("--ops", default="iallreduce,isend_irecv", metavar="LIST",
                   help="iallreduce, isend_irecv (default both)")
    p.add_argument("--configs", default="mpi,commlib,thread", metavar="LIST",
                   help="which of mpi (host MPI alone), commlib, thread to run (default all three)")
    p.add_argument("--host-only", action="store_true", help="host buffers only, even with a GPU")
    p.add_argument("--mpi-cuda-aware", action="store_true",
                   help="give device buffers to the host MPI alone too (only for a CUDA-aware MPI)")
    p.add_argument("--target-ms", type=float, metavar="MS",
                   help="time spent per figure (default 200, quick 20)")
    p.add_argument("--interval-us", type=int, metavar="US",
                   help="COMMLIB_PROGRESS_INTERVAL_US for the progress-thread runs")
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
    if opts.ranks < 1:
        p.error("--ranks must be at least 1")
    return opts


def bench_args(opts, config):
    args = []
    if opts.quick:
        args.append("-q")
    if opts.target_ms is not None:
        args += ["-t", str(opts.target_ms)]
    if opts.sizes:
        args += ["-s", opts.sizes]
    if opts.ops:
        args += ["-o", opts.ops]
    if opts.host_only or (config == "mpi" and not opts.mpi_cuda_aware):
        args.append("-H")
    return args


def command_for(opts, config, mpiexec, kind, binary, preload):
    """pack.launch_command's command on opts.ranks ranks, with the knobs of `config`."""
    _, _, uses_commlib, progress = CONFIGS[config]
    cmd, env = launch_command(mpiexec, kind, binary, bench_args(opts, config), preload if uses_commlib else None)
    at = cmd.index("-n") + 1
    cmd[at] = str(opts.ranks)
    knobs = {}
    if uses_commlib:
        knobs["COMMLIB_PROGRESS"] = progress
        if progress == "thread" and opts.interval_us is not None:
            knobs["COMMLIB_PROGRESS_INTERVAL_US"] = str(opts.interval_us)
    extra = []
    for name, value in knobs.items():
        env[name] = value
        if kind == "hydra":
            extra += ["-genv", name, value]
        elif kind == "openmpi":
            extra += ["-x", f"{name}={value}"]
    if kind == "openmpi" and opts.bind:
        extra += ["--bind-to", opts.bind]
    cmd[at + 1:at + 1] = extra
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
                   "verified": rec["verified"] == "yes", "progress_completed": int(rec["progress_completed"])}
            for k in ("pure_us", "compute_us", "overall_us", "overlap_pct", "post_us", "wait_us"):
                row[k] = float(rec[k])
        except (KeyError, ValueError):
            continue
        rows.append(row)
    return meta, notes, rows


def run_config(opts, config, mpiexec, kind, binary, preload):
    cmd, env, knobs = command_for(opts, config, mpiexec, kind, binary, preload)
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=opts.timeout)
        out, err, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = f"timed out after {opts.timeout:.0f} s"
        rc = None
    meta, notes, rows = parse_rows(out)
    label, title, uses_commlib, _ = CONFIGS[config]
    return {"label": label, "title": title, "preload": preload if uses_commlib else None, "knobs": knobs,
            "command": cmd, "returncode": rc, "wall_s": time.monotonic() - start, "meta": meta, "notes": notes,
            "stderr_tail": err[-4000:], "stdout_tail": out[-2000:], "rows": rows}


def merge(configs):
    """One row per (op, buffer, bytes), in the order the benchmark printed them."""
    merged, order = {}, []
    for name, res in configs.items():
        for r in res["rows"]:
            key = (r["op"], r["buffer"], r["bytes"])
            if key not in merged:
                merged[key] = {"op": key[0], "buffer": key[1], "bytes": key[2]}
                order.append(key)
            merged[key][name] = {k: r[k] for k in FIELDS}
    rows = [merged[k] for k in order]
    for r in rows:
        base = r.get("mpi") or r.get("commlib")
        t = r.get("thread")
        # overall time of the host MPI alone (commlib alone for device rows) / with the thread
        r["thread_speedup"] = (base["overall_us"] / t["overall_us"]
                               if base and t and t["overall_us"] > 0 else None)
    return rows


def summarize(rows, config_names):
    groups = {}
    for r in rows:
        if r["bytes"] >= GOAL_MIN_BYTES:
            groups.setdefault((r["op"], r["buffer"]), []).append(r)
    per_group = []
    for (op, buf), rs in groups.items():
        entry = {"op": op, "buffer": buf, "min_overlap_ge_1mib": {}, "max_overlap_ge_1mib": {}}
        for c in config_names:
            values = [r[c]["overlap_pct"] for r in rs if r.get(c)]
            entry["min_overlap_ge_1mib"][c] = min(values) if values else None
            entry["max_overlap_ge_1mib"][c] = max(values) if values else None
        per_group.append(entry)
    thread_mins = [g["min_overlap_ge_1mib"].get("thread") for g in per_group]
    goal = None
    if "thread" in config_names and thread_mins and all(v is not None for v in thread_mins):
        goal = min(thread_mins) >= GOAL_OVERLAP
    unverified = [f"{r['op']} {r['buffer']} {human_bytes(r['bytes'])} ({c})"
                  for r in rows for c in config_names if r.get(c) and not r[c]["verified"]]
    return {"groups": per_group, "goal_met": goal, "unverified": unverified}


def pct(v):
    return "n/a" if v is None else f"{v:.0f}%"


def format_table(rows, config_names):
    head = ["op", "buffer", "size"]
    for c in config_names:
        lab = CONFIGS[c][0]
        head += [f"{lab} pure us", f"{lab} overall us", f"{lab} overlap"]
    head.append("T vs A")
    body = []
    for r in rows:
        cells = [r["op"], r["buffer"], human_bytes(r["bytes"])]
        for c in config_names:
            x = r.get(c)
            if x:
                mark = "" if x["verified"] else " WRONG"
                cells += [f"{x['pure_us']:.1f}", f"{x['overall_us']:.1f}", f"{x['overlap_pct']:.0f}%{mark}"]
            else:
                cells += ["n/a", "n/a", "n/a"]
        cells.append(f"{r['thread_speedup']:.2f}x" if r.get("thread_speedup") else "n/a")
        body.append(cells)
    widths = [max(len(head[i]), *(len(b[i]) for b in body)) if body else len(head[i]) for i in range(len(head))]

    def fmt(cells):
        return " | ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(head), "-+-".join("-" * w for w in widths)] + [fmt(b) for b in body])


def format_summary(summary, config_names):
    lines = []
    for g in summary["groups"]:
        parts = [f"{CONFIGS[c][0]} {pct(g['min_overlap_ge_1mib'][c])}" for c in config_names]
        lines.append(f"{g['op']} {g['buffer']}, >= 1 MiB: lowest overlap " + ", ".join(parts))
    if "thread" in config_names:
        met = summary["goal_met"]
        status = "n/a" if met is None else "MET" if met else "MISSED"
        mpi = [g["max_overlap_ge_1mib"].get("mpi") for g in summary["groups"]]
        mpi = [v for v in mpi if v is not None]
        lines.append(f"goal {status:6}  overlap >= {GOAL_OVERLAP:g}% for messages >= 1 MiB with the progress thread"
                     + (f" (host MPI alone: at most {max(mpi):.0f}%)" if mpi else ""))
    if summary["unverified"]:
        lines.append("WRONG results: " + ", ".join(summary["unverified"]))
    return "\n".join(lines)


def write_csv(path, rows, config_names):
    fields = ["op", "buffer", "bytes", "config", *FIELDS]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            for c in config_names:
                if r.get(c):
                    w.writerow({"op": r["op"], "buffer": r["buffer"], "bytes": r["bytes"], "config": c,
                                **{k: ("yes" if r[c][k] else "no") if k == "verified" else r[c][k] for k in FIELDS}})


def main(argv=None):
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    if opts.keep:
        work_dir, cleanup = cache_dir(), None
    else:
        work_dir = cleanup = tempfile.mkdtemp(prefix="commlib-bench-overlap-")
    try:
        preload = paths.preload_library() if any(CONFIGS[c][2] for c in opts.config_list) else None
        binary = build(find_source(SOURCE_NAME), work_dir, reuse=opts.keep)
        mpiexec = paths.mpiexec()
        kind = launcher_kind(mpiexec)
        configs = {c: run_config(opts, c, mpiexec, kind, binary, preload) for c in opts.config_list}
    except (BenchError, FileNotFoundError) as e:
        print(f"commlib bench overlap: {e}", file=sys.stderr)
        return 2
    finally:
        if cleanup:
            shutil.rmtree(cleanup, ignore_errors=True)

    rows = merge(configs)
    summary = summarize(rows, opts.config_list)
    cpus = os.cpu_count() or 1
    print("A = host MPI alone, C = commlib without progress thread, T = commlib + progress thread "
          "(COMMLIB_PROGRESS=thread); per operation: time of post + wait (pure), of post + compute + wait "
          "(overall, compute calibrated to pure), overlap %; T vs A: A's overall time / T's (C's for device rows)")
    if cpus < 4 * opts.ranks:
        print(f"note: {cpus} CPUs for {opts.ranks} ranks: each rank needs a core to compute and one to progress "
              "(commlib's thread or the MPI's own polling); oversubscribed like this the figures are meaningless")
    for name, res in configs.items():
        for note in res["notes"]:
            if "not measured" in note or "skipped" in note:
                print(f"note ({res['label']}): {note}")
        if name == "thread" and res["meta"].get("progress_thread") == "0":
            print("note (T): no progress thread ran (see the warning below): T is commlib without it")
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
              "configs": configs, "rows": rows, "summary": summary}
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
