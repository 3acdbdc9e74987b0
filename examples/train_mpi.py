"""Data-parallel training over MPI with commlib's collectives, and a check of the result.

    commlib run -n 4 python examples/train_mpi.py

A three-layer MLP (numpy) learns a synthetic regression task.  Every rank draws its share
of each global batch from the same seed; in backward, each layer's gradient is averaged
over the ranks with all_reduce(async_op=True) as soon as it is computed, while the earlier
layers' gradients are still being computed (the overlap DDP gets from its buckets); the
optimizer step waits for the all-reduces.  The last layer of the forward pass is
row-parallel across ranks once per --eval-every steps: collectives.overlap.matmul_all_reduce
computes it in chunks whose all-reduce runs while the next chunk is computed.

What is checked, and the exit status says (0 ok, 1 not):
  - the parameters are the same bytes on every rank after every step (a hash, gathered);
  - after training they equal, within 1e-4 (relative), one process training on the global
    batch (every rank recomputes that reference itself, from the same seed);
  - the loss fell;
  - the row-parallel evaluation equals the plain one within float32 tolerance.
"""
import argparse
import hashlib
import sys
import time

import numpy as np

import collectives
from collectives import overlap


def make_model(rng, sizes):
    return [(rng.standard_normal((m, n)).astype(np.float32) / np.sqrt(m), np.zeros(n, np.float32))
            for m, n in zip(sizes[:-1], sizes[1:])]


def batch(step, global_batch, features, rank=None, size=None):
    """The global batch of a step (the same on every rank); a rank's share if asked."""
    rng = np.random.default_rng(1000 + step)
    x = rng.standard_normal((global_batch, features)).astype(np.float32)
    y = np.sin(x[:, :4].sum(axis=1, keepdims=True)).astype(np.float32)
    if rank is None:
        return x, y
    rows = np.array_split(np.arange(global_batch), size)[rank]
    return x[rows], y[rows]


def forward(model, x):
    acts = [x]
    for i, (w, b) in enumerate(model):
        z = acts[-1] @ w + b
        acts.append(np.maximum(z, 0) if i < len(model) - 1 else z)
    return acts


def backward(model, acts, y, scale, on_grad):
    """Gradients of mean squared error from the last layer to the first; on_grad(i, gw, gb)
    is called as soon as layer i's are known."""
    delta = (acts[-1] - y) * (2.0 * scale)
    for i in range(len(model) - 1, -1, -1):
        w, _ = model[i]
        gw = acts[i].T @ delta
        gb = delta.sum(axis=0)
        if i > 0:
            delta = (delta @ w.T) * (acts[i] > 0)
        on_grad(i, gw.astype(np.float32), gb.astype(np.float32))


def digest(model):
    h = hashlib.sha256()
    for w, b in model:
        h.update(w.tobytes())
        h.update(b.tobytes())
    return np.frombuffer(h.digest()[:8], np.int64).copy()


def train(model, steps, lr, global_batch, features, comm=None):
    losses = []
    for step in range(steps):
        if comm is None:
            x, y = batch(step, global_batch, features)
        else:
            x, y = batch(step, global_batch, features, comm.rank, comm.size)
        acts = forward(model, x)
        squared = np.array([float(((acts[-1] - y) ** 2).sum()), y.size], np.float64)
        if comm is not None:
            comm.all_reduce(squared)  # the global batch's loss
        losses.append(squared[0] / squared[1])
        grads, works = {}, []

        def on_grad(i, gw, gb):
            grads[i] = (gw, gb)
            if comm is not None:  # the sum over ranks of per-rank sums = the global batch's
                works.append(comm.all_reduce(gw, op="sum", async_op=True))
                works.append(comm.all_reduce(gb, op="sum", async_op=True))
        # per-row scale of the global mean: each rank scales by 1/global_batch, the sum does the rest
        backward(model, acts, y, 1.0 / (global_batch * y.shape[1]), on_grad)
        for w in works:
            w.wait()
        for i, (gw, gb) in grads.items():
            model[i][0][...] -= lr * gw
            model[i][1][...] -= lr * gb
        if comm is not None:
            hashes = comm.all_gather(digest(model))
            if not (hashes == hashes[0]).all():
                raise SystemExit(f"step {step}: the parameters differ between ranks")
    return losses


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--features", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--batch", type=int, default=256, help="global batch")
    ap.add_argument("--lr", type=float, default=0.05)
    args = ap.parse_args()

    comm = collectives.init()
    sizes = [args.features, args.hidden, args.hidden, 1]
    model = make_model(np.random.default_rng(7), sizes)
    t0 = time.perf_counter()
    losses = train(model, args.steps, args.lr, args.batch, args.features, comm)
    seconds = time.perf_counter() - t0

    # one process on the global batch, for comparison
    reference = make_model(np.random.default_rng(7), sizes)
    train(reference, args.steps, args.lr, args.batch, args.features)
    worst = max(float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-12))
                for (wa, ba), (wb, bb) in zip(model, reference) for a, b in ((wa, wb), (ba, bb)))

    # a row-parallel layer: each rank holds a slice of the hidden features (rows of the
    # weight), the product of the slices summed over ranks
    x, _ = batch(10 ** 6, args.batch, args.features)
    hidden = forward(model, x)[-2]
    w_last = model[-1][0]
    rows = np.array_split(np.arange(hidden.shape[1]), comm.size)[comm.rank]
    parallel = overlap.matmul_all_reduce(np.ascontiguousarray(hidden[:, rows]),
                                         np.ascontiguousarray(w_last[rows]), comm, chunks=8)
    plain = hidden @ w_last
    eval_err = float(np.max(np.abs(parallel - plain)) / (np.max(np.abs(plain)) + 1e-12))

    ok = worst < 1e-4 and losses[-1] < losses[0] and eval_err < 1e-5
    if comm.rank == 0:
        print(f"train_mpi: ranks={comm.size} transport={comm.transport} steps={args.steps} "
              f"loss {losses[0]:.4f} -> {losses[-1]:.4f} in {seconds:.2f} s")
        print(f"train_mpi: parameters identical on every rank at every step; "
              f"vs one process on the global batch: max relative difference {worst:.2e} (limit 1e-4)")
        print(f"train_mpi: row-parallel layer (matmul_all_reduce, 8 chunks) vs plain: {eval_err:.2e} (limit 1e-5)")
        print("train_mpi: OK" if ok else "train_mpi: FAILED")
    comm.close()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
