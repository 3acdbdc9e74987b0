"""Producer -> collective pipelines (T3, ASPLOS 2024, in software): the collective of a
matrix product's output starts chunk by chunk, while the product of the next chunk is
being computed, instead of after the whole product.

    y = matmul_all_reduce(a, b, comm, chunks=8)      # row-parallel linear: sum_r a_r @ b_r
    y = matmul_reduce_scatter(a, b, comm, chunks=8)  # this rank's rows of sum_r a_r @ b_r
    y = all_gather_matmul(a, b, comm, chunks=8)      # concat_r(a_r) @ b

numpy arrays and torch tensors (CPU or CUDA) through any communicator with the partitioned
operations (collectives.mpi.MPIComm).  `chunks` is the number of products: row blocks of
the output, the first half three times as tall as the second (with chunks = 8 the last
block is 1/16 of the rows: the collective of the last block is the part no product can
hide, so it is kept small, while the first blocks stay large enough for the product to run
at full rate); the collective's partitions are the blocks' rows split evenly (numpy.
array_split, 2 x chunks of them).  A block is declared ready as soon as it is written
(CPU: when the product returned; CUDA: when the work queued on the current stream has
finished, which the engine polls off the caller's thread), and the engine reduces it while
the caller computes the next one.

Results equal the unfused computation (the product, then the collective) up to
floating-point reassociation inside the product: the library may block a product of a row
chunk differently from the whole product, so elements may differ in the last bits
(float32: relative error below 1e-5 of the result's magnitude; float16/bfloat16 inputs:
below 1e-2), and the reduction over ranks is the same one the collective does unfused.
chunks=1 is the unfused computation exactly.
"""
import numpy as np

from collectives import _arrays


def _library(x):
    return _arrays.library_of(x)


def _matmul_into(out, a, b):
    """out = a @ b without a temporary where the library allows it."""
    lib = _library(out)
    if lib == "numpy":
        np.matmul(a, b, out=out)
    elif lib == "torch":
        import torch
        torch.matmul(a, b, out=out)
    else:
        out[...] = a @ b


def _declare(p, lo, hi, like):
    """Parts [lo, hi) were written: ready now (CPU), or once the work queued on the current
    stream is done (GPU: one event, polled by the engine, for all of them)."""
    if _library(like) == "torch" and like.is_cuda:
        import torch
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(like.device))
    elif _library(like) == "cupy":
        import cupy
        event = cupy.cuda.Event(disable_timing=True)
        event.record(cupy.cuda.get_current_stream())
    else:
        p.ready_range(lo, hi)
        return
    for i in range(lo, hi):
        p.ready_after(i, event)


def _schedule(chunks):
    """Parts of the collective per product, largest first: chunks // 2 products of 3 parts,
    then the rest of 1.  The collective of the last product cannot hide behind anything, so
    the last products are the smallest ones (with 8 products the last moves 1/16 of the
    data, not 1/8), while the first ones stay large enough for the product to run at its
    full rate.  chunks = 1: one product, one part (the unfused computation)."""
    if chunks == 1:
        return [1]
    return [3] * (chunks // 2) + [1] * (chunks - chunks // 2)


def _check(a, b, chunks, what):
    if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"{what}: a (M x K) and b (K x N) expected, got {tuple(a.shape)} and {tuple(b.shape)}")
    if _library(a) != _library(b):
        raise TypeError(f"{what}: a and b must be arrays of the same library")
    if not isinstance(chunks, (int, np.integer)) or chunks < 1:
        raise ValueError(f"{what}: chunks must be a positive int, not {chunks!r}")


def _bounds(rows, chunks):
    sizes = _arrays.rows_split(rows, chunks)
    out, at = [], 0
    for n in sizes:
        out.append((at, at + n))
        at += n
    return out


def _spans(bounds, groups):
    """(first part, end part, first row, end row) of each product."""
    out, at = [], 0
    for g in groups:
        out.append((at, at + g, bounds[at][0], bounds[at + g - 1][1]))
        at += g
    return out


def matmul_all_reduce(a, b, comm, chunks=8, op="sum", out=None):
    """y = op over the ranks of a @ b (each rank's own a and b), pipelined in `chunks` row
    blocks (largest first, see _schedule): a block is all-reduced while the next one is
    computed.  Returns y (M x N)."""
    _check(a, b, chunks, "matmul_all_reduce")
    m, n = a.shape[0], b.shape[1]
    if out is None:
        out = _arrays.empty(a, (m, n))
    groups = _schedule(chunks)
    parts = sum(groups)
    p = comm.all_reduce_partitioned(out, partitions=parts, op=op)
    for first, end, lo, hi in _spans(_bounds(m, parts), groups):
        if hi > lo:
            _matmul_into(out[lo:hi], a[lo:hi], b)
        _declare(p, first, end, out)
    return p.wait()


def matmul_reduce_scatter(a, b, comm, chunks=8, op="sum", out=None):
    """This rank's rows (numpy.array_split of the M rows over the ranks) of op over the
    ranks of a @ b, pipelined: a part of every rank's rows is computed, then reduced while
    the next part is computed (largest first, see _schedule).  Returns y (rows of this
    rank x N)."""
    _check(a, b, chunks, "matmul_reduce_scatter")
    m, n = a.shape[0], b.shape[1]
    full = _arrays.empty(a, (m, n))
    groups = _schedule(chunks)
    parts = sum(groups)
    p = comm.reduce_scatter_partitioned(full, partitions=parts, op=op, out=out)
    shares = _bounds(m, comm.size)
    spans = [_spans(_bounds(hi - lo, parts), groups) for lo, hi in shares]
    for i, (first, end, _, _) in enumerate(spans[0]):
        for (share_lo, _), share_spans in zip(shares, spans):
            _, _, lo, hi = share_spans[i]
            if hi > lo:
                _matmul_into(full[share_lo + lo:share_lo + hi], a[share_lo + lo:share_lo + hi], b)
        _declare(p, first, end, full)
    return p.wait()


def all_gather_matmul(a, b, comm, chunks=8, out=None):
    """concat over the ranks of a (every rank's M x K) @ b (K x N), pipelined: the products
    of a part of every rank's a run while the next part is gathered (smallest first: the
    first gather cannot hide behind a product).  Returns y (size*M x N)."""
    _check(a, b, chunks, "all_gather_matmul")
    m, n = a.shape[0], b.shape[1]
    gathered = _arrays.empty(a, (comm.size, *a.shape))
    if out is None:
        out = _arrays.empty(a, (comm.size * m, n))
    groups = _schedule(chunks)[::-1]
    parts = sum(groups)
    p = comm.all_gather_partitioned(a, partitions=parts, out=gathered)
    p.ready_range(0, parts)  # the input exists already: the gather runs ahead of the products
    for first, end, lo, hi in _spans(_bounds(m, parts), groups):
        p.wait(end - 1)  # parts arrive in order
        if hi > lo:
            for q in range(comm.size):
                _matmul_into(out[q * m + lo:q * m + hi], gathered[q, lo:hi], b)
    p.wait()
    return out
