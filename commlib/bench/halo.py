"""`commlib bench halo`: the halo exchange of examples/halo3d.c with its grid in GPU memory,
handed to MPI through commlib, against copying the whole grid to the host and back around a
host exchange (what a code does whose MPI is not CUDA-aware), in one run.

For each rank count (-n 2,4,8: a row each; default 2), local grid edge and mode (pack,
direct) the built example (`commlib example halo3d`) runs five ways:

  host          host memory, the host MPI alone: the exchange itself, for reference
  host+commlib  host memory, commlib preloaded
  stage-host    GPU memory, each exchange copies the whole grid to pinned host memory and
                back, the host MPI alone: the baseline
  device        GPU memory handed to MPI as it is (pack buffers too), commlib preloaded,
                COMMLIB_IPC=0 in the ranks' environment: the path through host memory
  device-ipc    the same with COMMLIB_IPC=1: GPU to GPU between the ranks of the node
                through CUDA IPC (issue 12; --no-ipc skips it)

Each run checks every halo cell itself; its time is the example's own: the mean time per
exchange over --iters exchanges, the slowest rank's.  Every configuration runs --repeat
times, in interleaved rounds, and the median counts.  The ratios are baseline / measured
(above 1: faster than the baseline): device and device-ipc against stage-host, host+commlib
against host, and device-ipc against host too (the same exchange in host memory, plain MPI).
The goals of issue 12 are judged on the device-ipc column (the device column with --no-ipc)
over the rows of local edge 32 to 192, every rank count and mode: its slowest row >= 2x
stage-host, and >= 1x host.
Without a CUDA device the GPU rows are skipped and the host rows still run.  The summary's
geomean and slowest shape are over every row, all rank counts together.  In the JSON,
"rank_counts" lists the rank counts; "ranks" is the count when there is one, else the list.
"""
import argparse
import csv
import ctypes
import json
import os
import re
import statistics
import subprocess
import sys
import time

from commlib import cli, paths
from commlib.bench.pack import BenchError, geomean, human_bytes

# name, --device/--stage-host flag (None: host memory), commlib preloaded, baseline,
# environment the ranks get on top of this process's.  The device run pins COMMLIB_IPC=0 so
# that an IPC knob exported in the shell does not turn it into a second device-ipc column.
VARIANTS = (
    ("host", None, False, None, {}),
    ("host+commlib", None, True, "host", {}),
    ("stage-host", "--stage-host", False, None, {}),
    ("device", "--device", True, "stage-host", {"COMMLIB_IPC": "0"}),
    ("device-ipc", "--device", True, "stage-host", {"COMMLIB_IPC": "1"}),
)
GPU_VARIANTS = ("stage-host", "device", "device-ipc")
IPC_VARIANT = "device-ipc"
# Issue 12: device halo through commlib >= 2x faster than whole-grid staging at every size
# from 32^3 to 192^3, and no slower than the same exchange in host memory under the plain MPI.
GOAL_EDGES = (32, 192)
GOAL_VS_STAGE_HOST, GOAL_VS_HOST = 2.0, 1.0
NO_GPU_EXIT = 77          # halo3d: --device / --stage-host without a usable GPU

SUMMARY = re.compile(
    r"^halo3d: ranks=(?P<ranks>\d+) dims=(?P<dims>\d+x\d+x\d+) local=(?P<local>\d+x\d+x\d+) "
    r"radius=(?P<radius>\d+) quantities=(?P<quantities>\d+) mode=(?P<mode>\w+) "
    r"memory=(?P<memory>[\w-]+) iters=(?P<iters>\d+) time/exchange=(?P<time>[0-9.]+) us "
    r"verified=(?P<verdict>.*)$", re.M)


def cuda_device_count():
    """(count, note): CUDA devices the driver in this process's library path reports."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0, "no CUDA driver (libcuda.so.1)"
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0, "the CUDA driver found no usable device"
    return count.value, f"{count.value} CUDA device(s)"


def parse_sizes(text):
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}")
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"edges must be >= 1: {text!r}")
    return sizes


def parse_ranks(text):
    try:
        ranks = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}")
    if not ranks or min(ranks) < 1:
        raise argparse.ArgumentTypeError(f"rank counts must be >= 1: {text!r}")
    return list(dict.fromkeys(ranks))


def parse_modes(text):
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("pack", "direct")]
    if not modes or bad:
        raise argparse.ArgumentTypeError(f"modes are pack and direct: {text!r}")
    return modes


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="commlib bench halo",
        description="halo3d with its grid in GPU memory through commlib, against whole-grid "
                    "copies to the host around a host exchange; host memory for reference.")
    p.add_argument("-n", "--ranks", type=parse_ranks, default=[2], metavar="N,N,...",
                   help="MPI ranks, a row for each count (default 2)")
    p.add_argument("--sizes", type=parse_sizes, metavar="N,N,...",
                   help="local cube edges (default 16,32,64,128; quick 8,16)")
    p.add_argument("--modes", type=parse_modes, default=["pack", "direct"], metavar="MODE,...",
                   help="pack and/or direct (default both)")
    p.add_argument("--radius", type=int, default=2, help="halo width (default 2)")
    p.add_argument("--quantities", type=int, default=3, help="values per cell (default 3)")
    p.add_argument("--iters", type=int, metavar="K", help="timed exchanges per run (default 20, quick 5)")
    p.add_argument("--warmup", type=int, metavar="W", help="untimed exchanges first (default 3, quick 1)")
    p.add_argument("--repeat", type=int, metavar="R",
                   help="runs per configuration, interleaved; the median counts (default 3, quick 1)")
    p.add_argument("--quick", action="store_true", help="small grids, few exchanges, one run each")
    p.add_argument("--host-only", action="store_true", help="skip the GPU rows even with a GPU")
    p.add_argument("--no-ipc", action="store_true",
                   help="skip the device-ipc variant (COMMLIB_IPC=1: GPU to GPU through CUDA IPC)")
    p.add_argument("--example", metavar="PATH",
                   help="the halo3d binary to run (default: the installed `commlib example halo3d`)")
    p.add_argument("--timeout", type=float, default=300, metavar="S",
                   help="give up on one run after S seconds (default 300)")
    p.add_argument("--csv", metavar="FILE", help="write one line per run as CSV")
    p.add_argument("--json", metavar="FILE", help="write the runs, the table and the summary as JSON")
    opts = p.parse_args(argv)
    defaults = {"sizes": ([8, 16], [16, 32, 64, 128]), "iters": (5, 20), "warmup": (1, 3),
                "repeat": (1, 3)}
    for name, (quick, full) in defaults.items():
        if getattr(opts, name) is None:
            setattr(opts, name, quick if opts.quick else full)
    if opts.iters < 1 or opts.warmup < 0 or opts.repeat < 1:
        p.error("--iters and --repeat must be >= 1, --warmup >= 0")
    return opts


def command(ranks, binary, args, preload, extra_env=None):
    """argv and environment of one run: `commlib run` or the plain mpiexec; extra_env on top
    of this process's environment (run_command forwards COMMLIB_* to the ranks)."""
    env = {**os.environ, **(extra_env or {})}
    if preload:
        return cli.run_command(["-n", str(ranks), "--", binary, *args], env=env)
    return [paths.mpiexec(), "-n", str(ranks), binary, *args], env


def run_one(opts, binary, ranks, edge, mode, variant):
    name, flag, preload, _, extra_env = variant
    args = ["--n", str(edge), "--radius", str(opts.radius), "--quantities", str(opts.quantities),
            "--iters", str(opts.iters), "--warmup", str(opts.warmup), "--mode", mode]
    if flag:
        args.append(flag)
    argv, env = command(ranks, binary, args, preload, extra_env)
    run = {"edge": edge, "mode": mode, "variant": name, "ranks": ranks,
           "command": " ".join(argv), "env": dict(extra_env), "time_us": None, "verified": False, "returncode": None,
           "error": None}
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=opts.timeout)
    except subprocess.TimeoutExpired:
        run["error"] = f"no result in {opts.timeout:g} s"
        return run
    run["returncode"] = proc.returncode
    m = SUMMARY.search(proc.stdout)
    if m:
        run["time_us"] = float(m["time"])
        run["verified"] = m["verdict"] == "OK"
        run["verdict"] = m["verdict"]
        run["dims"] = m["dims"]
    if not m or proc.returncode not in (0, 1):
        tail = (proc.stdout + proc.stderr).strip()[-2000:]
        if "bad argument: --" in proc.stderr:
            tail += f"\n({binary} predates this benchmark: reinstall commlib, `pip install .`)"
        run["error"] = f"exit status {proc.returncode}, no verified summary line\n{tail}"
    return run


def aggregate(runs, opts, variants):
    """One result per (ranks, edge, mode, variant): the median time of its runs, all verified."""
    results = []
    for ranks in opts.ranks:
        for edge in opts.sizes:
            for mode in opts.modes:
                for name, flag, preload, baseline, _ in variants:
                    key = (ranks, edge, mode, name)
                    mine = [r for r in runs if (r["ranks"], r["edge"], r["mode"], r["variant"]) == key]
                    times = [r["time_us"] for r in mine if r["time_us"] is not None]
                    verified = bool(mine) and all(r["verified"] for r in mine)
                    results.append({
                        "edge": edge, "mode": mode, "variant": name, "memory": flag[2:] if flag else "host",
                        "commlib": preload, "ranks": ranks, "iters": opts.iters,
                        "grid_bytes": opts.quantities * (edge + 2 * opts.radius) ** 3 * 8,
                        "runs": len(mine), "times_us": times, "verified": verified,
                        "time_us": statistics.median(times) if verified and times else None,
                        "failed": any(r["error"] for r in mine),
                        "baseline": baseline, "baseline_us": None, "speedup": None,
                        "host_us": None, "speedup_vs_host": None})
    by_key = {(r["ranks"], r["edge"], r["mode"], r["variant"]): r for r in results}
    for r in results:
        base = by_key.get((r["ranks"], r["edge"], r["mode"], r["baseline"]))
        if base and base["time_us"] and r["time_us"]:
            r["baseline_us"] = base["time_us"]
            r["speedup"] = base["time_us"] / r["time_us"]
        host = by_key.get((r["ranks"], r["edge"], r["mode"], "host"))
        if r["variant"] in ("device", IPC_VARIANT) and host and host["time_us"] and r["time_us"]:
            # the second figure of issue 12's goal: the same exchange in host memory, plain MPI
            r["host_us"] = host["time_us"]
            r["speedup_vs_host"] = host["time_us"] / r["time_us"]
    return results


def table_rows(results, opts):
    """One row per (ranks, edge, mode): each variant's time and the two ratios."""
    rows = []
    for ranks in opts.ranks:
        for edge in opts.sizes:
            for mode in opts.modes:
                mine = {r["variant"]: r for r in results
                        if (r["ranks"], r["edge"], r["mode"]) == (ranks, edge, mode)}
                row = {"edge": edge, "mode": mode, "grid_bytes": next(iter(mine.values()))["grid_bytes"],
                       "ranks": ranks}
                for name, _, _, baseline, _ in VARIANTS:
                    r = mine.get(name)
                    row[f"{name}_us"] = r["time_us"] if r else None
                    if baseline:
                        row[f"{name}_speedup"] = r["speedup"] if r else None
                    if name in ("device", IPC_VARIANT):
                        row[f"{name}_vs_host"] = r["speedup_vs_host"] if r else None
                rows.append(row)
    return rows


def row_name(r):
    return f"{r['ranks']} ranks {r['edge']}^3 {r['mode']}"


def format_table(rows, gpu, ipc=False):
    head = ["ranks", "local", "mode", "grid/rank", "host us", "host+commlib us"]
    if gpu:
        head += ["stage-host us", "device us", "device vs stage-host"]
    if gpu and ipc:
        head += ["device-ipc us", "ipc vs stage-host", "ipc vs host"]
    head.append("commlib vs host")

    def us(v):
        return "n/a" if v is None else f"{v:.1f}"

    def x(v):
        return "n/a" if v is None else f"{v:.2f}x"
    body = []
    for r in rows:
        cells = [str(r["ranks"]), f"{r['edge']}^3", r["mode"], human_bytes(r["grid_bytes"]), us(r["host_us"]),
                 us(r["host+commlib_us"])]
        if gpu:
            cells += [us(r["stage-host_us"]), us(r["device_us"]), x(r["device_speedup"])]
        if gpu and ipc:
            cells += [us(r["device-ipc_us"]), x(r["device-ipc_speedup"]), x(r["device-ipc_vs_host"])]
        cells.append(x(r["host+commlib_speedup"]))
        body.append(cells)
    widths = [max(len(head[i]), *(len(b[i]) for b in body)) if body else len(head[i])
              for i in range(len(head))]

    def fmt(cells):
        return " | ".join(c.ljust(w) if i in (1, 2) else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(head), "-+-".join("-" * w for w in widths)] + [fmt(b) for b in body])


def goals(rows, variant):
    """Issue 12's two goals on `variant`'s column, over the rows of local edge 32..192."""
    lo, hi = GOAL_EDGES
    mine = [r for r in rows if lo <= r["edge"] <= hi]

    def judge(key, want):
        have = [r for r in mine if r.get(key)]
        low = min(have, key=lambda r: r[key]) if have else None
        # a row without a figure (a failed run) cannot count as met
        met = None if not have else (low[key] >= want and len(have) == len(mine))
        return {"variant": variant, "want": want, "met": met, "n": len(have), "rows": len(mine),
                "sizes": sorted({r["edge"] for r in have}),
                "slowest": {"name": row_name(low), "speedup": low[key]} if low else None}
    return {
        "vs_stage_host": judge(f"{variant}_speedup", GOAL_VS_STAGE_HOST),
        "vs_host": judge(f"{variant}_vs_host", GOAL_VS_HOST),
    }


def summarize(rows, results, goal_variant="device-ipc"):
    def spread(key):
        have = [r for r in rows if r.get(key)]
        values = [r[key] for r in have]
        low = min(have, key=lambda r: r[key]) if have else None
        return {"geomean": geomean(values), "min": min(values) if values else None,
                "max": max(values) if values else None, "n": len(values),
                "slowest": {"name": row_name(low), "speedup": low[key]} if low else None}
    return {
        "device_vs_stage_host": spread("device_speedup"),
        "host_commlib_vs_host": spread("host+commlib_speedup"),
        "device_ipc_vs_stage_host": spread("device-ipc_speedup"),
        "device_ipc_vs_host": spread("device-ipc_vs_host"),
        "goals": goals(rows, goal_variant),
        "mismatched": [f"{r['edge']} {r['mode']} {r['variant']} ({r['ranks']} ranks)" for r in results
                       if r["times_us"] and not r["verified"] and not r["failed"]],
        "failed": [f"{r['edge']} {r['mode']} {r['variant']} ({r['ranks']} ranks)" for r in results if r["failed"]],
    }


def format_goal(what, g):
    lo, hi = GOAL_EDGES
    if g["met"] is None:
        return f"goal n/a     {what} (no {g['variant']} figure for a local edge in {lo}..{hi})"
    state = "MET" if g["met"] else "MISSED"
    missing = f", {g['rows'] - g['n']} of {g['rows']} rows without a figure" if g["n"] < g["rows"] else ""
    return (f"goal {state:6}  {what}: {g['variant']}, slowest {g['slowest']['name']} "
            f"{g['slowest']['speedup']:.2f}x over {g['n']} rows (edges {','.join(map(str, g['sizes']))}{missing})")


def format_summary(s, gpu, ipc=False):
    def line(what, v):
        if not v["n"]:
            return f"{what}: n/a"
        return (f"{what}: {v['geomean']:.2f}x geomean over {v['n']} shapes "
                f"({v['min']:.2f}x .. {v['max']:.2f}x), slowest {v['slowest']['name']} "
                f"{v['slowest']['speedup']:.2f}x")
    lines = []
    if gpu:
        lines.append(line("device through commlib vs whole-grid copies (stage-host)", s["device_vs_stage_host"]))
    if gpu and ipc:
        lines.append(line("device-ipc (COMMLIB_IPC=1) vs whole-grid copies (stage-host)", s["device_ipc_vs_stage_host"]))
        lines.append(line("device-ipc (COMMLIB_IPC=1) vs host memory, plain MPI", s["device_ipc_vs_host"]))
    lines.append(line("host memory, commlib vs the host MPI alone", s["host_commlib_vs_host"]))
    if gpu:
        lo, hi = GOAL_EDGES
        g = s["goals"]
        lines.append(format_goal(f"{GOAL_VS_STAGE_HOST:g}x faster than whole-grid staging at {lo}^3..{hi}^3",
                                 g["vs_stage_host"]))
        lines.append(format_goal(f"no slower than host memory under the plain MPI at {lo}^3..{hi}^3", g["vs_host"]))
    if s["mismatched"]:
        lines.append("halo cells WRONG in: " + ", ".join(s["mismatched"]))
    if s["failed"]:
        lines.append("runs that failed: " + ", ".join(s["failed"]))
    return "\n".join(lines)


def write_csv(path, results):
    fields = ["edge", "mode", "variant", "memory", "commlib", "ranks", "iters", "grid_bytes",
              "time_us", "baseline", "baseline_us", "speedup", "verified", "runs", "times_us",
              "host_us", "speedup_vs_host"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in results:
            w.writerow({**r, "times_us": " ".join(f"{t:g}" for t in r["times_us"])})


def main(argv=None):
    """Exit status 0 when every run verified, 1 when a halo was wrong, 2 when a run failed."""
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        binary = os.path.abspath(opts.example) if opts.example else paths.example_binary("halo3d")
        if not os.access(binary, os.X_OK):
            raise BenchError(f"{binary} is not an executable")
        paths.preload_library()
        paths.mpiexec()
    except (BenchError, FileNotFoundError) as e:
        print(f"commlib bench halo: {e}", file=sys.stderr)
        return 2

    count, gpu_note = cuda_device_count()
    gpu = count > 0 and not opts.host_only
    if not gpu:
        why = "--host-only" if opts.host_only else gpu_note
        print(f"note: GPU rows (stage-host, device, device-ipc) skipped ({why}); host rows only")
    ipc = gpu and not opts.no_ipc
    variants = [v for v in VARIANTS if (gpu or v[0] not in GPU_VARIANTS) and (ipc or v[0] != IPC_VARIANT)]
    if gpu and max(opts.ranks) > count:
        # Measured on an H200 at 2 ranks: device exchanges took ~10x longer without MPS.
        print(f"note: {max(opts.ranks)} ranks share {count} GPU(s): without MPS (nvidia-cuda-mps-control -d) "
              "the GPU time-slices between the processes and every synchronisation waits for it")

    start = time.monotonic()
    runs = []
    for _ in range(opts.repeat):      # rounds: drift in the machine hits every variant alike
        for ranks in opts.ranks:
            for edge in opts.sizes:
                for mode in opts.modes:
                    for variant in variants:
                        run = run_one(opts, binary, ranks, edge, mode, variant)
                        if run["returncode"] == NO_GPU_EXIT:
                            run["error"] = "no GPU (exit status 77)"
                        runs.append(run)
                        if run["error"]:
                            print(f"commlib bench halo: {ranks} ranks {edge} {mode} {variant[0]}: "
                                  f"{run['error']}", file=sys.stderr)
    wall = time.monotonic() - start
    results = aggregate(runs, opts, variants)
    rows = table_rows(results, opts)
    summary = summarize(rows, results, IPC_VARIANT if ipc else "device")

    print(format_table(rows, gpu, ipc))
    print(format_summary(summary, gpu, ipc))
    print(f"{','.join(map(str, opts.ranks))} ranks, radius {opts.radius}, {opts.quantities} quantities; time per exchange: "
          f"mean of {opts.iters} after {opts.warmup} warm-up, slowest rank, median of {opts.repeat} "
          f"run(s); {gpu_note}; {wall:.1f} s")

    if opts.csv:
        write_csv(opts.csv, results)
    if opts.json:
        result = {"benchmark": "halo", "example": binary,
                  "ranks": opts.ranks[0] if len(opts.ranks) == 1 else opts.ranks,
                  "rank_counts": opts.ranks, "radius": opts.radius,
                  "quantities": opts.quantities, "iters": opts.iters, "warmup": opts.warmup,
                  "repeat": opts.repeat, "sizes": opts.sizes, "modes": opts.modes, "gpu": gpu,
                  "gpu_note": gpu_note, "variants": [v[0] for v in variants], "ipc": ipc,
                  "goal_edges": list(GOAL_EDGES), "wall_s": wall,
                  "results": results, "rows": rows, "summary": summary, "runs": runs}
        with open(opts.json, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
    if summary["failed"]:
        return 2
    return 1 if summary["mismatched"] else 0


if __name__ == "__main__":
    sys.exit(main())
