"""`commlib bench pipeline`: fused producer -> collective pipelines (collectives.overlap,
T3 in software) against the product and the collective done one after the other.

For each backend (numpy; torch CPU; torch CUDA when a GPU is present), rank count
(`--ranks 2,4`), operation (`--ops`) and size, on the same ranks in the same run:
  produce       the GEMM alone (a @ b into a preallocated output),
  collective    the collective alone on a buffer of the output's size,
  sequential    the GEMM, then the collective (produce-then-communicate),
  pipelined k   the fused call with k chunks (k = 1, 2, 4, 8, 16):
                  all_reduce      collectives.overlap.matmul_all_reduce(a, b, comm, k)
                  reduce_scatter  collectives.overlap.matmul_reduce_scatter(a, b, comm, k)
                  all_gather      collectives.overlap.all_gather_matmul(a, b, comm, k)
  chunked k     the k chunk products alone, without the collective (what chunking costs
                the GEMM by itself),
and derives, per k: exposed communication = pipelined - produce; hidden = 1 - exposed /
collective (the share of the collective's time that disappeared behind the GEMM); the
GEMM's slowdown under overlap = the time of the chunk products measured inside the
pipelined run (each product timed around the pipeline's own product call: perf_counter
on the CPU, CUDA events on the GPU) / produce; the speed-up = sequential / pipelined.  The
best k per size (the fastest pipelined run) and its figures go in the summary, with the
geometric mean of the best-k speed-ups and the slowest case.  Goal (issue 9), printed MET or
MISSED per case: at the best k >= 1.3x faster than sequential and <= 20 % of the
communication exposed.

Sizes.  A size "RxC" is the matrix the collective moves per rank - the M x N output of the
product for all_reduce and reduce_scatter, the M x K input for all_gather - in float32.  The
third dimension (K, resp. N) changes the GEMM's time and not the collective's, so it is
calibrated on the spot so that the GEMM takes about as long as the collective (the time of
the collective over that of a trial GEMM, scaled; two passes, each time the median of three
batches of the largest time over the ranks; clamped to --max-free, rounded to 32); "RxCxF"
gives it instead.  Both times are printed.

Timing: every figure is the mean over a batch of iterations (about --target-ms long) of the
largest time over the ranks, the median over --rounds rounds in which the methods take
turns; CUDA figures synchronize the device before and after a batch.  The ranks run under
the MPI commlib was built for with libcommlib.so preloaded (as `commlib run` does), the
collectives through collectives.mpi.MPIComm (the engine: shared memory on one node);
--threads sets the BLAS / torch threads of each rank (default: the cores per rank, less one
for the engine's thread).  Every pipelined result is compared with the sequential one
("ok": equal within float32 reassociation).  Exit status 1 when a result differed, 2 on
errors; no figure is asserted.
"""
import argparse
import csv
import json
import math
import os
import re
import statistics
import sys
import time

from commlib.bench import pass_environment, run_tagged

GOAL_SPEEDUP = 1.3      # at the best k, sequential / pipelined at least ...
GOAL_EXPOSED = 0.20     # ... and exposed / collective at most
OPS = ("all_reduce", "reduce_scatter", "all_gather")
FUSED = {"all_reduce": "matmul_all_reduce", "reduce_scatter": "matmul_reduce_scatter",
         "all_gather": "all_gather_matmul"}
BACKENDS = ("numpy", "torch", "cuda")   # cuda: torch CUDA tensors


# ----------------------------------------------------------------------------- worker

class Backend:
    """Arrays, products and timing of one backend (numpy, torch CPU, torch CUDA)."""

    def __init__(self, name, rank):
        self.name = name
        self.cuda = name == "cuda"
        if name == "numpy":
            import numpy as np
            self.np = np
        else:
            import torch
            self.torch = torch
            if self.cuda:
                self.device = torch.device("cuda", rank % torch.cuda.device_count())
                torch.cuda.set_device(self.device)
            else:
                self.device = torch.device("cpu")

    def random(self, shape, seed, scale):
        import numpy as np
        x = (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)
        if self.name == "numpy":
            return x
        return self.torch.from_numpy(x).to(self.device)

    def zeros(self, shape):
        if self.name == "numpy":
            return self.np.zeros(shape, self.np.float32)
        return self.torch.zeros(shape, dtype=self.torch.float32, device=self.device)

    def empty(self, shape):
        if self.name == "numpy":
            return self.np.empty(shape, self.np.float32)
        return self.torch.empty(shape, dtype=self.torch.float32, device=self.device)

    def matmul(self, a, b, out):
        if self.name == "numpy":
            self.np.matmul(a, b, out=out)
        else:
            self.torch.matmul(a, b, out=out)

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def max_abs(self, x):
        return float(abs(x).max()) if self.name == "numpy" else float(x.abs().max().item())

    def max_diff(self, x, y):
        return float(abs(x - y).max()) if self.name == "numpy" else float((x - y).abs().max().item())


class ProductTimer:
    """Wraps collectives.overlap._matmul_into (the pipelines' product call) to add up the
    time of the products a pipelined run makes: perf_counter around each call on the CPU,
    CUDA events on the GPU (summed after the batch)."""

    def __init__(self, overlap, backend):
        self.overlap, self.backend = overlap, backend
        self.original = getattr(overlap, "_matmul_into", None)
        if self.original is None:
            raise RuntimeError("collectives.overlap._matmul_into is gone: the benchmark times the pipelines' "
                               "products through it")
        self.total_s, self.events = 0.0, []

    def __enter__(self):
        original, backend = self.original, self.backend

        def timed(out, a, b):
            if backend.cuda:
                start = backend.torch.cuda.Event(enable_timing=True)
                end = backend.torch.cuda.Event(enable_timing=True)
                start.record()
                original(out, a, b)
                end.record()
                self.events.append((start, end))
            else:
                t0 = time.perf_counter()
                original(out, a, b)
                self.total_s += time.perf_counter() - t0
        self.overlap._matmul_into = timed
        return self

    def __exit__(self, *exc):
        self.overlap._matmul_into = self.original

    def take(self):
        """Seconds of product time since the last take (the device synchronized first)."""
        if self.events:
            self.backend.sync()
            self.total_s += sum(s.elapsed_time(e) for s, e in self.events) / 1e3
            self.events = []
        total, self.total_s = self.total_s, 0.0
        return total


class Case:
    """One (backend, op, size): the arrays and the methods, each a callable of no argument."""

    def __init__(self, be, op, comm, rows, cols, free, rank, size):
        self.be, self.op, self.comm, self.size = be, op, comm, size
        self.rows, self.cols = rows, cols
        self.build(free, rank)

    def build(self, free, rank):
        be, op, comm, size = self.be, self.op, self.comm, self.size
        self.free = free
        if op == "all_gather":
            m, k, n = self.rows, self.cols, free
        else:
            m, n, k = self.rows, self.cols, free
        self.m, self.k, self.n = m, k, n
        self.a = be.random((m, k), 100 + rank, 1.0)
        self.b = be.random((k, n), 200 + rank if op != "all_gather" else 200, 1.0 / math.sqrt(k))
        if op == "all_reduce":
            self.y = be.empty((m, n))
            self.z = be.zeros((m, n))   # the collective alone sums zeros (no growth to inf)
        elif op == "reduce_scatter":
            self.y = be.empty((m, n))
            from collectives import _arrays
            share = _arrays.rows_split(m, size)[rank]
            self.share_out = be.empty((share, n))
            self.fused_out = be.empty((share, n))
        else:
            self.g = be.empty((size, m, k))
            self.y = be.empty((size * m, n))
            self.fused_out = be.empty((size * m, n))
            comm.all_gather(self.a, out=self.g)   # produce alone multiplies what the gather brings

    # the methods
    def produce(self):
        if self.op == "all_gather":
            self.be.matmul(self.g.reshape(self.size * self.m, self.k), self.b, self.y)
        else:
            self.be.matmul(self.a, self.b, self.y)

    def collective(self):
        if self.op == "all_reduce":
            self.comm.all_reduce(self.z)
        elif self.op == "reduce_scatter":
            self.comm.reduce_scatter(self.y, out=self.share_out)
        else:
            self.comm.all_gather(self.a, out=self.g)

    def sequential(self):
        if self.op == "all_reduce":
            self.be.matmul(self.a, self.b, self.y)
            self.comm.all_reduce(self.y)
        elif self.op == "reduce_scatter":
            self.be.matmul(self.a, self.b, self.y)
            self.comm.reduce_scatter(self.y, out=self.share_out)
        else:
            self.comm.all_gather(self.a, out=self.g)
            self.be.matmul(self.g.reshape(self.size * self.m, self.k), self.b, self.y)

    def sequential_result(self):
        return self.share_out if self.op == "reduce_scatter" else self.y

    def pipelined(self, overlap, chunks):
        if self.op == "all_reduce":
            return lambda: overlap.matmul_all_reduce(self.a, self.b, self.comm, chunks=chunks, out=self.y)
        if self.op == "reduce_scatter":
            return lambda: overlap.matmul_reduce_scatter(self.a, self.b, self.comm, chunks=chunks, out=self.fused_out)
        return lambda: overlap.all_gather_matmul(self.a, self.b, self.comm, chunks=chunks, out=self.fused_out)

    def chunked(self, chunks):
        """The chunk products of the pipelined run, without the collective."""
        from collectives import _arrays
        be = self.be
        if self.op == "all_gather":
            parts = _bounds(self.m, chunks)

            def run():
                for lo, hi in parts:
                    for q in range(self.size):
                        be.matmul(self.g[q, lo:hi], self.b, self.y[q * self.m + lo:q * self.m + hi])
            return run
        if self.op == "all_reduce":
            parts = _bounds(self.m, chunks)
        else:   # chunk i of every rank's share, as matmul_reduce_scatter makes them
            parts = []
            shares, at = _arrays.rows_split(self.m, self.size), 0
            per_share = []
            for n in shares:
                per_share.append([(at + lo, at + hi) for lo, hi in _bounds(n, chunks)])
                at += n
            for i in range(chunks):
                parts += [s[i] for s in per_share]

        def run():
            for lo, hi in parts:
                if hi > lo:
                    be.matmul(self.a[lo:hi], self.b, self.y[lo:hi])
        return run


def _bounds(rows, chunks):
    from collectives import _arrays
    out, at = [], 0
    for n in _arrays.rows_split(rows, chunks):
        out.append((at, at + n))
        at += n
    return out


def run_worker(spec):
    """Every rank: the cases of spec; rank 0 prints a JSON line per case ("CASE {...}")."""
    from mpi4py import MPI
    from collectives import overlap
    from collectives.mpi import MPIComm
    world = MPI.COMM_WORLD
    rank, size = world.rank, world.size
    comm = MPIComm()
    threads = spec["threads"]
    backends = []
    for name in spec["backends"]:
        if name in ("torch", "cuda"):
            try:
                import torch
            except ImportError:
                if rank == 0:
                    print(f"NOTE torch is not installed: backend {name} skipped", flush=True)
                continue
            torch.set_num_threads(threads)
            if name == "cuda" and not torch.cuda.is_available():
                if rank == 0:
                    print("NOTE no CUDA device: backend cuda skipped", flush=True)
                continue
        backends.append(name)
    if rank == 0:
        print("META " + json.dumps({"ranks": size, "transport": comm.transport, "threads": threads,
                                    "mpi_library": " ".join(MPI.Get_library_version().split())[:200],
                                    "backends": backends}), flush=True)
    target_s = spec["target_ms"] / 1e3

    def largest(v):
        return world.allreduce(v, op=MPI.MAX)

    def batch(be, fn, iters, timer=None):
        """Mean seconds per call over iters calls, the largest over the ranks."""
        be.sync()
        world.Barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        be.sync()
        t = (time.perf_counter() - t0) / iters
        product = timer.take() / iters if timer else None
        return largest(t), (largest(product) if timer else None)

    def iterations(be, fn):
        fn()   # warm-up (first touches, the engine's buffers)
        t, _ = batch(be, fn, 1)
        lo, hi = spec["min_iters"], spec["max_iters"]
        return int(min(hi, max(lo, round(target_s / t)))) if t > 0 else hi

    for name in backends:
        be = Backend(name, rank)
        for op in spec["ops"]:
            for rows, cols, free in spec["sizes"]:
                calibrated = free is None
                case = Case(be, op, comm, rows, cols, free or spec["trial_free"], rank, size)
                note = ""
                if calibrated:
                    # GEMM time ~ free dimension; the collective's does not depend on it
                    def settled(fn):   # the median of three batches
                        n = iterations(be, fn)
                        return statistics.median(batch(be, fn, n)[0] for _ in range(3))
                    coll = settled(case.collective)
                    for _ in range(2):
                        gemm = settled(case.produce)
                        want = case.free * coll / gemm if gemm > 0 else spec["max_free"]
                        free = int(min(spec["max_free"], max(32, round(want / 32) * 32)))
                        if want > spec["max_free"]:
                            note = f"the GEMM stays shorter than the collective: clamped at --max-free {free}"
                        if free == case.free:
                            break
                        case.build(free, rank)
                # the reference: the product, then the collective
                case.sequential()
                be.sync()
                reference = case.sequential_result()
                reference = reference.copy() if name == "numpy" else reference.clone()
                scale = max(be.max_abs(reference), 1e-30)
                methods = {"produce": case.produce, "collective": case.collective, "sequential": case.sequential}
                verified = {}
                for k in spec["chunks"]:
                    fused = case.pipelined(overlap, k)
                    out = fused()
                    be.sync()
                    ok = be.max_diff(out, reference) <= 1e-4 * scale * max(1, case.k / 256)
                    verified[k] = bool(world.allreduce(ok, op=MPI.LAND))
                    methods[f"pipelined {k}"] = fused
                    methods[f"chunked {k}"] = case.chunked(k)
                iters = {m: largest(iterations(be, fn)) for m, fn in methods.items()}
                samples = {m: [] for m in methods}
                products = {k: [] for k in spec["chunks"]}
                for _ in range(spec["rounds"]):
                    for m, fn in methods.items():
                        if m.startswith("pipelined"):
                            k = int(m.split()[1])
                            with ProductTimer(overlap, be) as timer:
                                t, p = batch(be, fn, iters[m], timer)
                            products[k].append(p)
                        else:
                            t, _ = batch(be, fn, iters[m])
                        samples[m].append(t)
                med = {m: statistics.median(v) * 1e6 for m, v in samples.items()}
                if rank == 0:
                    result = {"backend": name, "op": op, "ranks": size, "rows": rows, "cols": cols,
                              "m": case.m, "n": case.n, "k_inner": case.k, "free": case.free,
                              "calibrated": calibrated, "note": note, "comm_bytes": rows * cols * 4,
                              "iters": iters, "produce_us": med["produce"], "collective_us": med["collective"],
                              "sequential_us": med["sequential"],
                              "chunks": [{"k": k, "pipelined_us": med[f"pipelined {k}"],
                                          "chunked_us": med[f"chunked {k}"],
                                          "products_in_pipeline_us": statistics.median(products[k]) * 1e6,
                                          "verified": verified[k]} for k in spec["chunks"]]}
                    print("CASE " + json.dumps(result), flush=True)
                del case
    comm.close()
    return 0


# ----------------------------------------------------------------------------- driver

def parse_size(text):
    m = re.fullmatch(r"(\d+)x(\d+)(?:x(\d+))?", text.strip())
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1 or (m.group(3) and int(m.group(3)) < 1):
        raise ValueError(f"{text!r}: sizes are ROWSxCOLS or ROWSxCOLSxFREE, e.g. 2048x2048 or 1024x1024x512")
    return [int(m.group(1)), int(m.group(2)), int(m.group(3)) if m.group(3) else None]


def int_list(text, what):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{what}: a comma-separated list of integers, not {text!r}")
    if not values or min(values) < 1:
        raise ValueError(f"{what}: positive integers, not {text!r}")
    return values


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="commlib bench pipeline",
        description="Fused GEMM -> collective pipelines (collectives.overlap) against the GEMM then the collective: "
                    "exposed communication, the share hidden, the GEMM's slowdown under overlap and the speed-up, "
                    "per chunk count.")
    p.add_argument("--ranks", default="2,4", metavar="LIST", help="rank counts (default 2,4)")
    p.add_argument("--backends", default="numpy,torch,cuda", metavar="LIST",
                   help="numpy, torch (CPU), cuda (torch CUDA, skipped without a GPU); default all")
    p.add_argument("--ops", default=",".join(OPS), metavar="LIST",
                   help="all_reduce (matmul_all_reduce), reduce_scatter (matmul_reduce_scatter), all_gather "
                        "(all_gather_matmul); default all")
    p.add_argument("--sizes", metavar="LIST",
                   help="the matrices the collective moves per rank, ROWSxCOLS (the third dimension calibrated) or "
                        "ROWSxCOLSxFREE (default 1024x1024,2048x2048,4096x4096; quick 256x256)")
    p.add_argument("--chunks", metavar="LIST", help="chunk counts (default 1,2,4,8,16; quick 1,2,4)")
    p.add_argument("--quick", action="store_true", help="one small size, k = 1, 2, 4, 2 ranks, short batches")
    p.add_argument("--target-ms", type=float, metavar="MS", help="length of one timed batch (default 100, quick 5)")
    p.add_argument("--rounds", type=int, metavar="N", help="rounds, the median is kept (default 5, quick 1)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="BLAS / torch threads per rank (default: cores / ranks - 1, at least 1)")
    p.add_argument("--max-free", type=int, default=32768, metavar="N",
                   help="calibration's upper bound for the third dimension (default 32768)")
    p.add_argument("--engine-transport", choices=("auto", "mpi"), default="auto",
                   help="COMMLIB_ENGINE_TRANSPORT of the ranks (default auto: shared memory on one node)")
    p.add_argument("--bind", default="none", metavar="POLICY",
                   help="Open MPI's --bind-to (default none); '' keeps the launcher's default")
    p.add_argument("--json", metavar="FILE", help="write the results and summary as JSON")
    p.add_argument("--csv", metavar="FILE", help="write one line per (case, k) as CSV")
    p.add_argument("--timeout", type=float, default=3600, metavar="S", help="per rank count (default 3600)")
    opts = p.parse_args(argv)
    try:
        opts.rank_list = int_list(opts.ranks if not (opts.quick and opts.ranks == "2,4") else "2", "--ranks")
        opts.chunk_list = int_list(opts.chunks or ("1,2,4" if opts.quick else "1,2,4,8,16"), "--chunks")
        sizes = opts.sizes or ("256x256" if opts.quick else "1024x1024,2048x2048,4096x4096")
        opts.size_list = [parse_size(s) for s in sizes.split(",") if s.strip()]
        if not opts.size_list:
            raise ValueError("--sizes: none given")
    except ValueError as e:
        p.error(str(e))
    opts.backend_list = [b.strip() for b in opts.backends.split(",") if b.strip()]
    opts.op_list = [o.strip() for o in opts.ops.split(",") if o.strip()]
    if not opts.backend_list or any(b not in BACKENDS for b in opts.backend_list):
        p.error(f"--backends: choose from {', '.join(BACKENDS)}")
    if not opts.op_list or any(o not in OPS for o in opts.op_list):
        p.error(f"--ops: choose from {', '.join(OPS)}")
    if opts.target_ms is None:
        opts.target_ms = 5.0 if opts.quick else 100.0
    if opts.rounds is None:
        opts.rounds = 1 if opts.quick else 5
    if opts.rounds < 1 or opts.target_ms <= 0 or (opts.threads is not None and opts.threads < 1) or opts.max_free < 32:
        p.error("--rounds, --target-ms and --threads must be positive, --max-free at least 32")
    return opts


def worker_spec(opts, ranks):
    cpus = os.cpu_count() or 1
    threads = opts.threads or max(1, cpus // ranks - 1)
    return {"backends": opts.backend_list, "ops": opts.op_list, "sizes": opts.size_list, "chunks": opts.chunk_list,
            "target_ms": opts.target_ms, "rounds": opts.rounds, "threads": threads, "max_free": opts.max_free,
            "trial_free": 256, "min_iters": 1 if opts.quick else 3, "max_iters": 20 if opts.quick else 1000}


def command_for(opts, ranks, spec):
    from commlib import paths
    from commlib.bench.pack import launch_command, launcher_kind
    mpiexec = paths.mpiexec()
    kind = launcher_kind(mpiexec)
    cmd, env = launch_command(mpiexec, kind, sys.executable,
                              ["-m", "commlib.bench.pipeline", "--worker", json.dumps(spec)],
                              paths.preload_library())
    at = cmd.index("-n") + 1
    cmd[at] = str(ranks)
    t = str(spec["threads"])
    knobs = {"OPENBLAS_NUM_THREADS": t, "OMP_NUM_THREADS": t, "MKL_NUM_THREADS": t}
    if opts.engine_transport != "auto":
        knobs["COMMLIB_ENGINE_TRANSPORT"] = opts.engine_transport
    pass_environment(cmd, at + 1, env, kind, knobs, opts.bind)
    return cmd, env, kind


def run_ranks(opts, ranks):
    spec = worker_spec(opts, ranks)
    cmd, env, kind = command_for(opts, ranks, spec)
    found, rc, err, wall = run_tagged(cmd, env, opts.timeout, ("META", "CASE", "NOTE"))
    return {"ranks": ranks, "command": cmd, "launcher": kind, "threads": spec["threads"], "returncode": rc,
            "wall_s": wall, "meta": found["META"], "notes": found["NOTE"], "cases": found["CASE"],
            "stderr_tail": err[-4000:]}


def derive(case):
    """Per k: exposed, hidden, slowdown, speed-up; the best k and the goal."""
    produce, coll, seq = case["produce_us"], case["collective_us"], case["sequential_us"]
    for c in case["chunks"]:
        c["exposed_us"] = c["pipelined_us"] - produce
        c["exposed_share"] = c["exposed_us"] / coll if coll > 0 else None
        c["hidden"] = None if c["exposed_share"] is None else 1 - c["exposed_share"]
        c["gemm_slowdown"] = c["products_in_pipeline_us"] / produce if produce > 0 else None
        c["chunking_cost"] = c["chunked_us"] / produce if produce > 0 else None
        c["speedup"] = seq / c["pipelined_us"] if c["pipelined_us"] > 0 else None
    best = min(case["chunks"], key=lambda c: c["pipelined_us"])
    case["best_k"] = best["k"]
    case["best"] = best
    case["goal_met"] = (best["speedup"] is not None and best["exposed_share"] is not None
                        and best["speedup"] >= GOAL_SPEEDUP and best["exposed_share"] <= GOAL_EXPOSED)
    case["verified"] = all(c["verified"] for c in case["chunks"])
    return case


def geomean(values):
    values = [v for v in values if v and v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def case_name(c):
    return f"{c['backend']} {c['op']} {c['ranks']} ranks {shape(c)}"


def shape(c):
    return f"{c['m']}x{c['n']}x{c['k_inner']}"


def human_bytes(n):
    return f"{n / (1 << 20):g} MiB" if n >= 1 << 20 else f"{n / 1024:g} KiB"


def summarize(cases):
    speedups = [c["best"]["speedup"] for c in cases if c["best"]["speedup"]]
    slowest = min(cases, key=lambda c: c["best"]["speedup"] or 0) if cases else None
    return {"cases": len(cases), "goal_met": sum(1 for c in cases if c["goal_met"]),
            "geomean_best_speedup": geomean(speedups),
            "slowest": None if slowest is None else {"case": case_name(slowest), "best_k": slowest["best_k"],
                                                     "speedup": slowest["best"]["speedup"],
                                                     "exposed_share": slowest["best"]["exposed_share"]},
            "unverified": [f"{case_name(c)} k={x['k']}" for c in cases for x in c["chunks"] if not x["verified"]]}


def pct(v):
    return "n/a" if v is None else f"{100 * v:.0f}%"


def times(v):
    return "n/a" if v is None else f"{v:.2f}x"


def format_case(c):
    coll = {"all_reduce": "all_reduce", "reduce_scatter": "reduce_scatter", "all_gather": "all_gather"}[c["op"]]
    dims = "M x N x K" if c["op"] != "all_gather" else "M x N x K, M rows per rank"
    head = (f"{c['backend']} {FUSED[c['op']]}, {c['ranks']} ranks, {shape(c)} ({dims}; {coll} of "
            f"{c['rows']}x{c['cols']} float32 = {human_bytes(c['comm_bytes'])}"
            f"{', K calibrated' if c['calibrated'] and c['op'] != 'all_gather' else ''}"
            f"{', N calibrated' if c['calibrated'] and c['op'] == 'all_gather' else ''}): "
            f"GEMM {c['produce_us'] / 1e3:.3f} ms, {coll} {c['collective_us'] / 1e3:.3f} ms, "
            f"GEMM then {coll} {c['sequential_us'] / 1e3:.3f} ms")
    cols = ["k", "pipelined ms", "exposed ms", "hidden", "GEMM slowdown", "chunked GEMM", "speed-up", "ok"]
    body = []
    for x in c["chunks"]:
        body.append([str(x["k"]) + (" *" if x["k"] == c["best_k"] else ""), f"{x['pipelined_us'] / 1e3:.3f}",
                     f"{x['exposed_us'] / 1e3:.3f}", pct(x["hidden"]), times(x["gemm_slowdown"]),
                     times(x["chunking_cost"]), times(x["speedup"]), "ok" if x["verified"] else "WRONG"])
    widths = [max(len(cols[i]), *(len(b[i]) for b in body)) for i in range(len(cols))]

    def fmt(cells):
        return "  " + " | ".join(s.rjust(w) for s, w in zip(cells, widths))
    b = c["best"]
    status = "MET" if c["goal_met"] else "MISSED"
    lines = [head] + ([f"  note: {c['note']}"] if c["note"] else []) + [fmt(cols)] + [fmt(x) for x in body]
    lines.append(f"  best k={c['best_k']}: {times(b['speedup'])} vs GEMM then {coll}, "
                 f"{pct(b['exposed_share'])} of the {coll} exposed - goal {status}")
    return "\n".join(lines)


def format_overview(cases):
    head = ["backend", "op", "ranks", "M x N x K", "best k", "speed-up", "exposed", "GEMM slowdown", "goal"]
    body = [[c["backend"], c["op"], str(c["ranks"]), shape(c), str(c["best_k"]), times(c["best"]["speedup"]),
             pct(c["best"]["exposed_share"]), times(c["best"]["gemm_slowdown"]),
             "MET" if c["goal_met"] else "MISSED"] for c in cases]
    widths = [max(len(head[i]), *(len(b[i]) for b in body)) if body else len(head[i]) for i in range(len(head))]

    def fmt(cells):
        return " | ".join(s.ljust(w) if i < 2 else s.rjust(w) for i, (s, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(head), "-+-".join("-" * w for w in widths)] + [fmt(b) for b in body])


def format_summary(s):
    if not s["cases"]:
        return "no case measured"
    slow = s["slowest"]
    lines = [f"best k per case: geomean speed-up {times(s['geomean_best_speedup'])} over {s['cases']} cases; slowest "
             f"{slow['case']} (k={slow['best_k']}): {times(slow['speedup'])}, {pct(slow['exposed_share'])} exposed",
             f"goal {'MET' if s['goal_met'] == s['cases'] else 'MISSED':6}  at the best k >= {GOAL_SPEEDUP:g}x faster "
             f"than the GEMM then the collective and <= {100 * GOAL_EXPOSED:g}% of the communication exposed: "
             f"{s['goal_met']} of {s['cases']} cases"]
    if s["unverified"]:
        lines.append("WRONG results (pipelined != sequential): " + ", ".join(s["unverified"]))
    return "\n".join(lines)


def write_csv(path, cases):
    fields = ["backend", "op", "ranks", "m", "n", "k_inner", "calibrated", "comm_bytes", "produce_us",
              "collective_us", "sequential_us", "chunks", "pipelined_us", "chunked_us", "products_in_pipeline_us",
              "exposed_us", "exposed_share", "hidden", "gemm_slowdown", "chunking_cost", "speedup", "verified",
              "best"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for c in cases:
            for x in c["chunks"]:
                w.writerow({**{k: c[k] for k in fields[:11]}, "chunks": x["k"],
                            **{k: x[k] for k in fields[12:22]}, "best": "yes" if x["k"] == c["best_k"] else "no"})


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        try:
            return run_worker(json.loads(argv[1]))
        except BaseException:
            # the other ranks would wait in a collective until the driver's timeout
            import traceback
            traceback.print_exc()
            sys.stderr.flush()
            from mpi4py import MPI
            MPI.COMM_WORLD.Abort(1)
    opts = parse_args(argv)
    runs = []
    try:
        for ranks in opts.rank_list:
            runs.append(run_ranks(opts, ranks))
    except (FileNotFoundError, RuntimeError) as e:
        print(f"commlib bench pipeline: {e}", file=sys.stderr)
        return 2
    cases = [derive(c) for r in runs for c in r["cases"]]
    cpus = os.cpu_count() or 1
    print("per case: GEMM alone, the collective alone, GEMM then collective; per chunk count k (collectives.overlap, "
          "pipelined): exposed = pipelined - GEMM; hidden = 1 - exposed / collective; GEMM slowdown = the chunk "
          "products' time inside the pipelined run / GEMM alone; chunked GEMM = the chunk products alone / GEMM "
          "alone; speed-up = GEMM then collective / pipelined; * = the best k; every time the largest over the ranks")
    for r in runs:
        m = r["meta"]
        if m:
            print(f"{r['ranks']} ranks: backends {', '.join(m.get('backends', [])) or 'none'}, engine transport "
                  f"{m.get('transport')}, {m.get('threads')} BLAS/torch threads per rank, {r['wall_s']:.1f} s")
        if r["ranks"] * (r["threads"] + 1) > cpus:
            print(f"note: {cpus} CPUs for {r['ranks']} ranks x ({r['threads']} compute threads + the engine's): "
                  "oversubscribed, the figures mean nothing here")
        for n in r["notes"]:
            print(f"note ({r['ranks']} ranks): {n}")
        if r["returncode"] != 0:
            print(f"commlib bench pipeline: the {r['ranks']}-rank run exited with status {r['returncode']}\n"
                  f"{r['stderr_tail']}", file=sys.stderr)
    for c in cases:
        print()
        print(format_case(c))
    summary = summarize(cases)
    if cases:
        print()
        print(format_overview(cases))
    print(format_summary(summary))
    mpi = next((r["meta"].get("mpi_library") for r in runs if r["meta"]), "unknown")
    print(f"host MPI: {' '.join(mpi.split('MPICH Release')[0].split())}; launcher {runs[0]['launcher']}; "
          f"{sum(r['wall_s'] for r in runs):.1f} s")
    result = {"benchmark": "pipeline", "quick": opts.quick, "cpus": cpus, "runs": runs, "cases": cases,
              "summary": summary, "goal": {"speedup": GOAL_SPEEDUP, "exposed_share": GOAL_EXPOSED}}
    if opts.csv:
        write_csv(opts.csv, cases)
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
    if any(r["returncode"] != 0 for r in runs) or not cases:
        return 2
    return 1 if summary["unverified"] else 0


if __name__ == "__main__":
    sys.exit(main())
