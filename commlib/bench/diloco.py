"""`commlib bench diloco`: training over slow links, synchronous data parallel against DiLoCo,
DiLoCo with overlap, streaming DiLoCo and CO2, side by side in the same run.

    commlib bench diloco [--peers 4] [--rates 100,1000] [--modes ddp,diloco,overlap,streaming,co2]
                         [--steps 900] [--sync-every 25] [--overlap-delay 8] [--fragments 4] [--delay N]
                         [--quantize none|uint8|uint4] [--latency-ms 0] [--threads 1]
                         [--dim 128] [--layers 2] [--batch 16] [--context 64]
                         [--json F] [--csv F] [--plot F.png] [--quick]

Every run is `commlib elastic-run -n PEERS` of the training example (examples/diloco_train.py,
shipped as commlib/_src/diloco_train.py): a character-level transformer on the standard
library's source files, the same model, data, batches and number of inner steps in every run,
CPU, --threads torch threads per peer (--pin: peer i on cores i*threads.., its engine
threads with it, as if each peer had a machine of its own).  Each peer's data connections are throttled to RATE
Mbit/s (COMMLIB_ELASTIC_RATE_MBIT; --latency-ms adds COMMLIB_ELASTIC_LATENCY_MS per ring
step).  Modes:
  ddp        synchronous data parallel: the gradients all-reduced every step (the baseline)
  diloco     DiLoCo, an outer all-reduce every --sync-every steps, blocking
  overlap    DiLoCo, the outer all-reduce overlapped with the next --overlap-delay inner steps
             and applied then (8 by default: enough to hide a 100 Mbit/s round here;
             --overlap-delay 25 = one outer step late, which costs loss: see the README)
  streaming  --fragments fragments, --delay steps of overlap each (default sync_every // fragments)
  co2        CO2: overlap, staleness gap penalty, outer momentum clipping
  (--quantize applies to the DiLoCo modes and CO2.)
And once: `alone`, the same peers training with no communication at all (each on its own),
which gives the compute time of a step on this machine with this many peers running.

Per (rate, mode):
  tokens/s   tokens trained per second, all peers together (steps x batch x context x peers
             over the slowest peer's wall time, from the first step to the last);
  util       compute utilisation: the alone run's wall time over this run's (1.00: no time
             lost to communication; alone runs first and last and the faster one counts;
             with --rounds R each configuration runs R times and its median run counts;
             noise on a shared machine can still push util a little above 1);
  blocked    seconds per peer spent blocked on communication (median over peers);
  compute s  seconds per peer spent in forward, backward and the inner optimizer step
             (median over peers; against alone's: how much communication slowed compute);
  loss       held-out loss of the global weights after the same tokens;
  vs ddp     this loss over ddp's at the same rate (1.03: 3 % worse).
Goals (issue 11), printed MET or MISSED: at 100 Mbit/s overlap keeps util >= 0.95 where ddp is
far lower, with loss within 3 % of ddp's.  Beside them: the slowest mode and the geometric
mean of util.  --plot writes the held-out loss against wall-clock time (matplotlib, optional).
"""
import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

from commlib import paths

MODES = ("ddp", "diloco", "overlap", "streaming", "co2")


def example_path():
    """The training example: the installed copy, or the checkout's."""
    installed = os.path.join(paths.PACKAGE_DIR, "_src", "diloco_train.py")
    if os.path.exists(installed):
        return installed
    here = os.path.join(os.path.dirname(paths.PACKAGE_DIR), "examples", "diloco_train.py")
    if os.path.exists(here):
        return here
    raise FileNotFoundError("diloco_train.py is missing: reinstall commlib (`pip install .`)")


def run_one(opts, mode, rate, workdir):
    """One elastic-run of the example; returns the peers' figures (dicts) or raises."""
    out = os.path.join(workdir, f"{mode}-{rate}-{{index}}.json")
    args = ["--mode", "diloco" if mode == "alone" else mode, "--steps", str(opts.steps),
            "--sync-every", str(opts.sync_every), "--fragments", str(opts.fragments), "--threads", str(opts.threads),
            "--dim", str(opts.dim), "--layers", str(opts.layers), "--batch", str(opts.batch),
            "--context", str(opts.context), "--corpus-mb", str(opts.corpus_mb), "--device", "cpu", "--json", out]
    if opts.pin:
        args.append("--pin")
    if mode == "overlap":
        args += ["--delay", str(opts.overlap_delay)]
    elif mode == "streaming" and opts.delay is not None:
        args += ["--delay", str(opts.delay)]
    if mode == "alone":
        args.append("--no-comm")
    elif mode != "ddp" and opts.quantize != "none":
        args += ["--quantize", opts.quantize]
    env = dict(os.environ, COMMLIB_ELASTIC_QUIET="1", OMP_NUM_THREADS=str(opts.threads),
               COMMLIB_ELASTIC_RATE_MBIT=str(rate), COMMLIB_ELASTIC_LATENCY_MS=str(opts.latency_ms))
    cmd = [sys.executable, "-m", "commlib", "elastic-run", "-n", str(opts.peers), example_path(), *args]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=opts.timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} at {rate} Mbit/s failed (exit {proc.returncode}):\n"
                           + (proc.stdout + proc.stderr)[-3000:])
    figures = []
    for i in range(opts.peers):
        with open(out.replace("{index}", str(i))) as f:
            figures.append(json.load(f))
    return figures, time.monotonic() - start


def summarise(figures, opts):
    seconds = max(f["seconds"] for f in figures)
    tokens = sum(f["tokens"] for f in figures)
    peer0 = next(f for f in figures if f["index"] == "0")
    return {"seconds": seconds, "tokens_per_second": tokens / seconds,
            "blocked": statistics.median(f["comm_seconds"] for f in figures),
            "compute": statistics.median(f.get("compute_seconds", 0.0) for f in figures),
            "loss": peer0["final_loss"], "first_loss": peer0["first_loss"], "curve": peer0["curve"],
            "failures": max(f["failures"] for f in figures), "divergences": sum(f["divergences"] for f in figures)}


def parse(argv):
    p = argparse.ArgumentParser(prog="commlib bench diloco", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peers", type=int, default=4)
    p.add_argument("--rates", default="100,1000", help="Mbit/s per peer, comma separated (0: unthrottled)")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--steps", type=int, default=900)
    p.add_argument("--sync-every", type=int, default=25)
    p.add_argument("--fragments", type=int, default=4)
    p.add_argument("--delay", type=int, default=None, help="streaming: steps of overlap (default sync_every // fragments)")
    p.add_argument("--overlap-delay", type=int, default=8,
                   help="overlap: steps the outer all-reduce has before it is applied (sync_every: one outer step late)")
    p.add_argument("--quantize", choices=("none", "uint8", "uint4"), default="none")
    p.add_argument("--latency-ms", type=float, default=0.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--pin", action="store_true", help="pin peer i to its own --threads cores (less noise)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--corpus-mb", type=float, default=2.0)
    p.add_argument("--rounds", type=int, default=1, help="runs per configuration (the median run is kept)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    p.add_argument("--quick", action="store_true", help="2 peers, 60 steps, sync every 15, a small model")
    p.add_argument("--alone-runs", type=int, default=2, help="no-communication runs (first and last; the fastest counts)")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--csv", metavar="FILE")
    p.add_argument("--plot", metavar="FILE.png")
    opts = p.parse_args(argv)
    if opts.quick:
        opts.peers, opts.steps, opts.sync_every, opts.dim, opts.corpus_mb = 2, 60, 15, 64, 0.5
        opts.overlap_delay = min(opts.overlap_delay, opts.sync_every)
    opts.rates = [int(r) for r in opts.rates.split(",") if r != ""]
    opts.modes = [m for m in opts.modes.split(",") if m]
    bad = [m for m in opts.modes if m not in MODES]
    if bad:
        p.error(f"unknown modes {bad} (known: {', '.join(MODES)})")
    if opts.peers < 2:
        p.error("--peers must be at least 2")
    return opts


def main(argv=None):
    opts = parse(sys.argv[1:] if argv is None else argv)
    results, rows = {}, []
    with tempfile.TemporaryDirectory(prefix="commlib-bench-diloco-") as workdir:
        try:
            alone_runs = []

            def run_alone():
                r = summarise(run_one(opts, "alone", 0, workdir)[0], opts)
                alone_runs.append(r)
                print(f"alone (no communication): {r['seconds']:.2f} s for {opts.steps} steps "
                      f"({r['compute']:.2f} s computing), "
                      f"{r['tokens_per_second']:.0f} tokens/s, loss {r['first_loss']:.4f} -> {r['loss']:.4f} "
                      "(each peer on its own data)", flush=True)
            run_alone()
            runs = {}
            for round_ in range(opts.rounds):  # the configurations take turns (against drift)
                for rate in opts.rates:
                    for mode in opts.modes:
                        figures, wall = run_one(opts, mode, rate, workdir)
                        r = summarise(figures, opts)
                        runs.setdefault((rate, mode), []).append(r)
                        print(f"  {rate:>5} Mbit/s  {mode:<9} {r['seconds']:7.2f} s  loss {r['loss']:.4f}  "
                              f"({wall:.0f} s with start-up)", flush=True)
            for _ in range(opts.alone_runs - 1):
                run_alone()  # before and after: the machine's drift shows in the spread
            alone = min(alone_runs, key=lambda r: r["seconds"])  # the faster: util is not flattered
            for key, rs in runs.items():
                r = sorted(rs, key=lambda r: r["seconds"])[len(rs) // 2]  # the median run
                r["util"] = alone["seconds"] / r["seconds"]
                results[key] = r
        except (RuntimeError, subprocess.TimeoutExpired, OSError) as e:
            print(f"commlib bench diloco: {e}", file=sys.stderr)
            return 2
    print()
    print(f"{opts.peers} peers, {opts.steps} inner steps of {opts.batch}x{opts.context} tokens each, sync every "
          f"{opts.sync_every}, quantize {opts.quantize}, latency {opts.latency_ms} ms, {opts.threads} thread(s)/peer")
    header = (f"{'Mbit/s':>7} {'mode':<10} {'tokens/s':>9} {'util':>5} {'blocked s':>9} {'compute s':>9} {'loss':>7} "
              f"{'vs ddp':>7}")
    print(header)
    print("-" * len(header))
    for (rate, mode), r in results.items():
        base = results.get((rate, "ddp"))
        vs = r["loss"] / base["loss"] if base else float("nan")
        r["loss_vs_ddp"] = vs
        print(f"{rate if rate else 'off':>7} {mode:<10} {r['tokens_per_second']:9.0f} {r['util']:5.2f} "
              f"{r['blocked']:9.2f} {r['compute']:9.2f} {r['loss']:7.4f} {vs:7.3f}")
        rows.append({"rate_mbit": rate, "mode": mode, "tokens_per_second": round(r["tokens_per_second"], 1),
                     "util": round(r["util"], 4), "blocked_seconds": round(r["blocked"], 3),
                     "compute_seconds": round(r["compute"], 3),
                     "loss": r["loss"], "loss_vs_ddp": vs, "seconds": r["seconds"], "failures": r["failures"],
                     "divergences": r["divergences"]})
    utils = [r["util"] for r in results.values()]
    if utils:
        slowest = min(results.items(), key=lambda kv: kv[1]["util"])
        print(f"geomean util {math.exp(sum(map(math.log, utils)) / len(utils)):.2f}; slowest: "
              f"{slowest[0][1]} at {slowest[0][0]} Mbit/s, util {slowest[1]['util']:.2f}")
    goal = None
    if (100, "overlap") in results and (100, "ddp") in results:
        o, d = results[(100, "overlap")], results[(100, "ddp")]
        met = o["util"] >= 0.95 and o["loss_vs_ddp"] <= 1.03
        goal = {"overlap_util": o["util"], "ddp_util": d["util"], "loss_vs_ddp": o["loss_vs_ddp"], "met": met}
        print(f"goal at 100 Mbit/s: overlap util {o['util']:.2f} (>= 0.95), ddp util {d['util']:.2f}, "
              f"overlap loss / ddp loss {o['loss_vs_ddp']:.3f} (<= 1.03): {'MET' if met else 'MISSED'}")
    if any(r["divergences"] for r in results.values()):
        print("state parity: a member diverged in some run (see the json)")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"options": {k: v for k, v in vars(opts).items()}, "alone": alone_runs, "rows": rows, "goal": goal,
                       "curves": {f"{mode}@{rate}": r["curve"] for (rate, mode), r in results.items()}}, f, indent=1)
    if opts.csv:
        with open(opts.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["mode"])
            w.writeheader()
            w.writerows(rows)
    if opts.plot:
        plot(opts.plot, results, alone)
    return 1 if any(r["divergences"] for r in results.values()) else 0


def plot(path, results, alone):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot: matplotlib is not installed (pip install matplotlib); no plot written", file=sys.stderr)
        return
    rates = sorted({rate for rate, _ in results})
    fig, axes = plt.subplots(1, len(rates), figsize=(6 * len(rates), 4), squeeze=False)
    for ax, rate in zip(axes[0], rates):
        for (r, mode), res in results.items():
            if r == rate and res["curve"]:
                ax.plot([c[0] for c in res["curve"]], [c[2] for c in res["curve"]], label=mode)
        ax.set_title(f"{rate} Mbit/s per peer" if rate else "unthrottled")
        ax.set_xlabel("wall-clock seconds")
        ax.set_ylabel("held-out loss")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"plot: {path}")


if __name__ == "__main__":
    sys.exit(main())
