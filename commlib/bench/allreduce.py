"""`commlib bench allreduce`: the elastic all-reduce and commlib's collective engine
(collectives.mpi.MPIComm.all_reduce) against torch.distributed (gloo) and the installed
MPI's MPI_Allreduce, on loopback, in the same run; and recovery after SIGKILL.

Bus bandwidth = algbw * 2(n-1)/n, algbw = bytes / time (float32 sum, median of --iters, the
slowest rank's).  Rows: message size, 1 KiB to --max-mib.  Columns (--columns):
  elastic      the elastic all-reduce with k = 1, 2, 4 (--k) connections per neighbour
  elastic-q8   the same with min-max uint8 on the wire, counted at the float32 size
               (--quantize adds it)
  engine       MPIComm.all_reduce under mpiexec with libcommlib.so preloaded (as `commlib
               run` does): the engine's shared-memory transport (all ranks on this node)
  engine-mpi   the same over the engine's MPI transport (COMMLIB_ENGINE_TRANSPORT=mpi: its
               ring / recursive doubling over the host MPI's point-to-point)
  gloo         torch.distributed's gloo (when torch is installed)
  mpi          the host MPI's MPI_Allreduce (mpi4py under mpiexec, no preload)
Ratios: elastic (best k) / gloo; engine / MPI, engine / gloo, engine-mpi / MPI.
Recovery: world --recovery-world, a peer SIGKILLed every ~0.5 s (--kills times) and a new
one started; per kill, the time from the kill to the survivors' next successful
all-reduce (p50, p99).  Goals, printed MET or MISSED: issue 4, the elastic all-reduce >= 2x
gloo's bus bandwidth at >= 16 MiB and the next all-reduce done <= 1 s after a kill; issue 9,
the engine (each transport) >= the host MPI's MPI_Allreduce and >= 2x gloo at >= 1 MiB.

    commlib bench allreduce [--worlds 2,4] [--columns elastic,engine,engine-mpi,gloo,mpi] [--k 1,2,4]
                            [--max-mib 64] [--iters 5] [--kills 20] [--quick] [--json F] [--csv F]
    commlib bench allreduce --columns engine,engine-mpi,mpi,gloo --kills 0   # the engine alone vs MPI, gloo
"""
import argparse
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

import numpy as np


def sizes(max_mib):
    out, s = [], 1024
    while s <= max_mib << 20:
        out.append(s)
        s *= 4 if s < (16 << 20) else 2
    if (max_mib << 20) not in out:
        out.append(max_mib << 20)
    return out


def human(n):
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


def iters_for(nbytes, iters):
    return max(iters, min(200, (4 << 20) // max(nbytes, 1)))


# ---- workers (run in child processes) ----

def worker_elastic(address, secret, size_list, iters, quantize=False):
    import collectives.elastic as el
    comm = el.ElasticComm(address, secret=secret)
    comm.update_topology()
    out = {}
    for nbytes in size_list:
        x = np.ones(nbytes // 4, np.float32)
        comm.all_reduce(x, quantize=quantize)  # warm-up
        times = []
        for _ in range(iters_for(nbytes, iters)):
            t0 = time.perf_counter()
            comm.all_reduce(x, quantize=quantize)
            times.append(time.perf_counter() - t0)
        out[nbytes] = statistics.median(times)
    comm.close()
    return out


def worker_gloo(rank, world, port, size_list, iters):
    import torch
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    out = {}
    for nbytes in size_list:
        x = torch.ones(nbytes // 4, dtype=torch.float32)
        dist.all_reduce(x)
        times = []
        for _ in range(iters_for(nbytes, iters)):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(x)
            times.append(time.perf_counter() - t0)
        out[nbytes] = statistics.median(times)
    dist.destroy_process_group()
    return out


def worker_mpi(size_list, iters):
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    out = {}
    for nbytes in size_list:
        x = np.ones(nbytes // 4, np.float32)
        comm.Allreduce(MPI.IN_PLACE, x)
        times = []
        for _ in range(iters_for(nbytes, iters)):
            comm.Barrier()
            t0 = time.perf_counter()
            comm.Allreduce(MPI.IN_PLACE, x)
            times.append(time.perf_counter() - t0)
        out[nbytes] = comm.allreduce(statistics.median(times), op=MPI.MAX)  # the slowest rank's median
    return out if comm.rank == 0 else None


def worker_engine(size_list, iters):
    """MPIComm.all_reduce (commlib's engine); rank 0 returns the slowest rank's medians, the
    transport, and whether the first all-reduce of every size was right."""
    from mpi4py import MPI
    from collectives.mpi import MPIComm
    world = MPI.COMM_WORLD
    comm = MPIComm()
    out, wrong = {}, []
    for nbytes in size_list:
        x = np.ones(nbytes // 4, np.float32)
        comm.all_reduce(x)  # warm-up, checked
        if not world.allreduce(bool(np.all(x == world.size)), op=MPI.LAND):
            wrong.append(nbytes)
        times = []
        for _ in range(iters_for(nbytes, iters)):
            world.Barrier()
            t0 = time.perf_counter()
            comm.all_reduce(x)
            times.append(time.perf_counter() - t0)
        out[nbytes] = world.allreduce(statistics.median(times), op=MPI.MAX)
    transport = comm.transport
    comm.close()
    return {"seconds": out, "transport": transport, "wrong": wrong} if world.rank == 0 else None


def worker_recovery(address, secret):
    """Loops small all-reduces; prints the wall time of every success."""
    import collectives.elastic as el
    comm = el.ElasticComm(address, secret=secret)
    x = np.ones(1 << 16, np.float32)
    while True:
        try:
            comm.update_topology()
            comm.all_reduce(x)
            print(f"ok {time.time():.6f} {comm.world}", flush=True)
        except el.PeerFailure:
            pass


# ---- driver ----

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(args, env=None):
    return subprocess.Popen([sys.executable, "-m", "commlib.bench.allreduce", "--worker", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def collect(procs, timeout=900):
    results = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError(f"worker failed ({p.returncode}): {err[-2000:]}")
        line = [ln for ln in out.splitlines() if ln.startswith("{")]
        results.append({int(k): v for k, v in json.loads(line[-1]).items()} if line else None)
    return results


def run_elastic(world, k, size_list, iters, quantize=False):
    import collectives.elastic as el
    secret = secrets.token_hex(16)
    env = dict(os.environ, COMMLIB_ELASTIC_CONNECTIONS=str(k), COMMLIB_ELASTIC_QUIET="1")
    with el.Coordinator(0, secret=secret, host="127.0.0.1", min_peers=world) as co:
        res = collect([spawn(["elastic", co.address, secret, ",".join(map(str, size_list)), iters, int(quantize)], env)
                       for _ in range(world)])
    return {s: max(r[s] for r in res) for s in size_list}  # the slowest peer's median


def run_gloo(world, size_list, iters):
    try:
        import torch.distributed  # noqa: F401
    except ImportError:
        return None
    port = free_port()
    res = collect([spawn(["gloo", r, world, port, ",".join(map(str, size_list)), iters]) for r in range(world)])
    return {s: max(r[s] for r in res) for s in size_list}


def mpi_worker_output(world, kind, size_list, iters, preload=False, knobs=None, timeout=900):
    """Runs `--worker kind` on `world` ranks under the installed MPI's mpiexec (preload:
    libcommlib.so preloaded into the ranks, as `commlib run` does; knobs: environment of the
    ranks; Open MPI gets --bind-to none, so that an engine's thread has a core to run on);
    rank 0's JSON line, or None (the reason printed)."""
    what = {"mpi": "MPI_Allreduce", "engine": "MPIComm.all_reduce"}.get(kind, kind)
    try:
        from commlib import paths
        from commlib.bench.pack import launch_command, launcher_kind
        mpiexec = paths.mpiexec()
        import mpi4py  # noqa: F401
        lib = paths.preload_library() if preload else None
    except (ImportError, FileNotFoundError) as e:
        print(f"  ({what} not measured: {e})")
        return None
    launcher = launcher_kind(mpiexec)
    cmd, env = launch_command(mpiexec, launcher, sys.executable,
                              ["-m", "commlib.bench.allreduce", "--worker", kind, ",".join(map(str, size_list)),
                               str(iters)], lib)
    at = cmd.index("-n") + 1
    cmd[at] = str(world)
    extra = []
    for name, value in (knobs or {}).items():
        env[name] = value
        if launcher == "hydra":
            extra += ["-genv", name, value]
        elif launcher == "openmpi":
            extra += ["-x", f"{name}={value}"]
    if launcher == "openmpi":
        extra += ["--bind-to", "none"]
    cmd[at + 1:at + 1] = extra
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"  ({what} run timed out after {timeout} s)")
        return None
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        print(f"  ({what} run failed: {proc.stderr.strip()[-300:]})")
        return None
    return json.loads(lines[-1])


def run_mpi(world, size_list, iters):
    res = mpi_worker_output(world, "mpi", size_list, iters)
    return None if res is None else {int(k): v for k, v in res.items()}


def run_engine(world, size_list, iters, transport="auto"):
    """MPIComm.all_reduce's times, or None; transport "mpi" forces the engine's MPI path."""
    knobs = {"COMMLIB_ENGINE_TRANSPORT": transport} if transport != "auto" else {}
    res = mpi_worker_output(world, "engine", size_list, iters, preload=True, knobs=knobs)
    if res is None:
        return None
    if res["wrong"]:
        print(f"  (MPIComm.all_reduce, transport {res['transport']}: WRONG results at "
              f"{', '.join(human(s) for s in res['wrong'])})")
    return {"seconds": {int(k): v for k, v in res["seconds"].items()}, "transport": res["transport"],
            "wrong": res["wrong"]}


def busbw(nbytes, seconds, world):
    return nbytes / seconds * 2 * (world - 1) / world / 1e9


def run_recovery(world, kills):
    import collectives.elastic as el
    secret = secrets.token_hex(16)
    env = dict(os.environ, COMMLIB_ELASTIC_QUIET="1")
    lines = {}

    def start():
        p = spawn(["recovery", co.address, secret], env)
        lines[p] = []

        def pump_lines(stream=p.stdout, into=lines[p]):
            for ln in stream:
                if ln.startswith("ok "):
                    into.append(ln)
        threading.Thread(target=pump_lines, daemon=True).start()
        return p

    def pump():
        pass

    def last_ok(p):
        return list(lines[p])

    recoveries = []
    with el.Coordinator(0, secret=secret, host="127.0.0.1", min_peers=world) as co:
        live = [start() for _ in range(world)]
        time.sleep(3)
        for i in range(kills):
            pump()
            victim = live.pop(np.random.default_rng(i).integers(len(live)))
            t_kill = time.time()
            victim.send_signal(signal.SIGKILL)
            # The survivors' next success after the kill, in a smaller world.
            done = None
            deadline = time.monotonic() + 10
            while done is None and time.monotonic() < deadline:
                time.sleep(0.005)
                pump()
                for p in live:
                    after = [float(ln.split()[1]) for ln in last_ok(p) if float(ln.split()[1]) > t_kill
                             and int(ln.split()[2]) == len(live)]
                    if after:
                        done = min(after) if done is None else min(done, min(after))
            recoveries.append(done - t_kill if done else float("inf"))
            lines.pop(victim, None)
            victim.wait()
            live.append(start())
            # Wait until the new peer is in (the world is back to full size).
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and co.info()["world"] != world:
                time.sleep(0.02)
            time.sleep(0.3)
        for p in live:
            p.kill()
            p.wait()
    return recoveries


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        kind, rest = argv[1], argv[2:]
        if kind == "elastic":
            res = worker_elastic(rest[0], rest[1], [int(s) for s in rest[2].split(",")], int(rest[3]), rest[4] == "1")
        elif kind == "gloo":
            res = worker_gloo(int(rest[0]), int(rest[1]), int(rest[2]), [int(s) for s in rest[3].split(",")], int(rest[4]))
        elif kind == "mpi":
            res = worker_mpi([int(s) for s in rest[0].split(",")], int(rest[1]))
        elif kind == "engine":
            res = worker_engine([int(s) for s in rest[0].split(",")], int(rest[1]))
        else:
            worker_recovery(rest[0], rest[1])
            return 0
        if res is not None:
            print(json.dumps(res), flush=True)
        return 0
    return bench(argv)


COLUMNS = ("elastic", "elastic-q8", "engine", "engine-mpi", "gloo", "mpi")
ENGINE_GOAL_BYTES = 1 << 20      # issue 9: from 1 MiB, the engine ...
ENGINE_GOAL_VS_MPI = 1.0         # ... >= MPI_Allreduce
ENGINE_GOAL_VS_GLOO = 2.0        # ... and >= 2x gloo
ELASTIC_GOAL_BYTES = 16 << 20    # issue 4: from 16 MiB, elastic (best k) >= 2x gloo
ELASTIC_GOAL_VS_GLOO = 2.0
RECOVERY_GOAL_S = 1.0


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="commlib bench allreduce",
                                 description="Bus bandwidth of the elastic all-reduce and of commlib's engine "
                                             "(MPIComm.all_reduce) against gloo and MPI_Allreduce in the same run; "
                                             "recovery after SIGKILL.")
    ap.add_argument("--worlds", help="world sizes (default 2,4; quick 2)")
    ap.add_argument("--columns", default="elastic,engine,engine-mpi,gloo,mpi", metavar="LIST",
                    help=f"which of {', '.join(COLUMNS)} (default elastic,engine,engine-mpi,gloo,mpi)")
    ap.add_argument("--k", default="1,2,4", help="elastic: connections per neighbour (default 1,2,4)")
    ap.add_argument("--max-mib", type=int, help="largest message, MiB (default 64; quick 1)")
    ap.add_argument("--iters", type=int, help="timed all-reduces per size, at least (default 5; quick 2)")
    ap.add_argument("--kills", type=int, help="recovery: SIGKILLs (default 20; quick 0: no recovery run)")
    ap.add_argument("--recovery-world", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="world 2, 1 KiB..1 MiB, 2 iterations, no recovery run")
    ap.add_argument("--no-mpi", action="store_true", help="leave the mpi column out")
    ap.add_argument("--quantize", action="store_true", help="add a column: elastic with min-max uint8 transfer")
    ap.add_argument("--no-gloo", action="store_true", help="leave the gloo column out")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--csv", help="write one line per (world, size, column) here")
    opts = ap.parse_args(argv)
    opts.worlds = opts.worlds or ("2" if opts.quick else "2,4")
    opts.max_mib = opts.max_mib if opts.max_mib is not None else 1 if opts.quick else 64
    opts.iters = opts.iters if opts.iters is not None else 2 if opts.quick else 5
    opts.kills = opts.kills if opts.kills is not None else 0 if opts.quick else 20
    opts.column_list = [c.strip() for c in opts.columns.split(",") if c.strip()]
    if opts.quantize and "elastic-q8" not in opts.column_list:
        opts.column_list.append("elastic-q8")
    opts.column_list = [c for c in opts.column_list if not (c == "mpi" and opts.no_mpi or c == "gloo" and opts.no_gloo)]
    bad = [c for c in opts.column_list if c not in COLUMNS]
    if bad or not opts.column_list:
        ap.error(f"--columns: unknown {', '.join(bad) or '(none left)'}; choose from {', '.join(COLUMNS)}")
    try:
        opts.world_list = [int(w) for w in opts.worlds.split(",")]
        opts.k_list = [int(k) for k in opts.k.split(",")]
    except ValueError:
        ap.error("--worlds and --k are comma-separated integers")
    if min(opts.world_list) < 2 or min(opts.k_list) < 1 or opts.max_mib < 1 or opts.iters < 1 or opts.kills < 0:
        ap.error("worlds of at least 2, k, --max-mib and --iters of at least 1, --kills of at least 0")
    return opts


def ratio(a, b):
    return a / b if a and b else None


def measure_world(opts, world, size_list):
    """{column name: {bytes: seconds}} for one world, in the table's order; notes."""
    cols, notes = {}, []
    if "elastic" in opts.column_list:
        for k in opts.k_list:
            cols[f"elastic k={k}"] = run_elastic(world, k, size_list, opts.iters)
    if "elastic-q8" in opts.column_list:
        cols[f"elastic q8 k={opts.k_list[-1]}"] = run_elastic(world, opts.k_list[-1], size_list, opts.iters,
                                                             quantize=True)
    for name, transport in (("engine", "auto"), ("engine-mpi", "mpi")):
        if name in opts.column_list:
            res = run_engine(world, size_list, opts.iters, transport)
            if res:
                cols[name] = res["seconds"]
                notes.append(f"{name}: transport {res['transport']}"
                             + (f", WRONG results at {', '.join(human(s) for s in res['wrong'])}" if res["wrong"]
                                else ", results checked"))
    if "gloo" in opts.column_list:
        gloo = run_gloo(world, size_list, opts.iters)
        if gloo:
            cols["gloo"] = gloo
        else:
            notes.append("gloo: torch is not installed")
    if "mpi" in opts.column_list:
        mpi = run_mpi(world, size_list, opts.iters)
        if mpi:
            cols["MPI"] = mpi
    return cols, notes


RATIOS = (("best/gloo", "elastic", "gloo"), ("engine/MPI", "engine", "MPI"), ("engine/gloo", "engine", "gloo"),
          ("engine-mpi/MPI", "engine-mpi", "MPI"), ("engine-mpi/gloo", "engine-mpi", "gloo"))


def world_rows(cols, size_list, world):
    rows = []
    for s in size_list:
        bw = {c: busbw(s, cols[c][s], world) for c in cols}
        elastic = [bw[c] for c in bw if c.startswith("elastic k")]
        named = {"elastic": max(elastic) if elastic else None, **bw}
        rows.append({"bytes": s, "busbw_GBps": bw, "seconds": {c: cols[c][s] for c in cols},
                     "ratios": {name: ratio(named.get(a), named.get(b)) for name, a, b in RATIOS
                                if named.get(a) and named.get(b)}})
    return rows


def goals(rows):
    """MET / MISSED / None per goal of one world."""
    out = {}
    big = [r for r in rows if r["bytes"] >= ENGINE_GOAL_BYTES]
    for col in ("engine", "engine-mpi"):
        vs_mpi = [r["ratios"].get(f"{col}/MPI") for r in big]
        vs_gloo = [r["ratios"].get(f"{col}/gloo") for r in big]
        if not big or all(v is None for v in vs_mpi + vs_gloo):
            continue
        lo_mpi = min(v for v in vs_mpi if v is not None) if any(v is not None for v in vs_mpi) else None
        lo_gloo = min(v for v in vs_gloo if v is not None) if any(v is not None for v in vs_gloo) else None
        met = ((lo_mpi is None or lo_mpi >= ENGINE_GOAL_VS_MPI) and (lo_gloo is None or lo_gloo >= ENGINE_GOAL_VS_GLOO)
               and not (lo_mpi is None and lo_gloo is None))
        out[col] = {"min_vs_mpi": lo_mpi, "min_vs_gloo": lo_gloo, "met": met,
                    "partial": lo_mpi is None or lo_gloo is None}
    el = [r["ratios"].get("best/gloo") for r in rows if r["bytes"] >= ELASTIC_GOAL_BYTES]
    el = [v for v in el if v is not None]
    if el:
        out["elastic"] = {"min_vs_gloo": min(el), "met": min(el) >= ELASTIC_GOAL_VS_GLOO}
    return out


def format_goals(world, g):
    def x(v):
        return "n/a" if v is None else f"{v:.2f}x"
    lines = []
    for col in ("engine", "engine-mpi"):
        if col in g:
            e = g[col]
            lines.append(f"goal {'MET' if e['met'] else 'MISSED':6}  world {world}, {col}: >= MPI_Allreduce and "
                         f">= {ENGINE_GOAL_VS_GLOO:g}x gloo at >= 1 MiB (lowest: {x(e['min_vs_mpi'])} MPI, "
                         f"{x(e['min_vs_gloo'])} gloo{'; partly measured' if e['partial'] else ''})")
    if "elastic" in g:
        lines.append(f"goal {'MET' if g['elastic']['met'] else 'MISSED':6}  world {world}, elastic (best k): "
                     f">= {ELASTIC_GOAL_VS_GLOO:g}x gloo at >= 16 MiB (lowest {x(g['elastic']['min_vs_gloo'])})")
    return lines


def bench(argv):
    opts = parse_args(argv)
    os.environ.setdefault("COMMLIB_ELASTIC_QUIET", "1")  # the embedded coordinators
    size_list = sizes(opts.max_mib)
    report = {"busbw_GBps": {}, "worlds": {}, "recovery_s": None, "columns": opts.column_list}
    csv_lines = []
    for world in opts.world_list:
        cols, notes = measure_world(opts, world, size_list)
        if not cols:
            print(f"\nworld {world}: nothing measured")
            continue
        rows = world_rows(cols, size_list, world)
        ratio_names = [name for name, _, _ in RATIOS if any(name in r["ratios"] for r in rows)]
        print(f"\nbus bandwidth, GB/s (world {world}, float32 sum, loopback); ratios of bus bandwidths")
        for n in notes:
            print(f"  {n}")
        head = f"{'size':>8} | " + " | ".join(f"{c:>12}" for c in cols) + \
            "".join(f" | {n:>{max(9, len(n))}}" for n in ratio_names)
        print(head)
        print("-" * len(head))
        for r in rows:
            print(f"{human(r['bytes']):>8} | " + " | ".join(f"{r['busbw_GBps'][c]:12.3f}" for c in cols)
                  + "".join(f" | {r['ratios'][n]:>{max(9, len(n)) - 1}.2f}x" if n in r["ratios"]
                            else f" | {'n/a':>{max(9, len(n))}}" for n in ratio_names))
            for c in cols:
                csv_lines.append({"world": world, "bytes": r["bytes"], "column": c, "seconds": r["seconds"][c],
                                  "busbw_GBps": r["busbw_GBps"][c]})
        g = goals(rows)
        for line in format_goals(world, g):
            print(line)
        report["busbw_GBps"][world] = {r["bytes"]: r["busbw_GBps"] for r in rows}
        report["worlds"][world] = {"rows": rows, "goals": g, "notes": notes}
    if opts.kills > 0:
        rec = run_recovery(opts.recovery_world, opts.kills)
        finite = sorted(r for r in rec if r != float("inf"))
        p50 = finite[len(finite) // 2] if finite else float("inf")
        p99 = finite[min(len(finite) - 1, int(0.99 * len(finite)))] if finite else float("inf")
        report["recovery_s"] = {"kills": len(rec), "recovered": len(finite), "p50": p50, "p99": p99, "all": rec}
        print(f"\nrecovery after SIGKILL (world {opts.recovery_world}, {len(rec)} kills): "
              f"next all-reduce done p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
              f"{len(rec) - len(finite)} not recovered in 10 s")
        print(f"goal {'MET' if p99 <= RECOVERY_GOAL_S and len(finite) == len(rec) else 'MISSED':6}  the next "
              f"all-reduce done <= {RECOVERY_GOAL_S:g} s after a kill (p99)")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(report, f, indent=1)
    if opts.csv:
        import csv
        with open(opts.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["world", "bytes", "column", "seconds", "busbw_GBps"])
            w.writeheader()
            w.writerows(csv_lines)
    wrong = any("WRONG" in n for w in report["worlds"].values() for n in w["notes"])
    if not report["worlds"]:
        return 2
    return 1 if wrong else 0

if __name__ == "__main__":
    sys.exit(main())
