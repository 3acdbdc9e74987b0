"""Producer -> collective pipelines (T3, ASPLOS 2024, in software): the collective of a
matrix product's output starts chunk by chunk, while the product of the next chunk is
being computed, instead of after the whole product.

    y = matmul_all_reduce(a, b, comm, chunks=8)      # row-parallel linear: sum_r a_r @ b_r
    y = matmul_reduce_scatter(a, b, comm, chunks=8)  # this rank's rows of sum_r a_r @ b_r
    y = all_gather_matmul(a, b, comm, chunks=8)      # concat_r(a_r) @ b

numpy arrays and torch tensors (CPU or CUDA) through any communicator with the partitioned
operations (collectives.mpi.MPIComm).  The chunks are row blocks of the output, split as
numpy.array_split splits the rows; a producer chunk is declared ready as soon as it is
written (CPU: when the product returned; CUDA: when the work queued on the current stream
has finished, which the engine polls off the caller's thread), and the engine reduces it
while the caller computes the next one.

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


def _declare(p, i, like):
    """Part i was written: ready now (CPU), or once the current stream's work is done (GPU)."""
    if _library(like) == "torch" and like.is_cuda:
        import torch
        p.ready_after(i, torch.cuda.current_stream(like.device))
    elif _library(like) == "cupy":
        import cupy
        p.ready_after(i, cupy.cuda.get_current_stream())
    else:
        p.ready(i)


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


def matmul_all_reduce(a, b, comm, chunks=8, op="sum", out=None):
    """y = op over the ranks of a @ b (each rank's own a and b), pipelined in `chunks` row
    blocks: block i is all-reduced while block i+1 is computed.  Returns y (M x N)."""
    _check(a, b, chunks, "matmul_all_reduce")
    m, n = a.shape[0], b.shape[1]
    if out is None:
        out = _arrays.empty(a, (m, n))
    p = comm.all_reduce_partitioned(out, partitions=chunks, op=op)
    for i, (lo, hi) in enumerate(_bounds(m, chunks)):
        if hi > lo:
            _matmul_into(out[lo:hi], a[lo:hi], b)
        _declare(p, i, out)
    return p.wait()


def matmul_reduce_scatter(a, b, comm, chunks=8, op="sum", out=None):
    """This rank's rows (numpy.array_split of the M rows over the ranks) of op over the
    ranks of a @ b, pipelined: part i of every rank's rows is computed, then reduced while
    part i+1 is computed.  Returns y (rows of this rank x N)."""
    _check(a, b, chunks, "matmul_reduce_scatter")
    m, n = a.shape[0], b.shape[1]
    full = _arrays.empty(a, (m, n))
    p = comm.reduce_scatter_partitioned(full, partitions=chunks, op=op, out=out)
    shares = _bounds(m, comm.size)
    parts = [_bounds(hi - lo, chunks) for lo, hi in shares]
    for i in range(chunks):
        for (lo, _), share_parts in zip(shares, parts):
            plo, phi = share_parts[i]
            if phi > plo:
                _matmul_into(full[lo + plo:lo + phi], a[lo + plo:lo + phi], b)
        _declare(p, i, full)
    return p.wait()


def all_gather_matmul(a, b, comm, chunks=8, out=None):
    """concat over the ranks of a (every rank's M x K) @ b (K x N), pipelined: part i of
    every rank's a is gathered while part i-1 is multiplied.  Returns y (size*M x N)."""
    _check(a, b, chunks, "all_gather_matmul")
    m, n = a.shape[0], b.shape[1]
    gathered = _arrays.empty(a, (comm.size, *a.shape))
    if out is None:
        out = _arrays.empty(a, (comm.size * m, n))
    p = comm.all_gather_partitioned(a, partitions=chunks, out=gathered)
    p.ready_range(0, chunks)  # the input exists already: the gather runs ahead of the products
    for i, (lo, hi) in enumerate(_bounds(m, chunks)):
        p.wait(i)
        if hi > lo:
            for q in range(comm.size):
                _matmul_into(out[q * m + lo:q * m + hi], gathered[q, lo:hi], b)
    p.wait()
    return out
