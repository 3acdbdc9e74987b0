"""Summarise the traces tests/gpu/kernel_trace.c wrote (one file a process) for a run of
`bench_p2p`'s bandwidth windows: per process, its kernels grouped into bursts (a gap of more
than --gap us starts a new one), and for the bursts of the commonest kernel count: the
kernels' durations, the GPU's idle time between them - split into the part where the next
kernel had not been launched yet (the host was late) and the part where it had (queued
behind nothing: the GPU's own launch latency) - and the driver calls each burst made.

    python3 tests/gpu/kernel_trace.py DIR [--gap US]
"""
import argparse
import collections
import glob
import os
import statistics


def read(path):
    kernels, copies, calls, names = [], [], [], {}
    with open(path) as f:
        for line in f:
            p = line.split()
            if not p:
                continue
            if p[0] == "K":
                kernels.append({"start": int(p[1]), "end": int(p[2]), "queued": int(p[3]), "submitted": int(p[4]),
                                "stream": int(p[5]), "corr": int(p[6]), "grid": p[7], "block": p[8],
                                "name": " ".join(p[9:])})
            elif p[0] == "M":
                copies.append({"start": int(p[1]), "end": int(p[2]), "bytes": int(p[3])})
            elif p[0] == "D":
                calls.append((int(p[1]), int(p[2]), int(p[3]), int(p[4]), int(p[5])))
            elif p[0] == "N":
                names[int(p[1])] = p[2]
    kernels.sort(key=lambda k: k["start"])
    calls.sort()
    return kernels, copies, calls, names


def q(values, frac):
    values = sorted(values)
    return values[min(len(values) - 1, int(frac * len(values)))] if values else float("nan")


def show(label, values, unit="us"):
    if values:
        print(f"    {label:34s} n={len(values):5d} median {statistics.median(values):8.2f} "
              f"p10 {q(values, .1):8.2f} p90 {q(values, .9):8.2f} {unit}")


def summarise(path, gap_us):
    kernels, copies, calls, names = read(path)
    print(f"== {os.path.basename(path)}: {len(kernels)} kernels, {len(copies)} copies, {len(calls)} driver calls")
    if not kernels:
        return
    for name, n in collections.Counter(k["name"][:80] for k in kernels).most_common(4):
        print(f"    kernel {n:6d} x {name}")
    launch_end = {c[3]: c[1] for c in calls}
    bursts, cur = [], [kernels[0]]
    for k in kernels[1:]:
        if k["start"] - cur[-1]["end"] > gap_us * 1e3:
            bursts.append(cur)
            cur = []
        cur.append(k)
    bursts.append(cur)
    sizes = collections.Counter(len(b) for b in bursts)
    print(f"    bursts (gap > {gap_us} us): {len(bursts)}; kernels a burst: "
          + ", ".join(f"{n}x{c}" for n, c in sorted(sizes.items(), key=lambda x: -x[1])[:6]))
    # the timed windows: the commonest burst size among bursts of 2+ kernels
    common = max((n for n in sizes if n >= 2), key=lambda n: (sizes[n], n), default=None)
    if common is None:
        return
    chosen = [b for b in bursts if len(b) == common]
    dur, idle_host, idle_gpu, span, busy = [], [], [], [], []
    for b in chosen:
        span.append((b[-1]["end"] - b[0]["start"]) / 1e3)
        busy.append(sum(k["end"] - k["start"] for k in b) / 1e3)
        for i, k in enumerate(b):
            dur.append((k["end"] - k["start"]) / 1e3)
            if i == 0:
                continue
            idle = max(0, k["start"] - b[i - 1]["end"])
            launched = launch_end.get(k["corr"])
            late = 0 if launched is None else min(idle, max(0, launched - b[i - 1]["end"]))
            idle_host.append(late / 1e3)
            idle_gpu.append((idle - late) / 1e3)
    print(f"    windows of {common} kernels: {len(chosen)}")
    show("kernel duration", dur)
    show("idle before a kernel, host late", idle_host)
    show("idle before a kernel, launched", idle_gpu)
    show("window: first start to last end", span)
    show("window: kernels' busy time", busy)
    # driver calls inside the chosen windows (from the first kernel's launch to the last end)
    per = collections.defaultdict(list)
    for b in chosen[len(chosen) // 2:len(chosen) // 2 + 1]:
        lo = min(launch_end.get(b[0]["corr"], b[0]["start"]) - 200_000, b[0]["start"])
        hi = b[-1]["end"]
        for c in calls:
            if lo <= c[0] <= hi:
                per[names.get(c[2], str(c[2]))].append((c[1] - c[0]) / 1e3)
        print(f"    driver calls in one window (from 200 us before its first launch), by time:")
        for name, ts in sorted(per.items(), key=lambda x: -sum(x[1]))[:12]:
            print(f"      {name:36s} {len(ts):5d} calls {sum(ts):9.1f} us (median {statistics.median(ts):.2f})")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("dir")
    p.add_argument("--gap", type=float, default=40.0)
    a = p.parse_args()
    for path in sorted(glob.glob(os.path.join(a.dir, "trace.*.txt"))):
        summarise(path, a.gap)


if __name__ == "__main__":
    main()
