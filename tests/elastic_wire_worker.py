"""A peer process for tests/test_elastic_wire.py: prints one JSON line per event.

    python elastic_wire_worker.py ADDRESS MODE [ARGS]

quant COUNTS: uint4 and uint8 all-reduces (float16, bfloat16, float32, float64 x sum, avg)
    of each count; prints each result's error against the exact answer, the error bound
    the quantization allows, the result's SHA-256 and the data bytes this peer sent.
timed COUNT QUANTIZE REPS: REPS all-reduces of COUNT float32 (integer values: exact sums),
    each with its monotonic start and end, whether it is exact, and the bytes sent.
fail COUNT: throttled all-reduces of COUNT float32 until one fails; prints when it failed.
state SIZE HAVE: sync_state of one SIZE-element float64 array; HAVE=1 holds the data
    (revision 0), HAVE=0 joins empty and fetches it.
"""
import hashlib
import json
import sys
import time
import zlib

import numpy as np

import collectives.elastic as el

SECRET = "test-secret"
LEVELS = {"uint8": 255, "uint4": 15}
# The codec computes in float (reduce.c), so float64 rounds like float32 on the way.
EPS = {"float16": 2.0 ** -11, "bfloat16": 2.0 ** -8, "float32": 2.0 ** -24, "float64": 2.0 ** -24}


def emit(**kw):
    print(json.dumps(kw), flush=True)


def quant_bound(stack, op, levels, eps):
    """What min-max quantization allows, element-wise over the whole buffer (so over any
    chunk of it).  Reduce-scatter hop h (h = 0 .. n-2) quantizes a partial sum of h + 1
    inputs, whose range is at most (h + 1) R plus twice the error it already carries
    (R: the widest input range); rounding to the nearest code is off by at most half a
    step, scale / 2 = range / (2 levels).  The owner then quantizes the finished chunk
    (divided by n for avg) once more.  The dtype's own rounding (each stored partial sum
    and the decoded values) adds a few eps of the largest magnitude per hop."""
    n = stack.shape[0]
    r = float(np.max(stack.max(axis=1) - stack.min(axis=1)))
    big = n * float(np.max(np.abs(stack)))
    err = 0.0
    for h in range(n - 1):
        err += ((h + 1) * r + 2 * err) / (2 * levels)
    div = n if op == "avg" else 1
    final = (n * r + 2 * err) / div / (2 * levels)
    rounding = 4 * n * eps * (big + err)
    return (err / div + final + rounding) * 1.0001


def mode_quant(comm, counts):
    comm.update_topology()
    world, rank = comm.world, comm.rank
    import torch
    for count in counts:
        for dtype in ("float16", "bfloat16", "float32", "float64"):
            for op in ("sum", "avg"):
                for q in ("uint4", "uint8"):
                    rng = np.random.default_rng(zlib.crc32(f"{count} {dtype} {op}".encode()))
                    stack = rng.uniform(-2, 2, size=(world, count)).astype(np.float32)
                    if dtype == "bfloat16":  # numpy has no bfloat16: a torch tensor
                        t = torch.from_numpy(stack).to(torch.bfloat16)
                        exact_in = t.to(torch.float64).numpy()
                        x = t[rank].clone()
                    else:
                        exact_in = stack.astype(dtype).astype(np.float64)
                        x = stack[rank].astype(dtype)
                    want = exact_in.sum(axis=0) / (world if op == "avg" else 1)
                    before = comm.wire_stats()["sent"]
                    comm.all_reduce(x, op=op, quantize=q)
                    sent = comm.wire_stats()["sent"] - before
                    got = (x.to(torch.float64).numpy() if dtype == "bfloat16" else x.astype(np.float64))
                    raw = (x.view(torch.int16).numpy() if dtype == "bfloat16" else x).tobytes()
                    emit(event="quant", count=count, dtype=dtype, op=op, q=q, sent=sent,
                         err=float(np.max(np.abs(got - want))) if count else 0.0,
                         bound=quant_bound(exact_in, op, LEVELS[q], EPS[dtype]),
                         sha=hashlib.sha256(raw).hexdigest())
    comm.close()


def mode_timed(comm, count, quantize, reps):
    comm.update_topology()
    world, rank = comm.world, comm.rank
    q = {"none": False}.get(quantize, quantize)
    for i in range(reps):
        rng = np.random.default_rng(i)
        stack = rng.integers(-1000, 1000, size=(world, count)).astype(np.float32)
        x = stack[rank].copy()
        before = comm.wire_stats()["sent"]
        t0 = time.monotonic()
        comm.all_reduce(x, op="sum", quantize=q)
        t1 = time.monotonic()
        emit(event="timed", i=i, t0=t0, t1=t1, sent=comm.wire_stats()["sent"] - before,
             exact=bool(np.array_equal(x, stack.sum(axis=0, dtype=np.float32))),
             sha=hashlib.sha256(x.tobytes()).hexdigest())
    comm.close()


def mode_fail(comm, count):
    comm.update_topology()
    x = np.ones(count, np.float32)
    for i in range(1000):
        before = x.copy()
        emit(event="start", i=i, t=time.monotonic())
        try:
            comm.all_reduce(x, op="sum")
        except el.PeerFailure as e:
            emit(event="failure", i=i, t=time.monotonic(), restored=bool(np.array_equal(x, before)), error=str(e)[:300])
            break
        emit(event="done", i=i, t=time.monotonic())
    comm.close()


def mode_state(comm, size, have):
    comm.update_topology()
    state = {"big": np.arange(size, dtype=np.float64) if have else np.zeros(size, np.float64)}
    t0 = time.monotonic()
    info = comm.sync_state(state, revision=0 if have else None)
    emit(event="state", seconds=time.monotonic() - t0, fetched=info["fetched_bytes"],
         ok=bool(np.array_equal(state["big"], np.arange(size, dtype=np.float64))))
    comm.close()


def main():
    address, mode = sys.argv[1], sys.argv[2]
    comm = el.ElasticComm(address, secret=SECRET)
    if mode == "quant":
        mode_quant(comm, [int(c) for c in sys.argv[3].split(",")])
    elif mode == "timed":
        mode_timed(comm, int(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
    elif mode == "fail":
        mode_fail(comm, int(sys.argv[3]))
    elif mode == "state":
        mode_state(comm, int(sys.argv[3]), int(sys.argv[4]))


if __name__ == "__main__":
    main()
