"""DiLoCo training through churn: a small character-level transformer learns the Python
standard library's own source files (text every machine with Python has).

    commlib elastic-run -n 4 examples/diloco_train.py --kill-one --join-one
    commlib elastic-run -n 4 --standby examples/diloco_train.py --kill-coordinator

--mode        diloco (default), overlap (applied one outer step late), streaming (--fragments
              with --delay steps of overlap each), co2 (CO2: overlap, staleness gap penalty,
              outer momentum clipping), ddp (synchronous data parallel: gradients all-reduced
              every step; the baseline)
--quantize    uint8 / uint4 outer gradients (min-max codes, error feedback)
--kill-one    peer 1 SIGKILLs itself during an outer all-reduce (step --kill-at)
--join-one    peer 0 starts a new peer at step --join-at; it takes the shared state and joins
--kill-coordinator  peer 0 SIGKILLs the active coordinator at step --kill-coordinator-at
              (needs `commlib elastic-run --standby`: a standby takes over)
Every outer period each peer checks state parity (the SHA-256 of the shared state, min- and
max-all-reduced, must agree byte for byte).  Peer 0 prints the held-out loss, which falls;
--json F writes this peer's figures (tokens/s, time blocked on communication, loss,
recovery times, peer 0: the held-out loss curve; "{index}" in F: the peer's index) for
`commlib bench diloco`.  CPU by default, CUDA when present (--device).
"""
import argparse
import glob
import json
import math
import os
import select
import signal
import subprocess
import sys
import sysconfig
import time

import torch

import collectives
import collectives.elastic as el
from collectives.training import CO2, DiLoCo


def corpus(megabytes):
    """The first `megabytes` of the standard library's .py files, in name order: the same
    bytes on every peer of one Python."""
    out, size = [], 0
    for path in sorted(glob.glob(os.path.join(sysconfig.get_path("stdlib"), "*.py"))):
        with open(path, "rb") as f:
            data = f.read()
        out.append(data)
        size += len(data)
        if size >= megabytes * 2 ** 20:
            break
    text = b"".join(out)[:int(megabytes * 2 ** 20)]
    return torch.frombuffer(bytearray(text), dtype=torch.uint8).long()


class CharLM(torch.nn.Module):
    """Bytes in, next-byte logits out: embedding, `layers` pre-norm causal transformer
    blocks, a linear head."""

    def __init__(self, dim=128, layers=2, heads=4, context=64):
        super().__init__()
        self.embed = torch.nn.Embedding(256, dim)
        self.pos = torch.nn.Parameter(torch.randn(context, dim) * 0.02)
        block = torch.nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = torch.nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.head = torch.nn.Linear(dim, 256)
        self.register_buffer("mask", torch.nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, x):
        n = x.shape[1]
        h = self.embed(x) + self.pos[:n]
        return self.head(self.blocks(h, mask=self.mask[:n, :n], is_causal=True))


def batch_of(text, batch, context, gen, device):
    starts = torch.randint(0, text.numel() - context - 1, (batch,), generator=gen)
    idx = starts[:, None] + torch.arange(context + 1)
    chunk = text[idx].to(device)
    return chunk[:, :-1], chunk[:, 1:]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=("diloco", "overlap", "streaming", "co2", "ddp"), default="diloco")
    ap.add_argument("--steps", type=int, default=300, help="inner steps (one batch each per peer)")
    ap.add_argument("--sync-every", type=int, default=25)
    ap.add_argument("--fragments", type=int, default=4)
    ap.add_argument("--delay", type=int, default=None,
                    help="overlap, streaming: inner steps of overlap per round (default: sync_every // fragments)")
    ap.add_argument("--quantize", choices=("none", "uint8", "uint4"), default="none")
    ap.add_argument("--outer-lr", type=float, default=0.7)
    ap.add_argument("--outer-momentum", type=float, default=None,
                    help="default 0.9 (Nesterov); 0.5 for the modes applied late (overlap, streaming, co2)")
    ap.add_argument("--clip-norm", type=float, default=None, help="co2: outer momentum clipping threshold")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--corpus-mb", type=float, default=2.0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per peer")
    ap.add_argument("--pin", action="store_true",
                    help="pin peer i to cores i*threads .. (i+1)*threads-1 (a joiner is not pinned)")
    ap.add_argument("--kill-one", action="store_true")
    ap.add_argument("--kill-at", type=int, default=None, help="default: the second outer step")
    ap.add_argument("--join-one", action="store_true")
    ap.add_argument("--join-at", type=int, default=None, help="default: the fourth outer step")
    ap.add_argument("--kill-coordinator", action="store_true")
    ap.add_argument("--kill-coordinator-at", type=int, default=None, help="default: the sixth outer step")
    ap.add_argument("--no-comm", action="store_true", help="train alone, no communication (the compute baseline)")
    ap.add_argument("--json", default=None, help="write this peer's figures to this file ({index}: the peer's)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    index = os.environ.get("COMMLIB_ELASTIC_INDEX", "?")
    if args.pin and index.isdigit() and hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        mine = cores[int(index) * args.threads:(int(index) + 1) * args.threads]
        if len(mine) == args.threads:  # enough cores: each peer its own, as on separate machines
            os.sched_setaffinity(0, mine)
    h = args.sync_every
    kill_at = args.kill_at if args.kill_at is not None else 2 * h
    join_at = args.join_at if args.join_at is not None else 4 * h - 2
    kill_coord_at = args.kill_coordinator_at if args.kill_coordinator_at is not None else 6 * h
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    joiner = index == "joiner"

    text = corpus(args.corpus_mb)
    split = int(text.numel() * 0.95)
    train, held_out = text[:split], text[split:]
    torch.manual_seed(0)  # the same initial model everywhere (the first sync would elect one anyway)
    model = CharLM(args.dim, args.layers, context=args.context).to(device)
    inner = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    eval_x, eval_y = batch_of(held_out, 64, args.context, torch.Generator().manual_seed(1), device)

    if args.no_comm:
        comm, name = None, f"peer {index} (alone)"
    elif joiner:  # connect, tell the peer that started us, then wait to be admitted
        comm = el.ElasticComm()
        ready = os.environ.pop("DILOCO_READY_FD", None)
        if ready:
            os.write(int(ready), b"1")
            os.close(int(ready))
    else:
        comm = collectives.init("elastic")
    if comm is not None:
        name = f"peer {index} (id {comm.peer_id})"
    gen = torch.Generator().manual_seed(1000 + (comm.peer_id if comm is not None else 0))

    def say(msg):  # one write per line: the peers share the terminal
        sys.stdout.write(f"[{name}] {msg}\n")
        sys.stdout.flush()

    def held_out_loss(params=None):
        with torch.no_grad():
            if params is None:
                return torch.nn.functional.cross_entropy(model(eval_x).flatten(0, 1), eval_y.flatten()).item()
            saved = [p.detach().clone() for p in model.parameters()]
            for p, g in zip(model.parameters(), params):
                p.copy_(g)
            loss = torch.nn.functional.cross_entropy(model(eval_x).flatten(0, 1), eval_y.flatten()).item()
            for p, s in zip(model.parameters(), saved):
                p.copy_(s)
            return loss

    if joiner:
        say("started; waiting to be admitted")
    outer, ddp = None, None
    quantize = None if args.quantize == "none" else args.quantize
    if comm is not None and args.mode == "ddp":
        ddp = _SyncDataParallel(model, inner, comm, h)
    elif comm is not None:
        late = args.mode in ("overlap", "streaming", "co2")
        momentum = args.outer_momentum if args.outer_momentum is not None else (0.5 if late else 0.9)
        kw = dict(sync_every=h, outer_lr=args.outer_lr, outer_momentum=momentum, quantize=quantize or False,
                  check_parity=True)
        if args.mode == "co2":
            outer = CO2(model, inner, comm, clip_norm=args.clip_norm, **kw)
        else:
            outer = DiLoCo(model, inner, comm, overlap=args.mode in ("overlap", "streaming"),
                           fragments=args.fragments if args.mode == "streaming" else 1,
                           delay=args.delay if args.mode in ("overlap", "streaming") else None, **kw)
    step = outer.inner_step if outer else (ddp.step if ddp else 0)
    if joiner:
        say(f"admitted at step {step}: rank {comm.rank} of {comm.world}")
    spawned, coordinator_killed_at, failed_at, killed = None, None, None, []
    recoveries, tokens, curve, compute = {}, 0, [], 0.0

    def inner_step():
        t = time.monotonic()
        inner.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.monotonic() - t
    first_loss = held_out_loss()
    t_start = time.monotonic()
    if index == "0":
        say(f"mode {args.mode}, {sum(p.numel() for p in model.parameters())} parameters, {device}, "
            f"held-out loss {first_loss:.4f} at step {step}")
    while step < args.steps:
        if comm is not None and index == "1" and args.kill_one and step + 1 == kill_at:
            kill_during_next_all_reduce(comm, say, step + 1)
        if comm is not None and index == "0" and args.kill_coordinator and step + 1 == kill_coord_at:
            pids = [int(p) for p in os.environ.get("COMMLIB_ELASTIC_COORDINATOR_PIDS", "").split(",") if p]
            if not pids:
                raise SystemExit("--kill-coordinator needs `commlib elastic-run --standby` (no coordinator pids)")
            killed = []
            kill_during_next_all_reduce(comm, say, step + 1, pid=pids[0], killed=killed)
        if ddp is not None:
            ddp.before_step()
        t0 = time.monotonic()
        x, y = batch_of(train, args.batch, args.context, gen, device)
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        compute += time.monotonic() - t0
        tokens += args.batch * args.context
        events = []
        if comm is None:
            compute += inner_step()
            step += 1
        elif ddp is not None:
            if ddp.commit():
                compute += inner_step()
            step = ddp.step
            events = ddp.take_events()
        else:
            compute += inner_step()
            n = len(outer.events)
            outer.step()
            step = outer.inner_step
            events = outer.events[n:]
        inner.zero_grad(set_to_none=True)
        for ev in events:
            if ev["kind"] == "rollback" and failed_at is None:
                failed_at = ev["time"]
                say(f"step {step}: round rolled back ({ev['error'][:80]})")
            if ev["kind"] == "commit" and failed_at is not None:
                recoveries.setdefault("peer_kill", ev["time"] - failed_at)
                say(f"step {step}: committed {ev['time'] - failed_at:.3f} s after the failed round")
                failed_at = None
            if coordinator_killed_at is None and args.kill_coordinator and index == "0" and killed:
                coordinator_killed_at = killed.pop()
            if ev["kind"] == "commit" and coordinator_killed_at is not None:
                recoveries.setdefault("coordinator_kill", ev["time"] - coordinator_killed_at)
                say(f"step {step}: committed {ev['time'] - coordinator_killed_at:.3f} s after the coordinator's SIGKILL")
                coordinator_killed_at = None
        if index == "0" and step % h == 0:
            params = outer.global_parameters() if outer is not None else None
            loss_now = held_out_loss(params)
            curve.append([round(time.monotonic() - t_start, 4), step, round(loss_now, 5)])
            say(f"step {step:4d}  world {comm.world if comm else 1}  held-out loss {loss_now:.4f}" +
                (f"  parity ok ({outer.parity_checks} checks, sha256 {outer.state_digest()[:16]})" if outer else ""))
        if comm is None:
            continue
        if args.join_one and index == "0" and step == join_at and spawned is None:
            say("starting a new peer")
            argv = [a for a in sys.argv[1:] if a not in ("--kill-one", "--join-one", "--kill-coordinator")]
            if "--json" in argv and "{index}" not in argv[argv.index("--json") + 1]:
                argv[argv.index("--json") + 1] += ".joiner"  # the joiner writes its own figures
            r, w = os.pipe()
            spawned = subprocess.Popen([sys.executable, sys.argv[0], *argv], pass_fds=(w,),
                                       env=dict(os.environ, COMMLIB_ELASTIC_INDEX="joiner", DILOCO_READY_FD=str(w)))
            os.close(w)
            if not select.select([r], [], [], 120)[0]:
                say("the new peer did not connect within 120 s")
            os.close(r)
    elapsed = time.monotonic() - t_start
    if outer is not None:
        outer.sync()
        final = held_out_loss(outer.global_parameters())
        ok = outer.parity() is not False
    else:
        final, ok = held_out_loss(), True
    figures = {"mode": args.mode, "quantize": args.quantize, "index": index, "steps": step, "tokens": tokens,
               "seconds": elapsed, "tokens_per_second": tokens / elapsed,
               "compute_seconds": compute,
               "comm_seconds": (outer.comm_seconds if outer else (ddp.comm_seconds if ddp else 0.0)),
               "first_loss": first_loss, "final_loss": final, "recoveries": recoveries,
               "failures": outer.failures if outer else (ddp.failures if ddp else 0),
               "divergences": outer.divergences if outer else 0, "parity_checks": outer.parity_checks if outer else 0,
               "world": comm.world if comm else 1, "curve": curve, "batch": args.batch, "context": args.context,
               "sync_every": h}
    say(f"done at step {step}: held-out loss {first_loss:.4f} -> {final:.4f}, {tokens / elapsed:.0f} tokens/s, "
        f"{figures['comm_seconds']:.2f} s blocked on communication"
        + (f", parity ok ({outer.parity_checks} checks), sha256 {outer.state_digest()[:16]}" if outer else ""))
    if args.json:
        with open(args.json.replace("{index}", index), "w") as f:
            json.dump(figures, f)
    if outer is not None and (outer.divergences or not ok):
        raise SystemExit(f"[{name}] state parity broken ({outer.divergences} divergences)")
    if not math.isfinite(final) or final >= first_loss:
        raise SystemExit(f"[{name}] the loss did not fall ({first_loss:.4f} -> {final:.4f})")
    if comm is not None:
        comm.close()
    if spawned is not None:
        spawned.wait()


def kill_during_next_all_reduce(comm, say, step, pid=None, killed=None):
    """SIGKILL to this process (or to pid: the coordinator) as it starts the next all-reduce
    of more than 1000 elements (the outer round's pseudo-gradient; ddp: the gradients): the
    other peers are in it, and its verdict has to come from whoever survives.  `killed` gets
    the time of the kill."""
    plain = comm.all_reduce

    def kill():
        if killed is not None:
            killed.append(time.monotonic())
        os.kill(pid or os.getpid(), signal.SIGKILL)

    def all_reduce(x, *args, **kwargs):
        if x.numel() > 1000 and comm.all_reduce is all_reduce:
            comm.all_reduce = plain  # once
            who = "myself" if pid is None else f"the active coordinator (pid {pid})"
            say(f"step {step}: SIGKILL to {who} during the all-reduce of {x.numel()} elements")
            kill()
        return plain(x, *args, **kwargs)
    comm.all_reduce = all_reduce


class _SyncDataParallel:
    """The baseline: every step the gradients are averaged over the peers during backward
    (ElasticDataParallel, one bucket); a step whose all-reduce fails is skipped by every
    survivor alike.  Membership (model, inner optimizer state and step) is synchronised
    every `every` steps, as DiLoCo's, and after a failure."""

    def __init__(self, model, optimizer, comm, every):
        from collectives.torch import ElasticDataParallel
        self.optimizer, self.every = optimizer, every
        self.ddp = ElasticDataParallel(model, comm, bucket_cap_mb=1e9)
        self.comm_seconds, self.failures, self._events = 0.0, 0, []
        self.ddp.sync(optimizer)
        self._resync, self._synced_at = False, self.ddp.step

    @property
    def step(self):
        return self.ddp.step

    def before_step(self):
        if self._resync or (self.ddp.step % self.every == 0 and self.ddp.step != self._synced_at):
            t0 = time.monotonic()
            self.ddp.sync(self.optimizer)
            self.comm_seconds += time.monotonic() - t0
            self._resync, self._synced_at = False, self.ddp.step

    def commit(self):
        t0 = time.monotonic()
        ok = self.ddp.should_commit()
        now = time.monotonic()
        self.comm_seconds += now - t0
        if ok:
            self._events.append({"kind": "commit", "time": now})
        else:
            self.failures += 1
            self._resync = True
            self._events.append({"kind": "rollback", "time": now, "error": str(self.ddp.last_error)})
        return ok

    def take_events(self):
        events, self._events = self._events, []
        return events


if __name__ == "__main__":
    main()
