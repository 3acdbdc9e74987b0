"""A peer process for tests/test_elastic.py: prints one JSON line per event.

    python elastic_worker.py ADDRESS MODE [ARGS]

dtypes SEED: every dtype x op against numpy; prints each result's SHA-256.
loop TARGET SIZE [--join] [--pause SECONDS] [--big N]: the issue's training loop (update_topology, sync_state,
    all_reduce avg) until the shared step counter reaches TARGET; checks results and the
    restore-on-failure rule, prints each committed step's state SHA-256.
"""
import hashlib
import json
import sys
import time
import zlib

import numpy as np

import collectives.elastic as el

SECRET = "test-secret"


def emit(**kw):
    print(json.dumps(kw), flush=True)


def reference(stack, op, dtype):
    """numpy's answer for the engine's semantics (integers wrap; avg truncates)."""
    if op in ("sum", "avg"):
        total = np.add.reduce(stack, axis=0, dtype=dtype)
        if op == "sum":
            return total
        n = stack.shape[0]
        if np.dtype(dtype).kind == "f":
            return (total / dtype(n)).astype(dtype)
        if np.dtype(dtype).kind == "u":
            return (total.astype(np.uint64) // np.uint64(n)).astype(dtype)
        t = total.astype(np.int64)
        return (np.sign(t) * (np.abs(t) // n)).astype(dtype)
    if op == "prod":
        return np.multiply.reduce(stack, axis=0, dtype=dtype)
    return (np.minimum if op == "min" else np.maximum).reduce(stack, axis=0)


def inputs(seed, world, dtype, count):
    rng = np.random.default_rng(seed)
    kind = np.dtype(dtype).kind
    if kind == "f":
        return rng.uniform(-2, 2, size=(world, count)).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=(world, count), endpoint=True, dtype=dtype)


def mode_dtypes(comm, seed):
    comm.update_topology()
    world, rank = comm.world, comm.rank
    cases = [(dtype, op, 20011)  # the same on every peer; odd, so segments and chunks are uneven
             for dtype in (np.float16, np.float32, np.float64, np.int8, np.int16, np.int32, np.int64,
                           np.uint8, np.uint16, np.uint32, np.uint64)
             for op in ("sum", "avg", "min", "max", "prod")]
    # Megabytes per connection: each connection moves its chunks on a thread of its own.
    cases += [(np.float32, "sum", 3_000_017), (np.int64, "max", 3_000_017), (np.float64, "avg", 3_000_017)]
    for dtype, op, count in cases:
        stack = inputs(zlib.crc32(f"{seed} {np.dtype(dtype).name} {op}".encode()), world, dtype, count)
        x = stack[rank].copy()
        comm.all_reduce(x, op=op)
        want = reference(stack, op, dtype)
        if np.dtype(dtype).kind == "f":
            rtol = {"float16": 2e-2, "float32": 1e-5, "float64": 1e-12}[np.dtype(dtype).name]
            ok = bool(np.allclose(x.astype(np.float64), want.astype(np.float64), rtol=rtol, atol=rtol * 4))
        else:
            ok = bool(np.array_equal(x, want))
        emit(dtype=np.dtype(dtype).name, op=op, ok=ok, sha=hashlib.sha256(x.tobytes()).hexdigest())
    comm.close()


def mode_quant(comm):
    """Quantized transfer: close to the exact answer, and the same bytes on every peer."""
    comm.update_topology()
    world, rank = comm.world, comm.rank
    for dtype in (np.float16, np.float32, np.float64):
        for op in ("sum", "avg"):
            stack = inputs(zlib.crc32(f"q {np.dtype(dtype).name} {op}".encode()), world, dtype, 300_001)
            x = stack[rank].copy()
            comm.all_reduce(x, op=op, quantize=True)
            want = reference(stack.astype(np.float64), op, np.float64)
            # Each hop quantizes to 1/255 of the chunk's range (here 4 per input, sums grow).
            err = float(np.max(np.abs(x.astype(np.float64) - want)))
            emit(event="quant", dtype=np.dtype(dtype).name, op=op, err=err,
                 sha=hashlib.sha256(x.tobytes()).hexdigest())
    comm.close()


def mode_async(comm):
    """Several operations in flight: issued at once, completed in order, each correct."""
    comm.update_topology()
    world, rank = comm.world, comm.rank
    xs = [np.full(100_000 + i, float(i + rank), np.float32) for i in range(8)]
    works = [comm.all_reduce(x, op="sum", async_op=True) for x in xs]
    for i, (w, x) in enumerate(zip(works, xs)):
        w.wait(timeout=60)
        assert w.is_completed()
        want = np.float32(i * world + world * (world - 1) // 2)
        emit(event="async", i=i, ok=bool(np.all(x == want)))
    comm.close()


def mode_loop(comm, target, size, join, pause, big=0):
    # A small state, a big gradient: the all-reduce is most of a step.  big: one more array
    # of that many float64 (a state a joiner fetches over several connections).
    state = {"step": np.zeros(1, np.int64), "w": np.zeros(min(size, 4096), np.float64)}
    if big:
        state["big"] = np.zeros(big, np.float64)
    fresh = join
    while True:
        try:
            comm.update_topology()
            info = comm.sync_state(state, revision=None if fresh else int(state["step"][0]))
        except el.PeerFailure as e:
            emit(event="sync_failure", error=str(e))
            continue
        fresh = False
        step = int(state["step"][0])
        if step >= target:
            break
        world, rank = comm.world, comm.rank
        g = np.full(size, float(step + 1) * (rank + 1))
        before = g.tobytes()
        t0 = time.monotonic()
        try:
            comm.all_reduce(g, op="avg")
            committed_at = time.monotonic()  # CLOCK_MONOTONIC: comparable across processes
        except el.PeerFailure as e:
            emit(event="failure", step=step, seconds=time.monotonic() - t0, restored=g.tobytes() == before,
                 error=str(e)[:200])
            continue
        want = np.float64((step + 1) * world * (world + 1) // 2) / world
        state["w"] += g[: state["w"].size]
        if big:  # every element changes every step, from the all-reduce's result
            state["big"] += g[0]
        state["step"] += 1
        time.sleep(pause)  # stands for the compute of a training step
        emit(event="step", step=step + 1, epoch=comm.epoch, world=world, ok=bool(np.all(g == want)), t=committed_at,
             fetched=info["fetched_bytes"], state=hashlib.sha256(b"".join(a.tobytes() for a in state.values())).hexdigest())
    emit(event="done", step=int(state["step"][0]))
    comm.close()


def main():
    address, mode = sys.argv[1], sys.argv[2]
    comm = el.ElasticComm(address, secret=SECRET)
    emit(event="connected", id=comm.peer_id, data_port=comm.data_port)
    if mode == "dtypes":
        mode_dtypes(comm, int(sys.argv[3]))
    elif mode == "quant":
        mode_quant(comm)
    elif mode == "async":
        mode_async(comm)
    elif mode == "loop":
        pause = float(sys.argv[sys.argv.index("--pause") + 1]) if "--pause" in sys.argv else 0.005
        big = int(sys.argv[sys.argv.index("--big") + 1]) if "--big" in sys.argv else 0
        mode_loop(comm, int(sys.argv[3]), int(sys.argv[4]), "--join" in sys.argv, pause, big)


if __name__ == "__main__":
    main()
