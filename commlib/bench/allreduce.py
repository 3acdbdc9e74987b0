"""`commlib bench allreduce`: the elastic all-reduce against torch.distributed (gloo) and
the installed MPI's MPI_Allreduce, on loopback, in the same run; and recovery after SIGKILL.

Bus bandwidth = algbw * 2(n-1)/n, algbw = bytes / time (float32 sum, median of --iters).
Rows: message size; columns: elastic with k = 1, 2, 4 connections per neighbour (and
--quantize: min-max uint8 on the wire, counted at the float32 size), gloo
(when torch is installed), MPI (mpi4py under mpiexec).  Ratios are elastic(best k) / gloo.
Recovery: world --recovery-world, a peer SIGKILLed every ~0.5 s (--kills times) and a new
one started; per kill, the time from the kill to the survivors' next successful
all-reduce (p50, p99).  Goals (issue 4): >= 2x gloo's bus bandwidth at >= 16 MiB; the
next all-reduce done <= 1 s after a kill.

    commlib bench allreduce [--worlds 2,4] [--k 1,2,4] [--max-mib 64] [--iters 5] [--kills 20] [--json F]
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
        out[nbytes] = statistics.median(times)
    return out if comm.rank == 0 else None


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


def run_mpi(world, size_list, iters):
    try:
        from commlib import paths
        mpiexec = paths.mpiexec()
        import mpi4py  # noqa: F401
    except (ImportError, FileNotFoundError):
        return None
    proc = subprocess.run([mpiexec, "-n", str(world), sys.executable, "-m", "commlib.bench.allreduce", "--worker", "mpi",
                           ",".join(map(str, size_list)), str(iters)], capture_output=True, text=True, timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        print(f"  (MPI_Allreduce run failed: {proc.stderr.strip()[-300:]})")
        return None
    return {int(k): v for k, v in json.loads(lines[-1]).items()}


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
        else:
            worker_recovery(rest[0], rest[1])
            return 0
        if res is not None:
            print(json.dumps(res), flush=True)
        return 0
    ap = argparse.ArgumentParser(prog="commlib bench allreduce")
    ap.add_argument("--worlds", default="2,4")
    ap.add_argument("--k", default="1,2,4")
    ap.add_argument("--max-mib", type=int, default=64)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--recovery-world", type=int, default=3)
    ap.add_argument("--no-mpi", action="store_true")
    ap.add_argument("--quantize", action="store_true", help="add a column: elastic with min-max uint8 transfer")
    ap.add_argument("--no-gloo", action="store_true")
    ap.add_argument("--json", help="write the results here")
    opts = ap.parse_args(argv)
    os.environ.setdefault("COMMLIB_ELASTIC_QUIET", "1")  # the embedded coordinators
    size_list = sizes(opts.max_mib)
    ks = [int(k) for k in opts.k.split(",")]
    report = {"busbw_GBps": {}, "recovery_s": None}
    for world in [int(w) for w in opts.worlds.split(",")]:
        cols = {}
        for k in ks:
            cols[f"elastic k={k}"] = run_elastic(world, k, size_list, opts.iters)
        if opts.quantize:
            cols[f"elastic q8 k={ks[-1]}"] = run_elastic(world, ks[-1], size_list, opts.iters, quantize=True)
        gloo = None if opts.no_gloo else run_gloo(world, size_list, opts.iters)
        if gloo:
            cols["gloo"] = gloo
        mpi = None if opts.no_mpi else run_mpi(world, size_list, opts.iters)
        if mpi:
            cols["MPI"] = mpi
        print(f"\nbus bandwidth, GB/s (world {world}, float32 sum, loopback)")
        head = f"{'size':>8} | " + " | ".join(f"{c:>12}" for c in cols) + (" | best/gloo" if gloo else "")
        print(head)
        print("-" * len(head))
        report["busbw_GBps"][world] = {}
        for s in size_list:
            row = {c: busbw(s, cols[c][s], world) for c in cols}
            report["busbw_GBps"][world][s] = row
            best = max(row[c] for c in row if c.startswith("elastic k"))
            ratio = f" | {best / row['gloo']:8.2f}x" if gloo else ""
            print(f"{human(s):>8} | " + " | ".join(f"{row[c]:12.3f}" for c in cols) + ratio)
    if opts.kills > 0:
        rec = run_recovery(opts.recovery_world, opts.kills)
        finite = sorted(r for r in rec if r != float("inf"))
        p50 = finite[len(finite) // 2] if finite else float("inf")
        p99 = finite[min(len(finite) - 1, int(0.99 * len(finite)))] if finite else float("inf")
        report["recovery_s"] = {"kills": len(rec), "recovered": len(finite), "p50": p50, "p99": p99, "all": rec}
        print(f"\nrecovery after SIGKILL (world {opts.recovery_world}, {len(rec)} kills): "
              f"next all-reduce done p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
              f"{len(rec) - len(finite)} not recovered in 10 s")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
