"""MPIComm: the collectives contract over any communicator of the host MPI.

    from collectives.mpi import MPIComm
    comm = MPIComm()                        # a private duplicate of MPI.COMM_WORLD
    comm = MPIComm(mpi4py_comm)             # or of any other
    comm.all_reduce(x, op="sum")            # in place: numpy, cupy, torch CPU or CUDA
    out = comm.all_gather(x)                # shape (size, *x.shape)
    p = comm.all_reduce_partitioned(out, partitions=8)
    for i in range(8): ...; p.ready(i)      # part i is reduced while the next is produced
    p.wait()

The data never passes through Python: commlib's collective engine (native/engine, in
libcommlib.so) reduces in its own loops, over shared memory when every rank is on one node
and over the host MPI's point-to-point otherwise, driven by a thread of its own so that an
async operation moves while the program computes.  GPU tensors over an MPI that is not
CUDA-aware are staged by the engine through pinned memory (a CUDA-aware MPI gets them as
they are); the operation reads its input after the work already queued on the current
stream, and wait() orders the current stream after the result.

Shapes: reduce_scatter splits the input along its first axis (numpy.array_split: the first
rows % size ranks get one row more; torch requires equal parts, this does not), all_gather
stacks the ranks' equal-shaped inputs along a new first axis, all_to_all sends block q of
the first axis (equal blocks) to rank q.  Every rank must pass the same shapes (and the same
root, op and dtype); a rank that does not makes the operation fail with MismatchError on
every rank, with no buffer written.  Integer sum and prod wrap; integer avg truncates toward
zero; bool sum/max are "or", prod/min "and".  Floating-point results are the same bytes on
every rank; they are computed in an order of their own (tolerance against numpy: a few ulps
of the sum's magnitude per rank for float32, float16 and bfloat16 rounded at every step).
"""
import atexit
import threading
import weakref
from collections import deque

import cffi
import numpy as np

from collectives import (CollectiveError, DoneWork, MismatchError, Timeout, Work, DTYPES, check_op)
from collectives import _arrays
from commlib import paths

_ffi = cffi.FFI()
_ffi.cdef("""
int commlib_engine_comm_create(int64_t fortran_comm, void **out, char *err, size_t errlen);
void commlib_engine_comm_free(void *c);
int commlib_engine_comm_info(void *c, int *rank, int *size, char *transport, size_t len);
int commlib_engine_start(void *c, int kind, int dtype, int op, const void *send, void *recv, int64_t count,
                         const int64_t *counts, int root, int tag, int partitions, int64_t unit,
                         void *stream, int flags, int64_t shape, void **out, char *err, size_t errlen);
int commlib_engine_ready(void *op, int lo, int hi);
int commlib_engine_ready_after(void *op, int partition, void *event);
int commlib_engine_test(void *op, int partition);
int commlib_engine_wait(void *op, int partition, int64_t timeout_ns);
int commlib_engine_wait_passive(void *op, int64_t timeout_ns);
int commlib_engine_status(void *op, char *msg, size_t len, int *source);
int commlib_engine_stream_wait(void *op, void *stream);
void commlib_engine_op_free(void *op);
long long commlib_stat(const char *name);
""")

ALLREDUCE, REDUCE_SCATTER, ALLGATHER, BROADCAST, ALLTOALL, SEND, RECV, BARRIER = range(8)
_NAMES = ["all_reduce", "reduce_scatter", "all_gather", "broadcast", "all_to_all", "send", "recv", "barrier"]
OK, PENDING, ERR_ARG, ERR_MISMATCH, ERR_MPI, ERR_CUDA, ERR_MEMORY, ERR_TIMEOUT, ERR_CLOSED, ERR_TRUNCATE = range(10)

_lib = None
_lib_lock = threading.Lock()
_dummy = np.zeros(8, np.uint8)  # the pointer of an empty buffer (never read or written)
_DUMMY = _dummy.ctypes.data


def lib():
    global _lib
    with _lib_lock:
        if _lib is None:
            _lib = _ffi.dlopen(paths.preload_library())
    return _lib


def _error(rc, message, what):
    if not message:
        text = f"{what} failed ({rc})"
    else:  # the engine's messages may already name the operation
        text = message if message.startswith(f"{what}:") or message.startswith(what.split("_partitioned")[0] + ":") \
            else f"{what}: {message}"
    if rc == ERR_MISMATCH or rc == ERR_TRUNCATE:
        return MismatchError(text)
    if rc == ERR_ARG:
        return ValueError(text)
    if rc == ERR_TIMEOUT:
        return Timeout(text)
    if rc == ERR_MEMORY:
        return MemoryError(text)
    return CollectiveError(text)


_open = weakref.WeakSet()


@atexit.register
def _close_all():
    for comm in list(_open):
        try:
            comm.close()
        except Exception:
            pass


class _Op:
    """One engine operation and the Python objects it uses (alive until it ended)."""

    __slots__ = ("handle", "keep", "result", "what", "device", "error", "source", "finished", "waiters",
                 "__weakref__")

    def __init__(self, handle, keep, result, what, device):
        self.handle, self.keep, self.result, self.what, self.device = handle, keep, result, what, device
        self.error, self.source, self.finished = None, None, False
        self.waiters = 0  # threads inside wait(): the sweep frees the handle only after they left

    def collect(self):
        """After the engine finished: the status (and the source of a receive)."""
        if self.finished:
            return
        L = _lib or lib()
        if self.what == "recv":
            source = _ffi.new("int *")
            rc = L.commlib_engine_status(self.handle, _ffi.NULL, 0, source)
            self.source = source[0]
        else:
            rc = L.commlib_engine_status(self.handle, _ffi.NULL, 0, _ffi.NULL)
        if rc != OK:
            msg = _ffi.new("char[]", 512)
            L.commlib_engine_status(self.handle, msg, 512, _ffi.NULL)
            self.error = _error(rc, _ffi.string(msg).decode(errors="replace"), self.what)
        self.finished = True

    def release(self):
        if self.handle is not None:
            lib().commlib_engine_op_free(self.handle)
            self.handle = None
        self.keep = None


class MPIWork(Work):
    """async_op=True's handle for MPIComm (see collectives.Work)."""

    def __init__(self, comm, op, partitions=1):
        self._comm, self._op, self.partitions = comm, op, partitions

    def _finish(self, stream_wait=True):
        op = self._op
        if not op.finished:
            op.collect()
        if stream_wait and op.device and op.error is None and op.handle is not None:
            view = op.device
            lib().commlib_engine_stream_wait(op.handle, _ffi.cast("void *", view.stream()))

    def wait(self, timeout=None, passive=False):
        """passive=True: sleep until the engine's thread finished it instead of moving it in
        this thread (a completion thread that must not take cores from the computation)."""
        # Another thread (waiting for another operation, or starting one) sweeps the operations
        # that ended and frees their handles: this one's stays valid while a thread waits in it.
        op, comm = self._op, self._comm
        with comm._lock:
            held = op.handle is not None
            if held:
                op.waiters += 1
        try:
            if held and not op.finished:
                ns = -1 if timeout is None else int(timeout * 1e9)
                rc = lib().commlib_engine_wait_passive(op.handle, ns) if passive else \
                    lib().commlib_engine_wait(op.handle, -1, ns)
                if rc == ERR_TIMEOUT:
                    raise Timeout(f"{op.what} did not finish within {timeout} s (it goes on)")
            with comm._lock:
                self._finish()
        finally:
            if held:
                with comm._lock:
                    op.waiters -= 1
        comm._sweep()
        if op.error is not None:
            raise op.error
        return op.source if op.what == "recv" else op.result

    def is_completed(self):
        op = self._op
        if op.finished or op.handle is None:
            return True
        with self._comm._lock:
            return op.finished or op.handle is None or bool(lib().commlib_engine_test(op.handle, -1))

    def exception(self):
        if not self.is_completed():
            return None
        with self._comm._lock:
            self._finish(stream_wait=False)
        return self._op.error


class PartitionedWork(MPIWork):
    """A partitioned operation: part i moves once ready(i) (or ready_after(i, event)) was
    called, in order of i; wait(i) waits for part i's result."""

    def ready(self, i):
        self.ready_range(i, i + 1)

    def ready_range(self, lo, hi):
        if not 0 <= lo <= hi <= self.partitions:
            raise ValueError(f"ready_range({lo}, {hi}): partitions are 0..{self.partitions - 1}")
        lib().commlib_engine_ready(self._op.handle, lo, hi)

    def ready_after(self, i, event_or_stream):
        """Part i moves once the CUDA event (torch.cuda.Event, cupy Event) completed, or the
        work queued on the stream (torch.cuda.Stream, cupy Stream) until now; the engine
        polls it, the caller does not wait."""
        if not 0 <= i < self.partitions:
            raise ValueError(f"ready_after({i}): partitions are 0..{self.partitions - 1}")
        event = _cuda_event(event_or_stream)
        self._op.keep.append(event)  # alive until the operation ended
        handle = getattr(event, "cuda_event", None)
        if handle is None:
            handle = event.ptr
        lib().commlib_engine_ready_after(self._op.handle, i, _ffi.cast("void *", handle))

    def wait(self, i=None, timeout=None):
        op = self._op
        if i is None:
            return super().wait(timeout)
        if not 0 <= i < self.partitions:
            raise ValueError(f"wait({i}): partitions are 0..{self.partitions - 1}")
        if op.handle is not None and not op.finished:
            ns = -1 if timeout is None else int(timeout * 1e9)
            if lib().commlib_engine_wait(op.handle, i, ns) == ERR_TIMEOUT:
                raise Timeout(f"{op.what}: part {i} did not finish within {timeout} s")
            if lib().commlib_engine_test(op.handle, -1):
                return super().wait()
            if op.device:
                lib().commlib_engine_stream_wait(op.handle, _ffi.cast("void *", op.device.stream()))
            return op.result
        return super().wait()

    def is_completed(self, i=None):
        op = self._op
        if i is None or op.handle is None or op.finished:
            return super().is_completed()
        return bool(lib().commlib_engine_test(op.handle, i))


def _shape_hash(shape):
    """A number that differs between shapes of the same size (0 for none)."""
    h = 1469598103934665603
    for n in shape:
        h = ((h ^ int(n)) * 1099511628211) & ((1 << 61) - 1)
    return h if shape else 0


def _row_elements(v):
    """Elements per row of the first axis (1 for a 1-D array)."""
    return int(np.prod(v.shape[1:], dtype=np.int64)) if len(v.shape) > 1 else 1


def _cuda_event(event_or_stream):
    """A CUDA event for a torch/cupy event or stream (a stream: an event recorded on it now)."""
    mod = type(event_or_stream).__module__
    if mod.startswith("torch"):
        import torch
        if isinstance(event_or_stream, torch.cuda.Event):
            return event_or_stream
        event = torch.cuda.Event()
        event.record(event_or_stream)
        return event
    if mod.startswith("cupy"):
        import cupy
        if isinstance(event_or_stream, cupy.cuda.Event):
            return event_or_stream
        event = cupy.cuda.Event(disable_timing=True)
        event.record(event_or_stream)
        return event
    raise TypeError(f"ready_after takes a CUDA event or stream of torch or cupy, not {type(event_or_stream).__name__}")


class MPIComm:
    """The collectives contract over an MPI communicator (default: MPI.COMM_WORLD; the engine
    works on a private duplicate, so the program's own messages never meet its)."""

    def __init__(self, comm=None):
        from mpi4py import MPI
        self.mpi_comm = comm if comm is not None else MPI.COMM_WORLD
        err = _ffi.new("char[]", 512)
        out = _ffi.new("void **")
        rc = lib().commlib_engine_comm_create(self.mpi_comm.py2f(), out, err, 512)
        self._err, self._outp = _ffi.new("char[]", 512), _ffi.new("void **")  # for _start, under _lock
        if rc != OK:
            raise _error(rc, _ffi.string(err).decode(), "MPIComm")
        self._handle = out[0]
        rank, size, transport = _ffi.new("int *"), _ffi.new("int *"), _ffi.new("char[]", 16)
        lib().commlib_engine_comm_info(self._handle, rank, size, transport, 16)
        self.rank, self.size = rank[0], size[0]
        self.transport = _ffi.string(transport).decode()  # "shm" or "mpi"
        self._pending = deque()  # operations not yet collected, in order
        self._lock = threading.Lock()
        _open.add(self)

    # -- the engine --
    def _start(self, kind, what, dtype, op, send, recv, count=0, counts=None, root=0, tag=0, partitions=1,
               unit=1, result=None, async_op=False, work_class=MPIWork, shape=None):
        if self._handle is None:
            raise CollectiveError(f"{what}: the communicator is closed")
        L = _lib
        device = recv if recv is not None and recv.device else send if send is not None and send.device else None
        stream = _ffi.cast("void *", device.stream()) if device else _ffi.NULL
        c_counts = _ffi.new("int64_t[]", [int(n) for n in counts]) if counts is not None else _ffi.NULL
        send_ptr = _ffi.cast("void *", send.ptr or _DUMMY) if send is not None else _ffi.NULL
        recv_ptr = _ffi.cast("void *", recv.ptr or _DUMMY) if recv is not None else _ffi.NULL
        waits = not async_op and work_class is MPIWork
        flags = (1 if waits else 0) | (2 if work_class is PartitionedWork else 0)
        # every rank must pass the same shape: it joins the operation's signature
        buffer = recv if recv is not None else send
        shape_hash = _shape_hash(shape if shape is not None else buffer.shape if buffer is not None else ())
        with self._lock:
            if self._pending:
                self._sweep_locked()
            rc = L.commlib_engine_start(self._handle, kind, DTYPES[dtype], op, send_ptr, recv_ptr, count, c_counts,
                                        root, tag, partitions, unit, stream, flags, shape_hash, self._outp,
                                        self._err, 512)
            if rc != OK:
                raise _error(rc, _ffi.string(self._err).decode(), what)
            entry = _Op(self._outp[0], [send, recv, c_counts], result, what, device)
            queued = not waits or bool(self._pending)  # behind async operations: they keep the order
            if queued:
                self._pending.append(entry)
        if not queued:
            # the fast path: the buffers live through this call, nothing to keep
            L.commlib_engine_wait(entry.handle, -1, -1)
            entry.collect()
            if device is not None and entry.error is None:
                L.commlib_engine_stream_wait(entry.handle, stream)
            entry.release()
            if entry.error is not None:
                raise entry.error
            return entry.source if what == "recv" else result
        work = work_class(self, entry, partitions)
        if async_op or work_class is not MPIWork:
            return work
        return work.wait()

    def _sweep_locked(self):
        """Frees the operations that ended (they end in order)."""
        while self._pending:
            entry = self._pending[0]
            if entry.waiters:
                break
            if entry.handle is not None and not entry.finished:
                if not _lib.commlib_engine_test(entry.handle, -1):
                    break
                entry.collect()
            entry.release()
            self._pending.popleft()

    def _sweep(self):
        with self._lock:
            self._sweep_locked()

    # -- the contract --
    def all_reduce(self, x, op="sum", async_op=False):
        """x = op over the ranks of x, in place; returns x (async_op: a Work)."""
        v = _arrays.view(x, "all_reduce")
        code = check_op(op, v.dtype)
        return self._start(ALLREDUCE, "all_reduce", v.dtype, code, None, v, count=v.count, result=x,
                           async_op=async_op)

    def reduce_scatter(self, x, op="sum", out=None, async_op=False):
        """out = this rank's rows of op over the ranks of x (x split along its first axis as
        numpy.array_split does); returns out."""
        v = _arrays.view(x, "reduce_scatter", writeable=False)
        code = check_op(op, v.dtype)
        counts, out = self._row_shares(x, v, "reduce_scatter", out)
        o = _arrays.view(out, "reduce_scatter")
        return self._start(REDUCE_SCATTER, "reduce_scatter", v.dtype, code, v, o, counts=counts, result=out,
                           async_op=async_op, shape=v.shape)

    def all_gather(self, x, out=None, async_op=False):
        """out[q] = rank q's x (every rank passes the same shape); returns out, of shape
        (size, *x.shape)."""
        v = _arrays.view(x, "all_gather", writeable=False)
        shape = (self.size, *v.shape)
        out = self._out(x, out, shape, "all_gather")
        o = _arrays.view(out, "all_gather")
        return self._start(ALLGATHER, "all_gather", v.dtype, 0, v, o, counts=[v.count] * self.size, result=out,
                           async_op=async_op)

    def broadcast(self, x, root=0, async_op=False):
        """x = root's x, in place; returns x."""
        self._check_rank(root, "broadcast", "root")
        v = _arrays.view(x, "broadcast")
        return self._start(BROADCAST, "broadcast", v.dtype, 0, None, v, count=v.count, root=root, result=x,
                           async_op=async_op)

    def all_to_all(self, x, out=None, async_op=False):
        """Block q of x's first axis goes to rank q; out block q comes from rank q (x's first
        axis must split into size equal blocks); returns out, shaped like x."""
        v = _arrays.view(x, "all_to_all", writeable=False)
        rows = v.shape[0] if v.shape else 0
        if not v.shape or rows % self.size:
            raise ValueError(f"all_to_all: the first axis ({rows}) must split into {self.size} equal blocks")
        out = self._out(x, out, v.shape, "all_to_all")
        o = _arrays.view(out, "all_to_all")
        block = v.count // self.size
        return self._start(ALLTOALL, "all_to_all", v.dtype, 0, v, o, counts=[block] * self.size, result=out,
                           async_op=async_op)

    def send(self, x, dst, tag=0, async_op=False):
        self._check_rank(dst, "send", "dst")
        v = _arrays.view(x, "send", writeable=False)
        return self._start(SEND, "send", v.dtype, 0, v, None, count=v.count, root=dst, tag=tag, result=None,
                           async_op=async_op)

    def recv(self, x, src=None, tag=0, async_op=False):
        """Fills x from rank src (None: any rank); returns the sender's rank."""
        if src is not None:
            self._check_rank(src, "recv", "src")
        v = _arrays.view(x, "recv")
        return self._start(RECV, "recv", v.dtype, 0, None, v, count=v.count, root=-1 if src is None else src,
                           tag=tag, result=x, async_op=async_op)

    def barrier(self, async_op=False):
        return self._start(BARRIER, "barrier", "uint8", 0, None, None, result=None, async_op=async_op)

    # -- partitioned (T3 in software) --
    # Parts split the first axis as numpy.array_split does (rows i*R/k ...: a producer that
    # writes rows in order declares part i ready after its rows).

    def all_reduce_partitioned(self, x, partitions, op="sum"):
        """A PartitionedWork: part i of x (rows, array_split of the first axis) is all-reduced
        in place once ready(i) was called, after part i-1."""
        v = _arrays.view(x, "all_reduce_partitioned")
        code = check_op(op, v.dtype)
        self._check_parts(partitions, "all_reduce_partitioned")
        return self._start(ALLREDUCE, "all_reduce_partitioned", v.dtype, code, None, v, count=v.count,
                           partitions=partitions, unit=_row_elements(v), result=x, async_op=True,
                           work_class=PartitionedWork)

    def reduce_scatter_partitioned(self, x, partitions, op="sum", out=None):
        """Part i is part i of every rank's rows of x (see reduce_scatter: rank q's rows,
        split again in `partitions`), reduced into part i of out once ready(i) was called."""
        v = _arrays.view(x, "reduce_scatter_partitioned", writeable=False)
        code = check_op(op, v.dtype)
        self._check_parts(partitions, "reduce_scatter_partitioned")
        counts, out = self._row_shares(x, v, "reduce_scatter_partitioned", out)
        o = _arrays.view(out, "reduce_scatter_partitioned")
        return self._start(REDUCE_SCATTER, "reduce_scatter_partitioned", v.dtype, code, v, o, counts=counts,
                           partitions=partitions, unit=_row_elements(v), result=out, async_op=True, shape=v.shape,
                           work_class=PartitionedWork)

    def all_gather_partitioned(self, x, partitions, out=None):
        """Part i of x (rows) goes to part i of every rank's block of out once ready(i) was
        called; wait(i) waits for part i of every block."""
        v = _arrays.view(x, "all_gather_partitioned", writeable=False)
        self._check_parts(partitions, "all_gather_partitioned")
        out = self._out(x, out, (self.size, *v.shape), "all_gather_partitioned")
        o = _arrays.view(out, "all_gather_partitioned")
        return self._start(ALLGATHER, "all_gather_partitioned", v.dtype, 0, v, o, counts=[v.count] * self.size,
                           partitions=partitions, unit=_row_elements(v), result=out, async_op=True,
                           work_class=PartitionedWork)

    # -- helpers --
    def _check_rank(self, r, what, name):
        if not isinstance(r, (int, np.integer)) or not 0 <= r < self.size:
            raise ValueError(f"{what}: {name}={r!r} is not a rank of a communicator of {self.size}")

    @staticmethod
    def _check_parts(partitions, what):
        if not isinstance(partitions, (int, np.integer)) or partitions < 1:
            raise ValueError(f"{what}: partitions must be a positive int, not {partitions!r}")

    def _out(self, like, out, shape, what):
        if out is None:
            return _arrays.empty(like, shape)
        if tuple(out.shape) != tuple(shape) or _arrays.dtype_name(out) != _arrays.dtype_name(like):
            raise ValueError(f"{what}: out must have shape {tuple(shape)} and dtype {_arrays.dtype_name(like)}, "
                             f"not {tuple(out.shape)} {_arrays.dtype_name(out)}")
        if _arrays.library_of(out) != _arrays.library_of(like):
            raise TypeError(f"{what}: out and the input must be arrays of the same library")
        return out

    def _row_shares(self, x, v, what, out):
        """Element counts of every rank's rows (array_split of the first axis) and out."""
        if not v.shape:
            raise ValueError(f"{what}: the input needs at least one axis")
        rows = _arrays.rows_split(v.shape[0], self.size)
        per_row = int(np.prod(v.shape[1:], dtype=np.int64)) if len(v.shape) > 1 else 1
        counts = [r * per_row for r in rows]
        out = self._out(x, out, (rows[self.rank], *v.shape[1:]), what)
        return counts, out

    def close(self):
        """Waits for this communicator's operations and frees it."""
        if getattr(self, "_handle", None) is None:
            return
        with self._lock:
            handle, self._handle = self._handle, None
            lib().commlib_engine_comm_free(handle)
            for entry in self._pending:
                entry.collect()
                entry.release()
            self._pending.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def stat(name):
    """One of commlib's counters ("engine.ops", "engine.shm_steps", ...)."""
    return lib().commlib_stat(name.encode())
