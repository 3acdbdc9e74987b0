"""`commlib bench ddp`: torch DistributedDataParallel training steps over the "commlib"
torch.distributed backend (collectives.torch) against gloo (and NCCL on a GPU), side by side
in the same run.

    commlib bench ddp [--worlds 2,4] [--models transformer,mlp] [--backends commlib,gloo]
                      [--steps 20] [--warmup 3] [--rounds 1] [--threads N] [--bucket-mb 25] [--quick]
                      [--json F] [--csv F]
    commlib bench ddp --device cuda [--backends commlib,gloo,nccl]   # on a GPU machine
    commlib bench ddp --tf-layers 12 --tf-dim 768 --tf-ff 3072 --mlp-width 4096   # other sizes

Models (float32, SGD, MSE against a fixed random target, the same seed on every rank, each
rank its own fixed random batch):
  transformer  nn.TransformerEncoder: --tf-layers 6 layers of d_model --tf-dim 512, --tf-heads
               8 heads, feed-forward --tf-ff 2048, no dropout; a batch of --tf-batch 8
               sequences of --tf-seq 32 tokens (18.9 M parameters: 76 MB of gradients);
  mlp          --mlp-depth 4 layers Linear(--mlp-width 2048) + ReLU; a batch of --mlp-batch 32
               (16.8 M parameters: 67 MB of gradients).
Backends: each one is a separate mpiexec launch of the same worker (`--worker`), libcommlib.so
preloaded into the ranks as `commlib run` does (the collective engine's thread starts at its
first operation, so the gloo and NCCL runs carry no commlib thread); only the name given to
init_process_group differs.  `import collectives.torch` fills RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT from MPI in every run, so init_process_group("commlib" | "gloo" | "nccl") takes no
arguments.  --device cuda: the model on GPU local_rank % device count; commlib moves the CUDA
tensors over an MPI that need not be CUDA-aware, gloo takes CUDA tensors itself, NCCL is the
reference (only where every rank has a GPU of its own).

Per (model, world size, backend):
  step      one DDP training step (zero_grad, forward, backward - during which DDP all-reduces
            its gradient buckets, --bucket-mb - and the optimizer step): the median over
            --steps timed steps after --warmup untimed ones, the slowest rank's median; the
            ranks meet in an MPI barrier before every timed step (CUDA: the device is
            synchronized before and after it);
  compute   the same step of the same model with no communication at all: a copy of the plain
            module (taken before DDP wraps it) and its own optimizer, the same batch, timed the
            same way and alternating step by step with the DDP steps in the same process.
            The plain module rather than DDP under no_sync(): no_sync() still runs DDP's
            forward bookkeeping and gradient hooks, the plain module is what one process
            without data parallelism runs, so everything DDP adds counts as communication;
  exposed   step - compute: the communication backward did not hide (and DDP's own overhead);
  comm      exposed / step: the fraction of the step spent communicating;
  vs gloo   gloo's step / this backend's step (> 1: faster than gloo), same model and world.
--rounds N launches every backend N times, the backends taking turns, and keeps the medians of
the step and compute times over the rounds (against drift on a shared machine).
Goal (issue 10), per model, printed MET, MISSED or NOT APPLICABLE: the DDP step >= 1.5x faster
than gloo on CPU at 4 ranks where gloo spends >= 30 % of its step communicating (not
applicable when gloo communicates less, on a GPU, or without a 4-rank run).  Beside it: the
geometric mean of commlib's speed-ups over every (model, world) and the slowest one.

Threads: with N ranks on C cores (the cores this process may run on) every rank sets
torch.set_num_threads(max(1, C // N)) (and OMP/MKL/OpenBLAS_NUM_THREADS to the same), so that
the ranks' compute does not oversubscribe the cores; --threads overrides.  The backends' own
threads (commlib's engine and completion threads, gloo's) come on top.

Parity: after the last step every rank takes a float64 checksum of its parameters (sum, sum of
absolute values, sum weighted by position), all-gathers it through the backend under test and
compares, and compares the SHA-256 of its parameter bytes over MPI; since every rank trains on
different data, parameters that stayed equal show that the gradients were all-reduced.  The
table's "parity" column says "ok" when both agree on every rank and the parameters moved
from their initial values; the checksums of the backends are compared too (equal up to the
order of float32 summation).  Exit status 1 when parity failed, 2 on errors; no figure is
asserted.  `--quick`: tiny models, 3 steps, 2 ranks (a check that everything works, < 60 s).
"""
import argparse
import csv
import json
import math
import os
import statistics
import sys
import time

from commlib.bench import pass_environment, run_tagged

BACKENDS = ("commlib", "gloo", "nccl")
MODELS = ("transformer", "mlp")
BASELINE = "gloo"
GOAL_SPEEDUP = 1.5       # issue 10: commlib's DDP step >= 1.5x faster than gloo's ...
GOAL_WORLD = 4           # ... on CPU at 4 ranks ...
GOAL_GLOO_COMM = 0.30    # ... where gloo spends >= 30 % of its step communicating


# ----------------------------------------------------------------------------- worker

def build_model(name, cfg, torch):
    """(module, input, target factory) of one model; the module from the common seed."""
    nn = torch.nn
    torch.manual_seed(cfg["seed"])
    if name == "transformer":
        layer = nn.TransformerEncoderLayer(cfg["dim"], cfg["heads"], dim_feedforward=cfg["ff"], dropout=0.0,
                                           batch_first=True)
        model = nn.TransformerEncoder(layer, cfg["layers"], enable_nested_tensor=False)
        shape = (cfg["batch"], cfg["seq"], cfg["dim"])
    elif name == "mlp":
        layers = []
        for _ in range(cfg["depth"]):
            layers += [nn.Linear(cfg["width"], cfg["width"]), nn.ReLU()]
        model = nn.Sequential(*layers[:-1])  # no ReLU on the output
        shape = (cfg["batch"], cfg["width"])
    else:
        raise ValueError(f"unknown model {name!r}")
    return model, shape


def run_model(name, cfg, spec, torch, dist, world, device):
    """Times one model's compute-only and DDP steps on every rank; rank 0 gets the record."""
    import copy
    import hashlib
    import numpy as np
    from mpi4py import MPI
    rank, size = world.rank, world.size
    cuda = device.type == "cuda"
    model, shape = build_model(name, cfg, torch)
    model = model.to(device)
    plain = copy.deepcopy(model)  # the compute-only step: no DDP, no communication
    initial = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).cpu().clone()
    ddp = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if cuda else None, bucket_cap_mb=spec["bucket_mb"])
    gen = torch.Generator().manual_seed(cfg["seed"] + 1000 + rank)  # each rank its own batch
    x = torch.randn(shape, generator=gen).to(device)
    y = torch.randn(shape, generator=gen).to(device)
    opt_ddp = torch.optim.SGD(ddp.parameters(), lr=spec["lr"])
    opt_plain = torch.optim.SGD(plain.parameters(), lr=spec["lr"])
    loss_fn = torch.nn.functional.mse_loss

    def step(m, opt):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(m(x), y)
        loss.backward()
        opt.step()
        return loss

    def timed(m, opt):
        world.Barrier()
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        step(m, opt)
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    for _ in range(spec["warmup"]):
        step(plain, opt_plain)
        step(ddp, opt_ddp)
    if cuda:
        torch.cuda.synchronize(device)
    compute, ddp_times = [], []
    for _ in range(spec["steps"]):  # alternating, so that drift hits both alike
        compute.append(timed(plain, opt_plain))
        ddp_times.append(timed(ddp, opt_ddp))

    # parity: a checksum all-gathered through the backend under test, the bytes' SHA-256 over MPI
    flat = torch.cat([p.detach().reshape(-1) for p in ddp.module.parameters()]).cpu()
    f64 = flat.double()
    weights = torch.arange(1, f64.numel() + 1, dtype=torch.float64) / f64.numel()
    checksum = torch.tensor([float(f64.sum()), float(f64.abs().sum()), float((f64 * weights).sum())],
                            dtype=torch.float64, device=device)
    gathered = [torch.zeros_like(checksum) for _ in range(size)]
    dist.all_gather(gathered, checksum)
    checksums_equal = all(torch.equal(g, checksum) for g in gathered)
    digest = hashlib.sha256(np.ascontiguousarray(flat.numpy()).tobytes()).hexdigest()
    digests = world.allgather(digest)
    equal_everywhere = world.allreduce(bool(checksums_equal), op=MPI.LAND)
    moved_everywhere = world.allreduce(not torch.equal(flat, initial), op=MPI.LAND)

    medians = world.gather((statistics.median(ddp_times), statistics.median(compute)), root=0)
    record = None
    if rank == 0:
        params = sum(p.numel() for p in ddp.module.parameters())
        record = {
            "model": name, "config": cfg, "params": params, "grad_bytes": params * 4,
            "step_s": max(m[0] for m in medians), "compute_s": max(m[1] for m in medians),
            "rank_step_s": [m[0] for m in medians], "rank_compute_s": [m[1] for m in medians],
            "checksum": [float(v) for v in checksum.cpu()],
            "parity": {"checksums_equal": equal_everywhere, "bitwise_equal": len(set(digests)) == 1,
                       "moved": moved_everywhere, "sha256": digest[:16],
                       "ok": equal_everywhere and moved_everywhere and len(set(digests)) == 1},
        }
    del ddp, opt_ddp, opt_plain, plain, model
    import gc
    gc.collect()
    return record


def run_worker(spec):
    """Every rank: init_process_group(spec backend), then each model; rank 0 prints META and a
    MODEL line per model (JSON)."""
    import torch
    import torch.distributed as dist
    import collectives.torch  # noqa: F401 - under mpiexec: RANK, WORLD_SIZE, MASTER_ADDR/PORT from MPI
    from mpi4py import MPI
    world = MPI.COMM_WORLD
    rank = world.rank
    torch.set_num_threads(spec["threads"])
    backend = spec["backend"]
    if spec["device"] == "cuda":
        local = int(os.environ.get("LOCAL_RANK", rank))
        device = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend)
    transport = None
    if backend == "commlib":
        # ProcessGroupCommlib is a ProcessGroup: torch makes it the group itself (there is no
        # per-device backend to _get_backend)
        pg = dist.distributed_c10d._get_default_group()
        transport = getattr(getattr(pg, "comm", None), "transport", None)
    if rank == 0:
        print("META " + json.dumps({
            "ranks": world.size, "backend": backend, "device": str(device), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "transport": transport,
            "mpi_library": " ".join(MPI.Get_library_version().split())[:200]}), flush=True)
    for name in spec["models"]:
        record = run_model(name, spec["configs"][name], spec, torch, dist, world, device)
        if rank == 0:
            print("MODEL " + json.dumps(record), flush=True)
    dist.destroy_process_group()
    return 0


# ----------------------------------------------------------------------------- driver

def int_list(text, what):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{what}: a comma-separated list of integers, not {text!r}")
    if not values or min(values) < 1:
        raise ValueError(f"{what}: positive integers, not {text!r}")
    return values


QUICK = {"transformer": {"layers": 2, "dim": 64, "heads": 4, "ff": 128, "seq": 16, "batch": 4},
         "mlp": {"depth": 3, "width": 256, "batch": 16}}
DEFAULT = {"transformer": {"layers": 6, "dim": 512, "heads": 8, "ff": 2048, "seq": 32, "batch": 8},
           "mlp": {"depth": 4, "width": 2048, "batch": 32}}
MODEL_ARGS = {"transformer": {"layers": "tf_layers", "dim": "tf_dim", "heads": "tf_heads", "ff": "tf_ff",
                              "seq": "tf_seq", "batch": "tf_batch"},
              "mlp": {"depth": "mlp_depth", "width": "mlp_width", "batch": "mlp_batch"}}


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="commlib bench ddp",
        description="DistributedDataParallel step time of a transformer and an MLP over the commlib torch backend "
                    "against gloo (and NCCL with --device cuda), in the same run: step, compute-only step, exposed "
                    "communication, its share, the speed-up over gloo, and parameter parity across ranks.")
    p.add_argument("--worlds", metavar="LIST", help="world sizes (default 2,4; quick 2)")
    p.add_argument("--models", default=",".join(MODELS), metavar="LIST", help="transformer, mlp (default both)")
    p.add_argument("--backends", metavar="LIST",
                   help="commlib, gloo, nccl (default commlib,gloo; with --device cuda commlib,gloo,nccl); gloo is "
                        "the baseline of the ratios")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the model lives (default cpu)")
    p.add_argument("--steps", type=int, help="timed steps per model (default 20; quick 3)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 3; quick 2)")
    p.add_argument("--rounds", type=int, default=1, metavar="N",
                   help="launch every backend N times, taking turns; the medians over the rounds (default 1)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="torch threads per rank (default max(1, cores // ranks))")
    p.add_argument("--bucket-mb", type=float, default=25.0, metavar="MB", help="DDP's bucket_cap_mb (default 25)")
    p.add_argument("--lr", type=float, default=1e-3, help="SGD learning rate (default 1e-3)")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("model sizes (defaults: see the module help; --quick makes them tiny)")
    for arg, what in (("--tf-layers", "encoder layers"), ("--tf-dim", "d_model"), ("--tf-heads", "attention heads"),
                      ("--tf-ff", "feed-forward width"), ("--tf-seq", "tokens per sequence"),
                      ("--tf-batch", "sequences per rank"), ("--mlp-depth", "linear layers"),
                      ("--mlp-width", "width"), ("--mlp-batch", "rows per rank")):
        g.add_argument(arg, type=int, metavar="N", help=f"{arg[2:4] == 'tf' and 'transformer' or 'MLP'}: {what}")
    p.add_argument("--quick", action="store_true", help="tiny models, 3 timed steps, 2 ranks (< 60 s)")
    p.add_argument("--bind", default="none", metavar="POLICY",
                   help="Open MPI's --bind-to (default none: its default binds a rank to one core); '' keeps the "
                        "launcher's default")
    p.add_argument("--json", metavar="FILE", help="write the results and summary as JSON")
    p.add_argument("--csv", metavar="FILE", help="write one line per (model, world, backend) as CSV")
    p.add_argument("--timeout", type=float, metavar="S", help="per launch (default 1800; quick 300)")
    opts = p.parse_args(argv)
    try:
        opts.world_list = int_list(opts.worlds or ("2" if opts.quick else "2,4"), "--worlds")
    except ValueError as e:
        p.error(str(e))
    if min(opts.world_list) < 2:
        p.error("--worlds: at least 2 ranks")
    opts.model_list = [m.strip() for m in opts.models.split(",") if m.strip()]
    if not opts.model_list or any(m not in MODELS for m in opts.model_list):
        p.error(f"--models: choose from {', '.join(MODELS)}")
    default_backends = "commlib,gloo,nccl" if opts.device == "cuda" else "commlib,gloo"
    opts.backend_list = [b.strip() for b in (opts.backends or default_backends).split(",") if b.strip()]
    if not opts.backend_list or any(b not in BACKENDS for b in opts.backend_list):
        p.error(f"--backends: choose from {', '.join(BACKENDS)}")
    if "nccl" in opts.backend_list and opts.device != "cuda":
        p.error("--backends nccl needs --device cuda")
    # the baseline first, so that its figures are there when the others' ratios are printed
    opts.backend_list.sort(key=lambda b: (b != BASELINE, BACKENDS.index(b)))
    opts.steps = opts.steps if opts.steps is not None else 3 if opts.quick else 20
    opts.warmup = opts.warmup if opts.warmup is not None else 2 if opts.quick else 3
    opts.timeout = opts.timeout if opts.timeout is not None else 300 if opts.quick else 1800
    if (opts.steps < 1 or opts.rounds < 1 or opts.warmup < 0 or (opts.threads is not None and opts.threads < 1)
            or opts.bucket_mb <= 0):
        p.error("--steps, --rounds and --threads must be positive, --warmup at least 0, --bucket-mb positive")
    opts.configs = {}
    for name in MODELS:
        cfg = dict(QUICK[name] if opts.quick else DEFAULT[name])
        for key, attr in MODEL_ARGS[name].items():
            value = getattr(opts, attr)
            if value is not None:
                if value < 1:
                    p.error(f"--{attr.replace('_', '-')} must be positive")
                cfg[key] = value
        cfg["seed"] = opts.seed
        opts.configs[name] = cfg
    tf = opts.configs["transformer"]
    if "transformer" in opts.model_list and tf["dim"] % tf["heads"]:
        p.error(f"--tf-dim {tf['dim']} is not a multiple of --tf-heads {tf['heads']}")
    return opts


def cores():
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def worker_spec(opts, world, backend):
    threads = opts.threads or max(1, cores() // world)
    return {"backend": backend, "device": opts.device, "models": opts.model_list,
            "configs": {m: opts.configs[m] for m in opts.model_list}, "steps": opts.steps, "warmup": opts.warmup,
            "threads": threads, "bucket_mb": opts.bucket_mb, "lr": opts.lr}


def command_for(opts, world, spec):
    """The mpiexec command that runs the worker on `world` ranks, libcommlib.so preloaded (as
    `commlib run` does), and its environment."""
    from commlib import paths
    from commlib.bench.pack import launch_command, launcher_kind
    mpiexec = paths.mpiexec()
    kind = launcher_kind(mpiexec)
    cmd, env = launch_command(mpiexec, kind, sys.executable,
                              ["-m", "commlib.bench.ddp", "--worker", json.dumps(spec)], paths.preload_library())
    at = cmd.index("-n") + 1
    cmd[at] = str(world)
    t = str(spec["threads"])
    pass_environment(cmd, at + 1, env, kind, {"OMP_NUM_THREADS": t, "MKL_NUM_THREADS": t, "OPENBLAS_NUM_THREADS": t},
                     opts.bind)
    return cmd, env, kind


def run_launch(opts, world, backend):
    """One mpiexec launch: every model on `world` ranks over `backend`."""
    spec = worker_spec(opts, world, backend)
    cmd, env, kind = command_for(opts, world, spec)
    found, rc, err, wall = run_tagged(cmd, env, opts.timeout, ("META", "MODEL", "NOTE"))
    return {"world": world, "backend": backend, "command": cmd, "launcher": kind, "threads": spec["threads"],
            "returncode": rc, "wall_s": wall, "meta": found["META"], "models": found["MODEL"], "notes": found["NOTE"],
            "stderr_tail": err[-4000:]}


def skip_reason(opts, world, backend):
    """Why a backend cannot run here (None: it can)."""
    if backend not in ("nccl",) and opts.device != "cuda":
        return None
    try:
        import torch
        import torch.distributed as dist
    except ImportError:
        return "torch is not installed"
    if opts.device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    if backend == "nccl":
        if not dist.is_nccl_available():
            return "this torch has no NCCL"
        if torch.cuda.device_count() < world:
            return f"{torch.cuda.device_count()} GPU(s) for {world} ranks (NCCL needs a GPU per rank)"
    return None


def geomean(values):
    values = [v for v in values if v and v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def combine(recs):
    """One backend's figures for one (model, world) from its rounds: the medians of the step and
    compute times over the rounds; parity must hold in every round."""
    step = statistics.median(r["step_s"] for r in recs)
    compute = statistics.median(r["compute_s"] for r in recs)
    parity = {k: all(r["parity"][k] for r in recs) for k in ("checksums_equal", "bitwise_equal", "moved", "ok")}
    parity["sha256"] = recs[0]["parity"]["sha256"]
    return {"step_s": step, "compute_s": compute, "exposed_s": step - compute,
            "comm_share": (step - compute) / step if step > 0 else None, "parity": parity,
            "checksum": recs[0]["checksum"],
            "rounds": [{k: r[k] for k in ("step_s", "compute_s", "rank_step_s", "rank_compute_s")} for r in recs]}


def derive(runs, opts):
    """Cases: one per (model, world), with each backend's figures and the ratios to gloo."""
    cases = []
    for name in opts.model_list:
        for world in opts.world_list:
            recs = {}
            for r in runs:
                rec = next((m for m in r["models"] if m["model"] == name), None)
                if r["world"] == world and rec is not None:
                    recs.setdefault(r["backend"], []).append(rec)
            if not recs:
                continue
            per = {b: combine(rs) for b, rs in recs.items()}
            params = next(iter(recs.values()))[0]["params"]
            base = per.get(BASELINE)
            for b, x in per.items():
                x["vs_gloo"] = (base["step_s"] / x["step_s"] if base and b != BASELINE and x["step_s"] > 0
                                else None)
                # the backends' parameters after the same steps: equal up to float32 summation order
                x["checksum_rel_diff_vs_gloo"] = (
                    max(abs(a - c) / max(abs(c), 1e-30) for a, c in zip(x["checksum"], base["checksum"]))
                    if b != BASELINE and base else None)
            cases.append({"model": name, "ranks": world, "params": params, "grad_bytes": params * 4,
                          "backends": per})
    return cases


def goal_for(cases, model, device):
    """MET / MISSED / NOT APPLICABLE for one model, and why."""
    c = next((c for c in cases if c["model"] == model and c["ranks"] == GOAL_WORLD), None)
    if device != "cpu":
        return "NOT APPLICABLE", "the goal is for CPU"
    if c is None:
        return "NOT APPLICABLE", f"no {GOAL_WORLD}-rank run"
    gloo, mine = c["backends"].get(BASELINE), c["backends"].get("commlib")
    if gloo is None or mine is None:
        return "NOT APPLICABLE", f"{'gloo' if gloo is None else 'commlib'} not measured at {GOAL_WORLD} ranks"
    share, speedup = gloo["comm_share"], mine["vs_gloo"]
    why = f"{GOAL_WORLD} ranks: {times(speedup)}, gloo communicating {pct(share)} of its step"
    if share is None or share < GOAL_GLOO_COMM:
        return "NOT APPLICABLE", why
    return ("MET" if speedup is not None and speedup >= GOAL_SPEEDUP else "MISSED"), why


def summarize(cases, opts):
    out = {"backends": {}, "goals": {}, "parity_failed": []}
    for b in opts.backend_list:
        if b == BASELINE:
            continue
        ratios = [(c["backends"][b]["vs_gloo"], c) for c in cases
                  if b in c["backends"] and c["backends"][b]["vs_gloo"]]
        if ratios:
            slow_ratio, slow = min(ratios, key=lambda rc: rc[0])
            out["backends"][b] = {"geomean_vs_gloo": geomean([r for r, _ in ratios]), "cases": len(ratios),
                                  "slowest": {"model": slow["model"], "ranks": slow["ranks"], "vs_gloo": slow_ratio}}
    for m in opts.model_list:
        status, why = goal_for(cases, m, opts.device)
        out["goals"][m] = {"status": status, "detail": why}
    out["parity_failed"] = [f"{c['model']} {c['ranks']} ranks {b}" for c in cases for b, x in c["backends"].items()
                            if not x["parity"]["ok"]]
    return out


def pct(v):
    return "n/a" if v is None else f"{100 * v:.0f}%"


def times(v):
    return "n/a" if v is None else f"{v:.2f}x"


def human_bytes(n):
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n / 1024:.0f} KiB"


TABLE_HEAD = ["model", "ranks", "backend", "step ms", "compute ms", "exposed ms", "comm", "vs gloo", "parity"]


def parity_cell(p):
    if p["ok"]:
        return "ok"
    why = []
    if not p["checksums_equal"]:
        why.append("checksums differ")
    if not p["moved"]:
        why.append("parameters did not move")
    if not p["bitwise_equal"]:
        why.append("bytes differ")
    return "FAILED: " + ", ".join(why)


def format_table(cases):
    body = []
    for c in cases:
        first = True
        for b, x in c["backends"].items():
            cells = [c["model"], str(c["ranks"])] if first else ["", ""]
            first = False
            body.append(cells + [b, f"{x['step_s'] * 1e3:.2f}", f"{x['compute_s'] * 1e3:.2f}",
                                 f"{x['exposed_s'] * 1e3:.2f}", pct(x["comm_share"]),
                                 times(x["vs_gloo"]) if b != BASELINE else "-", parity_cell(x["parity"])])
    widths = [max(len(TABLE_HEAD[i]), *(len(row[i]) for row in body)) if body else len(TABLE_HEAD[i])
              for i in range(len(TABLE_HEAD))]

    def fmt(cells):
        return " | ".join(s.ljust(w) if i in (0, 2, 8) else s.rjust(w)
                          for i, (s, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([fmt(TABLE_HEAD), "-+-".join("-" * w for w in widths)] + [fmt(row) for row in body])


def format_summary(summary, cases, opts):
    lines = []
    for b, s in summary["backends"].items():
        slow = s["slowest"]
        lines.append(f"{b} vs gloo (gloo's step / {b}'s): geomean {times(s['geomean_vs_gloo'])} over {s['cases']} "
                     f"case{'s' if s['cases'] != 1 else ''}; slowest {times(slow['vs_gloo'])} ({slow['model']}, "
                     f"{slow['ranks']} ranks)")
    for m, g in summary["goals"].items():
        lines.append(f"goal {g['status']:14}  {m}: DDP step >= {GOAL_SPEEDUP:g}x faster than gloo on CPU at "
                     f"{GOAL_WORLD} ranks where gloo spends >= {100 * GOAL_GLOO_COMM:.0f} % of its step "
                     f"communicating ({g['detail']})")
    n = sum(len(c["backends"]) for c in cases)
    if summary["parity_failed"]:
        lines.append("parity FAILED: " + ", ".join(summary["parity_failed"]))
    elif n:
        lines.append(f"parity verified: in all {n} runs the parameters after {opts.warmup + opts.steps} DDP steps are "
                     "equal on every rank (checksums all-gathered through the backend, SHA-256 of the bytes over MPI) "
                     "and moved from their initial values")
    diffs = [x["checksum_rel_diff_vs_gloo"] for c in cases for x in c["backends"].values()
             if x.get("checksum_rel_diff_vs_gloo") is not None]
    if diffs:
        lines.append(f"the backends' parameters against gloo's after the same steps: checksums within "
                     f"{max(diffs):.1e} (relative)")
    return "\n".join(lines)


def write_csv(path, cases):
    fields = ["model", "ranks", "params", "backend", "step_s", "compute_s", "exposed_s", "comm_share", "vs_gloo",
              "parity_ok"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for c in cases:
            for b, x in c["backends"].items():
                w.writerow({"model": c["model"], "ranks": c["ranks"], "params": c["params"], "backend": b,
                            **{k: x[k] for k in ("step_s", "compute_s", "exposed_s", "comm_share", "vs_gloo")},
                            "parity_ok": "yes" if x["parity"]["ok"] else "no"})


def describe_models(opts, cases):
    lines = []
    params = {c["model"]: c["params"] for c in cases}
    for m in opts.model_list:
        cfg = opts.configs[m]
        if m == "transformer":
            what = (f"nn.TransformerEncoder, {cfg['layers']} layers, d_model {cfg['dim']}, {cfg['heads']} heads, "
                    f"feed-forward {cfg['ff']}; batch {cfg['batch']} x {cfg['seq']} tokens per rank")
        else:
            what = f"{cfg['depth']} x Linear({cfg['width']}, {cfg['width']}) + ReLU; batch {cfg['batch']} per rank"
        if m in params:
            what += f"; {params[m] / 1e6:.2f} M parameters, {human_bytes(params[m] * 4)} of float32 gradients"
        lines.append(f"  {m}: {what}")
    return "\n".join(lines)


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
    try:
        import torch  # noqa: F401
    except ImportError:
        print("commlib bench ddp: torch is not installed", file=sys.stderr)
        return 2
    runs, skipped = [], []
    try:
        for world in opts.world_list:
            for rnd in range(opts.rounds):
                for backend in opts.backend_list:
                    reason = skip_reason(opts, world, backend)
                    if reason:
                        if rnd == 0:
                            skipped.append(f"{backend} at {world} ranks: {reason}")
                        continue
                    runs.append(run_launch(opts, world, backend))
                    runs[-1]["round"] = rnd
    except (FileNotFoundError, RuntimeError) as e:
        print(f"commlib bench ddp: {e}", file=sys.stderr)
        return 2
    cases = derive(runs, opts)
    summary = summarize(cases, opts)
    ncores = cores()
    print(f"DDP training step, {opts.device.upper()}, float32, SGD, DDP buckets of {opts.bucket_mb:g} MB; step = "
          f"median of {opts.steps} timed steps after {opts.warmup} warm-up, the slowest rank's"
          + (f", the median over {opts.rounds} rounds" if opts.rounds > 1 else "") + "; compute = the same "
          "model and batch without DDP (a copy of the plain module, no communication), timed alternately with the "
          "DDP steps; exposed = step - compute; comm = exposed / step; vs gloo = gloo's step / this one's")
    print("models:")
    print(describe_models(opts, cases))
    for r in runs:
        m = r["meta"]
        if m:
            rnd = f" (round {r['round'] + 1})" if opts.rounds > 1 else ""
            how = "--threads" if opts.threads else f"{ncores} cores // {r['world']} ranks"
            print(f"{r['world']} ranks, {r['backend']}{rnd}: torch {m.get('torch')}, "
                  f"torch.set_num_threads({r['threads']}) per rank ({how})"
                  + (f", engine transport {m['transport']}" if m.get("transport") else "")
                  + f", {r['wall_s']:.1f} s")
        if r["world"] * r["threads"] > ncores:
            print(f"note: {ncores} cores for {r['world']} ranks x {r['threads']} threads: oversubscribed, the figures "
                  "mean little here")
        for n in r["notes"]:
            print(f"note ({r['world']} ranks, {r['backend']}): {n}")
        if r["returncode"] != 0 or len(r["models"]) != len(opts.model_list):
            print(f"commlib bench ddp: the {r['world']}-rank {r['backend']} run exited with status "
                  f"{r['returncode']}\n{r['stderr_tail']}", file=sys.stderr)
    for s in skipped:
        print(f"skipped: {s}")
    if cases:
        print(format_table(cases))
    print(format_summary(summary, cases, opts))
    mpi = next((r["meta"].get("mpi_library") for r in runs if r["meta"]), None) or "unknown"
    print(f"host MPI: {' '.join(mpi.split('MPICH Release')[0].split())}; launcher "
          f"{runs[0]['launcher'] if runs else 'n/a'}; {sum(r['wall_s'] for r in runs):.1f} s")
    result = {"benchmark": "ddp", "quick": opts.quick, "device": opts.device, "cores": ncores,
              "steps": opts.steps, "rounds": opts.rounds, "warmup": opts.warmup, "bucket_mb": opts.bucket_mb,
              "models": {m: opts.configs[m] for m in opts.model_list}, "runs": runs, "skipped": skipped,
              "cases": cases, "summary": summary,
              "goal": {"speedup": GOAL_SPEEDUP, "ranks": GOAL_WORLD, "gloo_comm_share": GOAL_GLOO_COMM}}
    if opts.csv:
        write_csv(opts.csv, cases)
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
    if not runs or any(r["returncode"] != 0 or len(r["models"]) != len(opts.model_list) for r in runs):
        return 2
    return 1 if summary["parity_failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
