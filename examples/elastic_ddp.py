"""Elastic data-parallel training of a torch model: peers die and join, the model and the
optimizer state stay bit-identical on every peer (collectives.torch.ElasticDataParallel).

    commlib elastic-run -n 4 examples/elastic_ddp.py --kill-one --join-one

--kill-one   peer 1 SIGKILLs itself in the middle of backward's all-reduces at step --kill-at
--join-one   peer 0 starts a new peer at step --join-at; it learns the optimizer state's
             layout, fetches model + Adam state + step, and trains
Every step each peer checks parity: the SHA-256 of its parameters and optimizer state,
min- and max-reduced over the group, must agree byte for byte.  Printed: the loss (it
falls), the time from a failed step to the next committed one, and a joiner's time from
being admitted to its first committed step.  --device cuda trains on the GPU.
"""
import argparse
import hashlib
import os
import select
import signal
import subprocess
import sys
import threading
import time

import torch

import collectives
import collectives.torch as ct


def digest(model, optimizer):
    h = hashlib.sha256()
    for t in model.state_dict().values():
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    for s in optimizer.state.values():
        for k in sorted(s):
            if isinstance(s[k], torch.Tensor):
                h.update(s[k].detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return torch.frombuffer(bytearray(h.digest()), dtype=torch.uint8)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--kill-one", action="store_true")
    ap.add_argument("--kill-at", type=int, default=15)
    ap.add_argument("--join-one", action="store_true")
    ap.add_argument("--join-at", type=int, default=25)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bucket-mb", type=float, default=0.25, help="small buckets: several all-reduces per step")
    args = ap.parse_args()
    torch.set_num_threads(1)

    index = os.environ.get("COMMLIB_ELASTIC_INDEX", "?")
    if index == "joiner":  # connect, tell the peer that started us, then wait to be admitted (in sync)
        from collectives.elastic import ElasticComm
        comm = ElasticComm()
    else:
        comm = collectives.init("elastic")  # connect and become a member
    name = f"peer {index} (id {comm.peer_id})"

    def say(msg):
        sys.stdout.write(f"[{name}] {msg}\n")
        sys.stdout.flush()

    torch.manual_seed(0)  # every peer builds the same model; a joiner's bytes come from the group anyway
    dev = torch.device(args.device)
    model = torch.nn.Sequential(torch.nn.Linear(32, args.width), torch.nn.GELU(),
                                torch.nn.Linear(args.width, args.width), torch.nn.GELU(),
                                torch.nn.Linear(args.width, 1)).to(dev)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    ddp = ct.ElasticDataParallel(model, comm, bucket_cap_mb=args.bucket_mb)
    truth = torch.nn.Linear(32, 1).to(dev)
    data = torch.Generator().manual_seed(1000 + comm.peer_id)
    eval_x = torch.randn(1024, 32, generator=torch.Generator().manual_seed(1)).to(dev)
    with torch.no_grad():
        eval_y = torch.sin(truth(eval_x))
    if ddp.joiner:
        say("started; waiting to be admitted")
        ready = os.environ.pop("ELASTIC_DDP_READY_FD", None)
        if ready:
            os.write(int(ready), b"1")
            os.close(int(ready))
    spawned, failed_at, admitted_at, firsts = None, None, None, True
    while True:
        epoch = comm.epoch
        step = ddp.sync(optimizer)
        if comm.epoch != epoch:
            say(f"epoch {comm.epoch}: rank {comm.rank} of {comm.world}, step {step}")
        if firsts and ddp.joiner:
            admitted_at = time.monotonic()
        if step >= args.steps:
            break
        d = digest(model, optimizer)
        lo, hi = d.clone(), d.clone()
        try:
            comm.all_reduce(lo, op="min")
            comm.all_reduce(hi, op="max")
        except collectives.CollectiveError:
            continue
        if not (torch.equal(lo, d) and torch.equal(hi, d)):
            raise SystemExit(f"[{name}] parity broken at step {step}")
        x = torch.randn(args.batch, 32, generator=data).to(dev)
        with torch.no_grad():
            y = torch.sin(truth(x))
        if args.kill_one and index == "1" and step == args.kill_at:
            say(f"step {step}: killing myself (SIGKILL) during backward's all-reduces")
            threading.Timer(0.003, os.kill, (os.getpid(), signal.SIGKILL)).start()
        loss = torch.nn.functional.mse_loss(ddp(x), y)
        loss.backward()
        if ddp.should_commit():
            optimizer.step()
            if failed_at is not None:
                say(f"step {step}: committed {time.monotonic() - failed_at:.3f} s after the failed step")
                failed_at = None
            if admitted_at is not None and firsts:
                say(f"joined: first committed step {step} {time.monotonic() - admitted_at:.3f} s after admission")
            firsts = False
        else:
            failed_at = failed_at or time.monotonic()
            say(f"step {step}: not committed ({str(ddp.last_error)[:90]}); skipping the optimizer step")
        optimizer.zero_grad(set_to_none=True)
        if comm.rank == 0 and step % 10 == 0:
            with torch.no_grad():
                ev = torch.nn.functional.mse_loss(model(eval_x), eval_y).item()
            say(f"step {step:3d}  world {comm.world}  loss {ev:.6f}  parity ok ({bytes(d[:8].tolist()).hex()})")
        if args.join_one and index == "0" and step + 1 == args.join_at and spawned is None:
            say("starting a new peer")
            argv = [a for a in sys.argv[1:] if a not in ("--kill-one", "--join-one")]
            r, w = os.pipe()
            spawned = subprocess.Popen([sys.executable, sys.argv[0], *argv], pass_fds=(w,),
                                       env=dict(os.environ, COMMLIB_ELASTIC_INDEX="joiner",
                                                ELASTIC_DDP_READY_FD=str(w)))
            os.close(w)
            if not select.select([r], [], [], 120)[0]:
                say("the new peer did not connect within 120 s")
            os.close(r)
    with torch.no_grad():
        ev = torch.nn.functional.mse_loss(model(eval_x), eval_y).item()
    say(f"done at step {ddp.step}, loss {ev:.6f}, state sha256 {bytes(digest(model, optimizer)[:8].tolist()).hex()}")
    comm.close()
    if spawned is not None:
        spawned.wait()


if __name__ == "__main__":
    main()
