"""FSDP2 (fully_shard over a DeviceMesh of the commlib group) against DDP over the same group:
the same small transformer, the same data, the same optimizer; the per-step losses (averaged
over the ranks) must agree within --tol, and the gathered FSDP2 parameters must equal DDP's
within --tol after the run.  Prints "fsdp: OK" (run under mpiexec; see test_torch_training.py)."""
import argparse
import os

import torch
import torch.distributed as dist
import torch.nn as nn

import collectives.torch  # noqa: F401  (registers the backend)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard


def build(vocab, width):
    torch.manual_seed(0)
    layer = lambda: nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True)  # noqa: E731
    return nn.Sequential(nn.Embedding(vocab, width), layer(), layer(), nn.Linear(width, vocab))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tol", type=float, default=2e-4)
    ap.add_argument("--backend", default="commlib")
    args = ap.parse_args()
    dist.init_process_group(args.backend)
    r, n = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", r)) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    vocab, width, batch = 64, 32, 4
    ddp_model = build(vocab, width).to(device)
    ddp = nn.parallel.DistributedDataParallel(ddp_model)
    fsdp = build(vocab, width).to(device)
    mesh = init_device_mesh(device.type, (n,))
    for m in list(fsdp)[1:3]:
        fully_shard(m, mesh=mesh)
    fully_shard(fsdp, mesh=mesh)
    opts = [torch.optim.Adam(m.parameters(), lr=3e-3) for m in (ddp_model, fsdp)]
    worst = 0.0
    for step in range(args.steps):
        g = torch.Generator().manual_seed(step)
        x = torch.randint(0, vocab, (batch * n, 12), generator=g)[r * batch:(r + 1) * batch].to(device)
        y = torch.roll(x, -1, 1)
        losses = []
        for model, opt in zip((ddp, fsdp), opts):
            out = model(x)
            loss = nn.functional.cross_entropy(out.reshape(-1, vocab), y.reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad()
            avg = loss.detach().clone()
            dist.all_reduce(avg, op=dist.ReduceOp.AVG)
            losses.append(avg.item())
        diff = abs(losses[0] - losses[1]) / abs(losses[0])
        worst = max(worst, diff)
        if r == 0:
            print(f"step {step} ddp {losses[0]:.6f} fsdp {losses[1]:.6f}", flush=True)
        if diff > args.tol:
            raise SystemExit(f"fsdp: step {step}: loss {losses[1]} differs from DDP's {losses[0]} by {diff:.1e}")
    full = {k: v.full_tensor() for k, v in fsdp.state_dict().items()}  # functional all_gather
    for k, v in ddp_model.state_dict().items():
        d = ((full[k] - v).abs().max() / (v.abs().max() + 1e-12)).item()
        if d > args.tol * 10:
            raise SystemExit(f"fsdp: parameter {k} differs from DDP's by {d:.1e}")
    if r == 0:
        print(f"fsdp: OK ranks={n} device={device.type} steps={args.steps} worst loss difference {worst:.1e}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
