"""DistributedDataParallel over the "commlib" backend, checked at every step.

    commlib run -n 4 python examples/ddp_train.py                 # CPU, an MLP
    commlib run -n 4 python examples/ddp_train.py --model transformer --hook quantized
    commlib run -n 2 python examples/ddp_train.py --device cuda    # CUDA tensors over any MPI

The script is written for torch.distributed; the only commlib line is the import that
registers the backend (and takes rank and size from MPI).  Every step it checks that
  - the parameters are identical on every rank (SHA-256 of the parameters, all-gathered);
  - they equal, within --tol, a replica trained in this process on the global batch
    (exact hooks only: none/allreduce; fp16/bf16 use a 100x looser tolerance; powersgd and
    quantized change the gradients on purpose and are checked for parity and falling loss);
and that the loss fell; prints "ddp_train: OK" at the end.  --accumulate K: K-1 micro-batches under no_sync()
before each synchronised one; --unused adds a layer that gets no gradient
(find_unused_parameters=True); --bucket-mb sets DDP's bucket size.
"""
import argparse
import hashlib
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn

import collectives.torch as ct  # registers the "commlib" backend


class MLP(nn.Module):
    def __init__(self, width, unused):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, width), nn.GELU(), nn.Linear(width, width), nn.GELU(),
                                  nn.Linear(width, 8))
        self.unused = nn.Linear(width, width) if unused else None

    def forward(self, x):
        return self.body(x)


class Transformer(nn.Module):
    def __init__(self, width, unused, layers=2, vocab=256):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        layer = nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=4 * width, dropout=0.0, batch_first=True)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, vocab)
        self.unused = nn.Linear(width, width) if unused else None

    def forward(self, x):
        return self.head(self.body(self.embed(x)))


def batch(args, step, device):
    """The global batch of a step (every rank can make it)."""
    g = torch.Generator().manual_seed(1234 + step)
    if args.model == "transformer":
        x = torch.randint(0, 256, (args.batch, 16), generator=g)
        return x.to(device), torch.roll(x, -1, dims=1).to(device)
    x = torch.randn(args.batch, 64, generator=g)
    return x.to(device), torch.sin(x[:, :8] * 2).to(device)


def loss_of(args, model, x, y):
    out = model(x)
    if args.model == "transformer":
        return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    return nn.functional.mse_loss(out, y)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["mlp", "transformer"], default="mlp")
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64, help="global batch (split over the ranks)")
    ap.add_argument("--lr", type=float, default=None, help="SGD, momentum 0.9 (default 0.05 mlp, 0.3 transformer)")
    ap.add_argument("--hook", choices=["none", "allreduce", "fp16", "bf16", "powersgd", "quantized"], default="none")
    ap.add_argument("--accumulate", type=int, default=1)
    ap.add_argument("--unused", action="store_true")
    ap.add_argument("--bucket-mb", type=float, default=25.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="commlib")
    ap.add_argument("--tol", type=float, default=None,
                    help="largest relative difference from the replica (default 1e-4 mlp, 1e-3 transformer)")
    args = ap.parse_args()

    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.batch % (world * args.accumulate):
        raise SystemExit(f"--batch {args.batch} must split into {world} ranks x {args.accumulate} micro-batches")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
        torch.cuda.set_device(device)

    def build():
        torch.manual_seed(0)
        return (MLP if args.model == "mlp" else Transformer)(args.width, args.unused).to(device)

    args.lr = args.lr or (0.05 if args.model == "mlp" else 0.3)
    model, replica = build(), build()
    ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=args.unused,
                                              bucket_cap_mb=args.bucket_mb)
    exact = args.hook in ("none", "allreduce")
    tol = (args.tol or (1e-4 if args.model == "mlp" else 1e-3)) * (1 if exact else 100)
    if args.hook == "allreduce":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
        ddp.register_comm_hook(None, default_hooks.allreduce_hook)
    elif args.hook in ("fp16", "bf16"):
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook if args.hook == "fp16"
                               else default_hooks.bf16_compress_hook)
    elif args.hook == "powersgd":
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook
        state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=2, start_powerSGD_iter=3,
                                            min_compression_rate=0.5)
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    elif args.hook == "quantized":
        ddp.register_comm_hook(None, ct.quantized_hook)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    ref_opt = torch.optim.SGD(replica.parameters(), lr=args.lr, momentum=0.9)
    share = args.batch // world
    micro = share // args.accumulate
    first = last = None
    best = float("inf")
    for step in range(args.steps):
        x, y = batch(args, step, device)
        mine = slice(rank * share, (rank + 1) * share)
        xs, ys = x[mine], y[mine]
        for k in range(args.accumulate):
            part = slice(k * micro, (k + 1) * micro)
            sync = k == args.accumulate - 1
            ctx = ddp.no_sync() if not sync else _null()
            with ctx:
                (loss_of(args, ddp, xs[part], ys[part]) / args.accumulate).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        # the replica: one process, the global batch
        global_loss = loss_of(args, replica, x, y)
        global_loss.backward()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        first = global_loss.item() if first is None else first
        # parity across ranks
        h = hashlib.sha256()
        for p in model.parameters():
            h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        mine_hash = torch.frombuffer(bytearray(h.digest()), dtype=torch.uint8).to(device)
        hashes = [torch.empty_like(mine_hash) for _ in range(world)]
        dist.all_gather(hashes, mine_hash)
        if any(not torch.equal(hh, mine_hash) for hh in hashes):
            raise SystemExit(f"ddp_train: rank {rank}: parameters differ between ranks at step {step}")
        if exact or args.hook in ("fp16", "bf16"):
            worst = max(((p - q).abs().max() / (q.abs().max() + 1e-12)).item()
                        for p, q in zip(model.parameters(), replica.parameters()))
            if worst > tol:
                raise SystemExit(f"ddp_train: rank {rank}: step {step}: parameters differ from the global-batch "
                                 f"replica by {worst:.2e} (> {tol:.0e})")
        with torch.no_grad():
            last = loss_of(args, model, x, y).item()
        best = min(best, last)
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {last:.5f}  parity ok", flush=True)
    # exact hooks: the last loss is below the first; lossy ones (PowerSGD's low rank, uint8,
    # fp16) may wander on a short run: the loss must have fallen below the first at some step
    if not (last if exact else best) < first:
        raise SystemExit(f"ddp_train: the loss did not fall ({first:.5f} -> {last:.5f}, best {best:.5f})")
    if rank == 0:
        print(f"ddp_train: OK ranks={world} backend={args.backend} model={args.model} hook={args.hook} "
              f"device={device.type} accumulate={args.accumulate} unused={args.unused}", flush=True)
    dist.destroy_process_group()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    sys.exit(main())
