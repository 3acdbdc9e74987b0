"""The elastic all-reduce on a narrow wire: time of one all-reduce of N MB float32 over P
peer processes on this machine, per (rate, quantize) case, with COMMLIB_ELASTIC_RATE_MBIT
throttling each peer's data connections (issue 11, points 5 and 7).

    python -m commlib.bench.elastic_wire [--peers 3] [--mb 25] [--reps 3]
        [--cases none@0,none@1000,none@100,uint8@100,uint4@100] [--latency-ms 0]

A case is QUANTIZE@RATE_MBIT (0: unthrottled).  Each peer runs one warm-up all-reduce,
then --reps timed ones; a repetition's time is from the first peer's start to the last
peer's end (monotonic clock, shared by the processes).  Printed: the median, the bytes one
peer sent, and the time those bytes need at the rate (the floor the throttle enforces).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SECRET = "bench-elastic-wire"


def peer(address, count, quantize, reps):
    import numpy as np

    import collectives.elastic as el
    comm = el.ElasticComm(address, secret=SECRET)
    comm.update_topology()
    q = False if quantize == "none" else quantize
    x0 = np.random.default_rng(comm.rank).uniform(-1, 1, count).astype(np.float32)
    for i in range(reps + 1):
        x = x0.copy()
        before = comm.wire_stats()["sent"]
        t0 = time.monotonic()
        comm.all_reduce(x, op="avg", quantize=q)
        t1 = time.monotonic()
        if i:  # the first is a warm-up (buffers, page faults)
            print(json.dumps({"t0": t0, "t1": t1, "sent": comm.wire_stats()["sent"] - before}), flush=True)
    comm.close()


def run_case(peers, count, quantize, rate, latency_ms, reps):
    import collectives.elastic as el
    env = dict(os.environ, COMMLIB_ELASTIC_RATE_MBIT=str(rate), COMMLIB_ELASTIC_LATENCY_MS=str(latency_ms),
               COMMLIB_ELASTIC_QUIET="1")
    with el.Coordinator(0, secret=SECRET, min_peers=peers) as co:
        procs = [subprocess.Popen([sys.executable, "-m", "commlib.bench.elastic_wire", "--peer", co.address,
                                   str(count), quantize, str(reps)], stdout=subprocess.PIPE, text=True, env=env)
                 for _ in range(peers)]
        outs = [p.communicate(timeout=600)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"a peer failed in case {quantize}@{rate}")
    runs = [[json.loads(ln) for ln in out.splitlines() if ln.startswith("{")] for out in outs]
    times = [max(r[i]["t1"] for r in runs) - min(r[i]["t0"] for r in runs) for i in range(reps)]
    sent = max(r[0]["sent"] for r in runs)
    return statistics.median(times), sent


def main(argv=None):
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--peer":
        peer(sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
        return
    ap = argparse.ArgumentParser(prog="python -m commlib.bench.elastic_wire", description=__doc__.splitlines()[0])
    ap.add_argument("--peers", type=int, default=3)
    ap.add_argument("--mb", type=float, default=25.0, help="buffer size in MB (10^6 bytes) of float32")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cases", default="none@0,none@1000,none@100,uint8@100,uint4@100")
    ap.add_argument("--latency-ms", type=float, default=0)
    a = ap.parse_args(argv)
    os.environ.setdefault("COMMLIB_ELASTIC_QUIET", "1")  # the coordinator runs in this process
    count = int(a.mb * 1e6) // 4
    print(f"{a.peers} peers, {count * 4 / 1e6:.1f} MB float32, avg, latency {a.latency_ms} ms, median of {a.reps}")
    print(f"{'quantize':>8} {'Mbit/s':>7} {'seconds':>8} {'MB sent/peer':>13} {'bytes/rate':>10}")
    for case in a.cases.split(","):
        quantize, rate = case.split("@")
        seconds, sent = run_case(a.peers, count, quantize, float(rate), a.latency_ms, a.reps)
        floor = f"{sent * 8 / (float(rate) * 1e6):.3f}" if float(rate) else "-"
        print(f"{quantize:>8} {rate if float(rate) else 'off':>7} {seconds:8.3f} {sent / 1e6:13.2f} {floor:>10}", flush=True)


if __name__ == "__main__":
    main()
