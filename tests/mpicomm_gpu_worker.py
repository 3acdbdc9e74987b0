"""GPU cases of MPIComm (run under mpiexec by tests/test_mpicomm_gpu.py): torch CUDA and
cupy buffers through every collective, the stream rules (the input is read after the work
queued on the current stream; wait() orders the current stream after the result), a
partitioned all-reduce whose parts are declared with ready_after(i, stream) while the
producer's kernels are still queued, and collectives.overlap with torch CUDA.  One line
per case: "case NAME ok" or "case NAME FAIL why"; "done" at the end."""
import sys
import traceback

import numpy as np

import collectives
from collectives import overlap


def main():
    comm = collectives.init()
    r, s = comm.rank, comm.size
    cases = []

    def case(name):
        def deco(fn):
            cases.append((name, fn))
            return fn
        return deco

    import torch
    dev = torch.device("cuda", 0)

    @case("torch_all_reduce_dtypes")
    def _():
        for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int64,
                      torch.uint8, torch.bool):
            n = 100003
            base = torch.arange(n, device=dev) % 7
            x = (base + r).to(dtype) if dtype != torch.bool else (base == r)
            want = sum(((base + q).to(torch.float64) if dtype != torch.bool else (base == q).to(torch.float64))
                       for q in range(s))
            op = "max" if dtype == torch.bool else "sum"
            if dtype == torch.bool:
                want = want > 0
            comm.all_reduce(x, op=op)
            got = x.to(torch.float64) if dtype != torch.bool else x
            if dtype == torch.bool:
                assert torch.equal(got, want), dtype
            elif dtype == torch.uint8:
                assert torch.equal(got, want.remainder(256)), dtype
            else:
                assert torch.allclose(got, want, rtol=1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-6), dtype

    @case("torch_stream_order")
    def _():
        # the input is written by a kernel still queued on a side stream made current
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            big = torch.randn(4096, 4096, device=dev)
            x = torch.zeros(1 << 20, device=dev)
            for _ in range(3):
                big = big @ big / 64          # keeps the stream busy
            x.add_(r + 1)                     # queued behind the products
            w = comm.all_reduce(x, async_op=True)
            w.wait()                          # orders `side` after the result
            y = x * 2                         # runs on `side`, after the result
        torch.cuda.synchronize()
        want = 2.0 * sum(q + 1 for q in range(s))
        assert torch.all(y == want), (y[:4], want)

    @case("torch_collectives")
    def _():
        x = torch.arange(12 * 5, device=dev, dtype=torch.float32).reshape(12, 5) * (r + 1)
        out = comm.reduce_scatter(x)
        full = torch.arange(12 * 5, device=dev, dtype=torch.float32).reshape(12, 5) * sum(range(1, s + 1))
        rows = np.array_split(np.arange(12), s)[r]
        assert torch.equal(out, full[rows[0]:rows[-1] + 1]), out
        g = comm.all_gather(torch.full((3,), float(r), device=dev))
        assert torch.equal(g.cpu(), torch.arange(s, dtype=torch.float32).repeat_interleave(3).reshape(s, 3))
        b = torch.full((1000,), float(r), device=dev)
        comm.broadcast(b, root=s - 1)
        assert torch.all(b == s - 1)
        a = comm.all_to_all(torch.arange(s * 4, device=dev, dtype=torch.int64) + 100 * r)
        want = torch.cat([torch.arange(4 * r, 4 * r + 4) + 100 * q for q in range(s)]).to(dev)
        assert torch.equal(a, want), a
        if s > 1:
            if r == 0:
                comm.send(torch.arange(10.0, device=dev), 1)
            elif r == 1:
                y = torch.empty(10, device=dev)
                assert comm.recv(y, src=None) == 0 and torch.equal(y.cpu(), torch.arange(10.0))

    @case("torch_partitioned_ready_after")
    def _():
        rows, cols, parts = 1024, 1024, 8
        out = torch.empty(rows, cols, device=dev)
        p = comm.all_reduce_partitioned(out, partitions=parts)
        step = rows // parts
        stream = torch.cuda.current_stream()
        for i in range(parts):
            out[i * step:(i + 1) * step].fill_(float(r + i))
            p.ready_after(i, stream)          # the fill is still queued: the engine polls
        p.wait()
        torch.cuda.synchronize()
        for i in range(parts):
            want = sum(q + i for q in range(s))
            assert torch.all(out[i * step:(i + 1) * step] == want), (i, out[i * step, 0].item(), want)

    @case("torch_overlap_matmul_all_reduce")
    def _():
        g = torch.Generator(device=dev).manual_seed(11 + r)
        a = torch.randn(2048, 512, device=dev, generator=g)
        b = torch.randn(512, 1024, device=dev, generator=g)
        y = overlap.matmul_all_reduce(a, b, comm, chunks=8)
        ref = a @ b
        comm.all_reduce(ref)
        err = (y - ref).abs().max().item() / ref.abs().max().item()
        assert err < 1e-5, err
        z = overlap.all_gather_matmul(a, b, comm, chunks=4)
        ref = torch.cat(list(comm.all_gather(a))) @ b
        assert (z - ref).abs().max().item() / ref.abs().max().item() < 1e-5

    try:
        import cupy

        @case("cupy_collectives")
        def _():
            x = cupy.arange(100003, dtype=cupy.float32) + r
            comm.all_reduce(x)
            want = np.arange(100003, dtype=np.float64) * s + sum(range(s))
            assert np.allclose(cupy.asnumpy(x), want, rtol=1e-6)
            g = comm.all_gather(cupy.full(5, r, dtype=cupy.int16))
            assert (cupy.asnumpy(g) == np.arange(s)[:, None]).all()
    except ImportError:
        pass

    for name, fn in cases:
        try:
            fn()
            print(f"case {name} ok", flush=True)
        except Exception as e:  # the test reports every case, then fails
            print(f"case {name} FAIL {type(e).__name__}: {e}", flush=True)
            traceback.print_exc()
    comm.close()
    print("done", flush=True)


if __name__ == "__main__":
    sys.exit(main())
