"""`commlib bench p2p`: point-to-point latency and bandwidth of device buffers between two
ranks of one node through commlib, osu_latency / osu_bw style, beside the host-memory MPI
(the latency baseline) and device-to-device memcpy (the bandwidth baseline), in one run.

Builds native/bench/bench_p2p.c with the MPI compiler wrapper (commlib.bench.pack.build)
and runs it three times on two ranks:

  host        host memory, the plain host MPI (no preload): the latency baseline
  device      buffers from cuMemAlloc, libcommlib.so preloaded (`commlib run`), COMMLIB_IPC=0
              in the ranks' environment; rank 0 also times cuMemcpyAsync +
              cuStreamSynchronize of the same bytes device to device alone: the bandwidth
              baseline; and, for the strided layout, the driver's own 2D copy of it
              (cuMemcpy2DAsync, "memcpy2d"): what CUDA's own strided copy of every other
              double achieves without any MPI (column best/2d: the better of device and
              device-ipc against it)
  device-ipc  the same with COMMLIB_IPC=1 (GPU to GPU through CUDA IPC, issue 12), without
              the memcpy rows; --no-ipc skips it
  device-pipe with --pipeline: the device run with COMMLIB_PIPELINE=1 (messages of 1 MiB and
              more cut in chunks whose copies overlap the host MPI's transfer, issue 12 item
              3); its bandwidth beside the device run's (pipe/device: the pipelining's gain
              over staging each message whole, summarised over the sizes it cuts)

Two layouts: contiguous (MPI_BYTE) and strided (MPI_Type_vector of doubles, block 1 stride
2: every other double, as the real parts of an interleaved complex array); the size is the
payload.  Latency: ping-pong of MPI_Send / MPI_Recv, half the round trip, the median of the
timed round trips.  Bandwidth: a window of W MPI_Isend / MPI_Irecv (a buffer each), both
sides MPI_Waitall, then a 1-byte answer in host memory; W * size / the median window time.
Every measurement is verified by the receivers (a pattern of size, iteration and message;
the strided gaps must stay untouched); a mismatch fails the run.  The ratios: device
latency / host latency (lower is better) and device bandwidth / memcpy bandwidth (higher is
better), and the same two for device-ipc.  Issue 12's two goals are judged on the better of
device and device-ipc per layout, and say which.  Without a CUDA device the host rows still
run and the device rows are skipped.
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

from commlib import cli, paths
from commlib.bench.halo import cuda_device_count
from commlib.bench.pack import BenchError, build, cache_dir, find_source, geomean, human_bytes, split_output

SOURCE_NAME = "bench_p2p.c"
LAYOUTS = ("contiguous", "strided")
FULL_SIZES = [8 << i for i in range(24)]             # 8 B .. 64 MiB
QUICK_SIZES = [8, 1 << 10, 64 << 10, 4 << 20]
NO_GPU_EXIT = 77
# The goals of issue 12, judged on every layout measured in this run.
GOAL_BANDWIDTH_BYTES, GOAL_BANDWIDTH_RATIO = 4 << 20, 0.5
GOAL_LATENCY_BYTES, GOAL_LATENCY_RATIO = 8, 2.0
GOAL_BANDWIDTH = f"device bandwidth at 4 MiB >= {GOAL_BANDWIDTH_RATIO:.0%} of device-to-device memcpy"
GOAL_LATENCY = f"device latency at 8 B <= {GOAL_LATENCY_RATIO:g}x the host-memory MPI's"
# what each run is called, and the COMMLIB_IPC its ranks get (device pins 0 so that a knob
# exported in the shell does not make it a second device-ipc run)
DEVICE_RUNS = {"device": {"COMMLIB_IPC": "0"}, "device-ipc": {"COMMLIB_IPC": "1"},
               "device-pipe": {"COMMLIB_IPC": "0", "COMMLIB_PIPELINE": "1"}}
PIPELINE_MIN_BYTES = 1 << 20  # native/transfer/pipeline.h: smaller messages are never cut

INT_FIELDS = ("bytes", "span_bytes", "iters", "window")
FLOAT_FIELDS = ("time_ns", "min_ns")


def parse_size(text):
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(text[:-1] if scale > 1 else text) * scale


def parse_sizes(text):
    try:
        sizes = [parse_size(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of sizes (8,1K,4M): {text!r}")
    if not sizes or any(s < 8 or s % 8 or s >= 1 << 31 for s in sizes):
        raise argparse.ArgumentTypeError(f"sizes are multiples of 8 bytes from 8 below 2 GiB: {text!r}")
    return sizes


def parse_layouts(text):
    layouts = [m.strip() for m in text.split(",") if m.strip()]
    if not layouts or any(m not in LAYOUTS for m in layouts):
        raise argparse.ArgumentTypeError(f"layouts are contiguous and strided: {text!r}")
    return [m for m in LAYOUTS if m in layouts]


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="commlib bench p2p",
        description="Point-to-point latency and bandwidth of device buffers between two ranks "
                    "through commlib, beside the host-memory MPI and device-to-device memcpy.")
    p.add_argument("--sizes", type=parse_sizes, metavar="S,S,...",
                   help="message sizes, multiples of 8 (K, M suffixes; default 8 B .. 64 MiB in "
                        "powers of 2; quick 8,1K,64K,4M)")
    p.add_argument("--layouts", type=parse_layouts, default=list(LAYOUTS), metavar="L,...",
                   help="contiguous and/or strided (default both)")
    p.add_argument("--window", type=int, default=64, metavar="W",
                   help="messages in flight per bandwidth window (default 64)")
    p.add_argument("--window-mib", type=int, default=256, metavar="MIB",
                   help="a window's buffers span at most this much per side: fewer messages for "
                        "large sizes (default 256)")
    p.add_argument("--target-ms", type=float, metavar="MS",
                   help="time per measurement (default 100, quick 20)")
    p.add_argument("--min-iters", type=int, metavar="N",
                   help="at least this many timed round trips / windows (default 10, quick 5)")
    p.add_argument("--quick", action="store_true", help="four sizes, short measurements")
    p.add_argument("--host-only", action="store_true", help="skip the device rows even with a GPU")
    p.add_argument("--no-ipc", action="store_true",
                   help="skip the device-ipc run (COMMLIB_IPC=1: GPU to GPU through CUDA IPC)")
    p.add_argument("--pipeline", action="store_true",
                   help="also run device-pipe (COMMLIB_PIPELINE=1, COMMLIB_IPC=0: large messages in chunks)")
    p.add_argument("--spread-gpus", action="store_true",
                   help="rank r uses GPU r %% count (default: both ranks on GPU 0)")
    p.add_argument("--keep", action="store_true",
                   help="build into ~/.cache/commlib/bench and reuse the binary")
    p.add_argument("--timeout", type=float, default=1200, metavar="S",
                   help="give up on one run after S seconds (default 1200)")
    p.add_argument("--csv", metavar="FILE", help="write one line per measurement as CSV")
    p.add_argument("--json", metavar="FILE", help="write the runs, the rows and the summary as JSON")
    opts = p.parse_args(argv)
    defaults = {"sizes": (QUICK_SIZES, FULL_SIZES), "target_ms": (20.0, 100.0), "min_iters": (5, 10)}
    for name, (quick, full) in defaults.items():
        if getattr(opts, name) is None:
            setattr(opts, name, quick if opts.quick else full)
    if opts.window < 1 or opts.window_mib < 1 or opts.min_iters < 1 or opts.target_ms <= 0:
        p.error("--window, --window-mib and --min-iters must be >= 1, --target-ms > 0")
    return opts


def program_args(opts, memory):
    """bench_p2p's arguments for the run `memory` (host, device, device-ipc)."""
    args = ["-s", ",".join(str(s) for s in opts.sizes), "-l", ",".join(opts.layouts),
            "-t", f"{opts.target_ms:g}", "-n", str(opts.min_iters), "-w", str(opts.window),
            "-c", str(opts.window_mib)]
    if memory != "host":
        args.insert(0, "-i" if memory == "device-ipc" else "-d")
        if opts.spread_gpus:
            args.insert(1, "-g")
    return args


def run_program(opts, binary, memory):
    """One launch on two ranks; returns its record (meta, notes, measurements, status)."""
    extra_env = DEVICE_RUNS.get(memory, {})
    if memory != "host":   # commlib preloaded into the ranks, as `commlib run` does
        argv, env = cli.run_command(["-n", "2", "--", binary, *program_args(opts, memory)],
                                    env={**os.environ, **extra_env})
    else:                  # the plain host MPI
        argv, env = [paths.mpiexec(), "-n", "2", binary, *program_args(opts, memory)], dict(os.environ)
    run = {"memory": memory, "command": " ".join(argv), "env": dict(extra_env), "returncode": None,
           "error": None, "meta": {}, "notes": [], "measurements": [], "stderr_tail": "", "wall_s": None}
    start = time.monotonic()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=opts.timeout)
    except subprocess.TimeoutExpired:
        run["error"] = f"no result in {opts.timeout:g} s"
        return run
    run["wall_s"] = time.monotonic() - start
    run["returncode"] = proc.returncode
    run["stderr_tail"] = proc.stderr[-4000:]
    meta, notes, records = split_output(proc.stdout)
    stats = meta.pop("commlib_stats", None)
    run["meta"], run["notes"] = meta, notes
    try:
        run["commlib_stats"] = json.loads(stats) if stats else None
    except ValueError:
        run["commlib_stats"] = None
    for r in records:
        for k in INT_FIELDS:
            r[k] = int(r[k])
        for k in FLOAT_FIELDS:
            r[k] = float(r[k])
        r["verified"] = r["verified"] == "ok"
        r["time_us"] = r["time_ns"] / 1e3
        r["min_us"] = r["min_ns"] / 1e3
        # bytes per ns = GB/s; a bandwidth time covers its window of messages
        r["gbps"] = r["window"] * r["bytes"] / r["time_ns"] if r["op"] == "bandwidth" and r["time_ns"] > 0 else None
    if memory == "device-pipe":  # the device run's program: its device rows renamed, memcpy measured once
        records = [dict(r, memory=memory) for r in records if r["memory"] == "device"]
    run["measurements"] = records
    if proc.returncode == NO_GPU_EXIT and memory != "host":
        run["error"] = "no GPU (exit status 77)"
    elif proc.returncode not in (0, 1) or not records:
        run["error"] = (f"exit status {proc.returncode}" + (", no measurements" if not records else "")
                        + "\n" + (proc.stdout[-2000:] + proc.stderr[-2000:]).strip())
    return run


def case_name(layout, size):
    return f"{layout} {human_bytes(size)}"


def make_rows(opts, runs):
    """One row per (layout, size): the host, device, device-ipc and memcpy figures and the
    ratios of device and device-ipc."""
    found = {}
    for run in runs:
        for m in run["measurements"]:
            # memcpy rows move the payload bytes contiguously: the baseline of both layouts
            layouts = opts.layouts if m["memory"] == "memcpy" else [m["layout"]]
            for layout in layouts:
                found[(m["memory"], layout, m["op"], m["bytes"])] = m
    rows = []
    for layout in opts.layouts:
        for size in opts.sizes:
            row = {"layout": layout, "bytes": size, "name": case_name(layout, size)}
            mine = []
            for memory in ("host", "device", "device-ipc", "device-pipe", "memcpy", "memcpy2d"):
                lat, bw = found.get((memory, layout, "latency", size)), found.get((memory, layout, "bandwidth", size))
                row[f"{memory}_latency_us"] = lat["time_us"] if lat else None
                row[f"{memory}_latency_min_us"] = lat["min_us"] if lat else None
                row[f"{memory}_bandwidth_gbps"] = bw["gbps"] if bw else None
                row[f"{memory}_window"] = bw["window"] if bw else None
                mine += [m for m in (lat, bw) if m]
            row["span_bytes"] = next((m["span_bytes"] for m in mine if m["memory"] not in ("memcpy", "memcpy2d")),
                                     None)
            host, device = row["host_latency_us"], row["device_latency_us"]
            row["latency_ratio"] = device / host if host and device else None
            copy, sent = row["memcpy_bandwidth_gbps"], row["device_bandwidth_gbps"]
            row["bandwidth_ratio"] = sent / copy if copy and sent else None
            ipc_lat, ipc_sent = row["device-ipc_latency_us"], row["device-ipc_bandwidth_gbps"]
            row["ipc_latency_ratio"] = ipc_lat / host if host and ipc_lat else None
            row["ipc_bandwidth_ratio"] = ipc_sent / copy if copy and ipc_sent else None
            # the better of device and device-ipc against the driver's strided copy (strided rows)
            copy2d, best = row["memcpy2d_bandwidth_gbps"], max(sent or 0, ipc_sent or 0)
            row["bandwidth_2d_ratio"] = best / copy2d if copy2d and best else None
            piped = row["device-pipe_bandwidth_gbps"]
            row["pipe_gain"] = piped / sent if sent and piped else None  # pipelined / staged whole
            row["verified"] = bool(mine) and all(m["verified"] for m in mine)
            row["measurements"] = len(mine)
            rows.append(row)
    return rows


def summarize(rows, runs):
    def spread(key, worst, min_bytes=0):
        have = [r for r in rows if r.get(key) and r["bytes"] >= min_bytes]
        if not have:
            return {"geomean": None, "n": 0, "slowest": None}
        w = worst(have, key=lambda r: r[key])
        return {"geomean": geomean([r[key] for r in have]), "n": len(have),
                "slowest": {"name": w["name"], "ratio": w[key]}}

    def goal(size, keys, best, met):
        """Per layout the better of device and device-ipc (`keys`: their ratio columns)."""
        values, source, each = {}, {}, {name: {} for name in keys}
        for r in rows:
            if r["bytes"] != size:
                continue
            have = {name: r[key] for name, key in keys.items() if r[key]}
            for name, v in have.items():
                each[name][r["layout"]] = v
            if have:
                source[r["layout"]] = best(have, key=have.get)
                values[r["layout"]] = have[source[r["layout"]]]
        return {"values": values, "from": source, **each,
                "met": all(met(v) for v in values.values()) if values else None}
    return {
        "latency_ratio": spread("latency_ratio", max),        # device / host: higher is slower
        "bandwidth_ratio": spread("bandwidth_ratio", min),    # device / memcpy: lower is slower
        "ipc_latency_ratio": spread("ipc_latency_ratio", max),
        "ipc_bandwidth_ratio": spread("ipc_bandwidth_ratio", min),
        "bandwidth_2d_ratio": spread("bandwidth_2d_ratio", min),
        "pipe_gain": spread("pipe_gain", min, min_bytes=PIPELINE_MIN_BYTES),
        "goals": {
            GOAL_BANDWIDTH: goal(GOAL_BANDWIDTH_BYTES,
                                 {"device": "bandwidth_ratio", "device-ipc": "ipc_bandwidth_ratio"}, max,
                                 lambda v: v >= GOAL_BANDWIDTH_RATIO),
            GOAL_LATENCY: goal(GOAL_LATENCY_BYTES, {"device": "latency_ratio", "device-ipc": "ipc_latency_ratio"},
                               min, lambda v: v <= GOAL_LATENCY_RATIO),
        },
        "mismatched": [f"{m['memory']} {m['op']} {case_name(m['layout'], m['bytes'])}" for run in runs
                       for m in run["measurements"] if not m["verified"]],
        "failed": [f"{run['memory']}: {run['error'].splitlines()[0]}" for run in runs
                   if run["error"] and run["returncode"] != NO_GPU_EXIT],
    }


def format_tables(rows, gpu, ipc=False, pipe=False):
    def us(v):
        return "n/a" if v is None else f"{v:.2f}"

    def gbps(v):
        return "n/a" if v is None else f"{v:.3f}"

    def x(v):
        return "n/a" if v is None else f"{v:.2f}x"

    def ok(r):
        return "ok" if r["verified"] else "MISMATCH"

    def window(r):
        w = r["device_window"] or r["device-ipc_window"] or r["host_window"]
        return "n/a" if w is None else str(w)
    # (head, cell, shown): "all" always, "gpu" with the device rows, "ipc" with device-ipc too
    latency_columns = [
        ("size", lambda r: human_bytes(r["bytes"]), "all"), ("layout", lambda r: r["layout"], "all"),
        ("host us", lambda r: us(r["host_latency_us"]), "all"),
        ("device us", lambda r: us(r["device_latency_us"]), "gpu"),
        ("device/host", lambda r: x(r["latency_ratio"]), "gpu"),
        ("ipc us", lambda r: us(r["device-ipc_latency_us"]), "ipc"),
        ("ipc/host", lambda r: x(r["ipc_latency_ratio"]), "ipc"),
        ("memcpy us", lambda r: us(r["memcpy_latency_us"]), "gpu"), ("verified", ok, "all")]
    bandwidth_columns = [
        ("size", lambda r: human_bytes(r["bytes"]), "all"), ("layout", lambda r: r["layout"], "all"),
        ("window", window, "all"), ("host GB/s", lambda r: gbps(r["host_bandwidth_gbps"]), "all"),
        ("device GB/s", lambda r: gbps(r["device_bandwidth_gbps"]), "gpu"),
        ("memcpy GB/s", lambda r: gbps(r["memcpy_bandwidth_gbps"]), "gpu"),
        ("device/memcpy", lambda r: x(r["bandwidth_ratio"]), "gpu"),
        ("ipc GB/s", lambda r: gbps(r["device-ipc_bandwidth_gbps"]), "ipc"),
        ("ipc/memcpy", lambda r: x(r["ipc_bandwidth_ratio"]), "ipc"),
        ("2d GB/s", lambda r: gbps(r["memcpy2d_bandwidth_gbps"]), "2d"),
        ("best/2d", lambda r: x(r["bandwidth_2d_ratio"]), "2d"),
        ("pipe GB/s", lambda r: gbps(r["device-pipe_bandwidth_gbps"]), "pipe"),
        ("pipe/device", lambda r: x(r["pipe_gain"]), "pipe"), ("verified", ok, "all")]
    shown = {"all"} | ({"gpu"} if gpu else set()) | ({"ipc"} if gpu and ipc else set()) | \
        ({"pipe"} if gpu and pipe else set()) | \
        ({"2d"} if gpu and any(r["memcpy2d_bandwidth_gbps"] for r in rows) else set())

    def build(columns):
        columns = [c for c in columns if c[2] in shown]
        return [c[0] for c in columns], [[c[1](r) for c in columns] for r in rows]
    latency_head, latency = build(latency_columns)
    bandwidth_head, bandwidth = build(bandwidth_columns)

    def table(head, body):
        widths = [max(len(head[i]), *(len(b[i]) for b in body)) if body else len(head[i]) for i in range(len(head))]

        def fmt(cells):
            return " | ".join(c.ljust(w) if i in (1, len(cells) - 1) else c.rjust(w)
                              for i, (c, w) in enumerate(zip(cells, widths)))
        return "\n".join([fmt(head), "-+-".join("-" * w for w in widths)] + [fmt(b) for b in body])
    return ("latency: half round trip, median\n" + table(latency_head, latency) +
            "\n\nbandwidth: a window of messages and a 1-byte answer, median window\n" + table(bandwidth_head, bandwidth))


def format_summary(s, gpu, skipped, ipc=False, pipe=False):
    def spread(what, v):
        return what + (f"{v['geomean']:.2f}x geomean over {v['n']} rows, slowest {v['slowest']['name']} "
                       f"{v['slowest']['ratio']:.2f}x" if v["n"] else "n/a")
    lines = []
    if gpu:
        lines.append(spread("device latency / host-memory MPI latency (lower is better): ", s["latency_ratio"]))
        lines.append(spread("device bandwidth / device-to-device memcpy bandwidth (higher is better): ",
                            s["bandwidth_ratio"]))
        if ipc:
            lines.append(spread("device-ipc (COMMLIB_IPC=1) latency / host-memory MPI latency (lower is better): ",
                                s["ipc_latency_ratio"]))
            lines.append(spread("device-ipc (COMMLIB_IPC=1) bandwidth / device-to-device memcpy bandwidth "
                                "(higher is better): ", s["ipc_bandwidth_ratio"]))
        if s["bandwidth_2d_ratio"]["n"]:
            which = "best of device and device-ipc" if ipc else "device"
            lines.append(spread(f"strided: {which} bandwidth / the driver's 2D copy of the layout "
                                "(cuMemcpy2DAsync, higher is better): ", s["bandwidth_2d_ratio"]))
        if pipe:
            lines.append(spread(f"device-pipe (COMMLIB_PIPELINE=1) bandwidth / device bandwidth, sizes >= "
                                f"{human_bytes(PIPELINE_MIN_BYTES)} (higher is better): ", s["pipe_gain"]))
    else:
        lines.append(f"device rows skipped ({skipped}): no ratios; host rows only")
    for what, g in s["goals"].items():
        state = "n/a" if g["met"] is None else "MET" if g["met"] else "MISSED"
        values = ", ".join((f"{layout} {v:.0%}" if what == GOAL_BANDWIDTH else f"{layout} {v:.2f}x") +
                           f" {g['from'][layout]}" for layout, v in g["values"].items())
        if values:
            values = ("best of device and device-ipc: " if ipc else "") + values
        lines.append(f"goal {state:6}  {what}" + (f" ({values})" if values else ""))
    if s["mismatched"]:
        lines.append("DATA WRONG (the receiver's check failed) in: " + ", ".join(s["mismatched"]))
    if s["failed"]:
        lines.append("runs that failed: " + "; ".join(s["failed"]))
    return "\n".join(lines)


def write_csv(path, runs):
    fields = ["memory", "layout", "op", "bytes", "span_bytes", "iters", "window", "time_us", "min_us", "gbps",
              "verified"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for run in runs:
            for m in run["measurements"]:
                w.writerow(m)


def main(argv=None):
    """Exit status 0 when every measurement verified, 1 when data was wrong, 2 when a run failed."""
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    if opts.keep:
        work_dir, cleanup = cache_dir(), None
    else:
        work_dir = cleanup = tempfile.mkdtemp(prefix="commlib-bench-p2p-")
    start = time.monotonic()
    try:
        binary = build(find_source(SOURCE_NAME), work_dir, reuse=opts.keep)
        paths.mpiexec()
        count, gpu_note = cuda_device_count()
        gpu = count > 0 and not opts.host_only
        if gpu:
            paths.preload_library()
        runs = [run_program(opts, binary, "host")]
        if gpu:
            if count < 2 or not opts.spread_gpus:
                # halo3d on an H200 at 2 ranks: device exchanges ~10x slower without MPS
                print("note: both ranks use GPU 0: without MPS (nvidia-cuda-mps-control -d) the GPU "
                      "time-slices between the two processes")
            runs.append(run_program(opts, binary, "device"))
            if runs[-1]["returncode"] == NO_GPU_EXIT:
                gpu, gpu_note = False, "the benchmark found no usable CUDA device (exit status 77)"
            else:
                if not opts.no_ipc:
                    runs.append(run_program(opts, binary, "device-ipc"))
                if opts.pipeline:
                    runs.append(run_program(opts, binary, "device-pipe"))
    except (BenchError, FileNotFoundError) as e:
        print(f"commlib bench p2p: {e}", file=sys.stderr)
        return 2
    finally:
        if cleanup:
            shutil.rmtree(cleanup, ignore_errors=True)
    wall = time.monotonic() - start
    ipc = gpu and any(run["memory"] == "device-ipc" for run in runs)
    pipe = gpu and any(run["memory"] == "device-pipe" for run in runs)
    skipped = None if gpu else ("--host-only" if opts.host_only else gpu_note)
    if skipped:
        print(f"note: device rows (device through commlib, memcpy) skipped ({skipped}); host rows only")
    for run in runs:
        reached = run["meta"].get("commlib_ipc_env")
        if run["env"] and reached and set(reached.split(",")) != {run["env"]["COMMLIB_IPC"]}:
            # a launcher that does not pass the environment on would make the columns the same run
            print(f"note: {run['memory']} run: COMMLIB_IPC={run['env']['COMMLIB_IPC']} was set but the ranks "
                  f"found {reached} (rank 0, rank 1)")
    for run in runs:
        for note in run["notes"]:
            if note.startswith(("MISMATCH", "commlib is not")):
                print(f"note: {run['memory']} run: {note}")
        if run["error"] and run["returncode"] != NO_GPU_EXIT:
            print(f"commlib bench p2p: the {run['memory']} run failed: {run['error']}", file=sys.stderr)

    rows = make_rows(opts, runs)
    summary = summarize(rows, runs)
    print(format_tables(rows, gpu, ipc, pipe))
    print(format_summary(summary, gpu, skipped, ipc, pipe))
    for run in runs[1:]:
        counters = run.get("commlib_stats") or {}
        moved = [f"{k}={v}" for k, v in counters.items() if k.startswith(("p2p.", "method.", "ipc.")) and v]
        if moved:   # which of commlib's routes the device messages took (rank 0's counters)
            print(f"commlib counters, {run['memory']} run, rank 0: " + " ".join(moved))
    host_meta = runs[0]["meta"]
    device_meta = runs[1]["meta"] if len(runs) > 1 else {}
    mpi = " ".join(host_meta.get("mpi_library", "unknown").split("MPICH Release")[0].split())
    print(f"2 ranks on one node; host MPI: {mpi}; device: {device_meta.get('device', 'none')}; "
          f"~{opts.target_ms:g} ms per measurement, >= {opts.min_iters} iterations; {gpu_note}; {wall:.1f} s")

    if opts.csv:
        write_csv(opts.csv, runs)
    if opts.json:
        result = {"benchmark": "p2p", "sizes": opts.sizes, "layouts": opts.layouts, "window": opts.window,
                  "window_mib": opts.window_mib, "target_ms": opts.target_ms, "min_iters": opts.min_iters,
                  "gpu": gpu, "gpu_note": gpu_note, "device_skipped": skipped, "ipc": ipc, "pipeline": pipe,
                  "wall_s": wall,
                  "strided_type": "MPI_Type_vector(n, 1, 2, MPI_DOUBLE)",
                  "goals": {GOAL_BANDWIDTH: {"bytes": GOAL_BANDWIDTH_BYTES, "ratio": GOAL_BANDWIDTH_RATIO},
                            GOAL_LATENCY: {"bytes": GOAL_LATENCY_BYTES, "ratio": GOAL_LATENCY_RATIO}},
                  "runs": runs, "rows": rows, "summary": summary}
        with open(opts.json, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
    if summary["failed"]:
        return 2
    return 1 if summary["mismatched"] else 0


if __name__ == "__main__":
    sys.exit(main())
