"""PyTorch: the "commlib" torch.distributed backend, and data parallelism over the elastic engine.

    import torch.distributed as dist
    import collectives.torch                    # registers the "commlib" backend
    dist.init_process_group("commlib")          # under `commlib run -n 4 python train.py`
    model = torch.nn.parallel.DistributedDataParallel(model)

Rank and size come from MPI: under `commlib run` / `mpiexec` the import fills RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT (where the launcher did not), so
`init_process_group("commlib")` needs no arguments.  "cpu:gloo,cuda:commlib" and
`new_group(ranks, backend="commlib")` work too (a group is an MPI communicator of its ranks).

Every operation is commlib's collective engine (collectives.mpi.MPIComm) underneath: the
data never passes through Python, an operation moves while the program computes, CUDA tensors
travel over an MPI that is not CUDA-aware.  CUDA semantics are NCCL's: an operation reads its
input after the work already queued on the current stream, and Work.wait() (or the future)
orders the current stream after the result, without blocking the host on the GPU.  One
completion thread per group waits (asleep) for the engine's operations in order and hands the
futures to delivery threads, which run their callbacks (a callback may issue more operations
and wait for them; a new delivery thread starts only when none is idle): no thread per
operation.

Supported: allreduce (and coalesced), broadcast, allgather, all_gather_into_tensor /
_allgather_base (and coalesced), reduce_scatter, reduce_scatter_tensor / _reduce_scatter_base
(and coalesced), alltoall, alltoall_base (uneven splits included), barrier, send, recv (and
from any source), reduce, gather, scatter; ReduceOp SUM, AVG, MIN, MAX, PRODUCT, PREMUL_SUM,
BAND/BOR/BXOR (integers and bool); CPU and CUDA tensors of float16, bfloat16, float32,
float64, int8-64, uint8-64, bool (complex travels as real pairs: SUM/AVG/PREMUL_SUM only).
reduce, gather and scatter move a whole all-reduce / all-gather / broadcast's worth of data
(training loops do not use them on their hot path).  Anything else raises NotImplementedError
naming it.
"""
import atexit
import contextlib
import inspect
import os
import socket
import threading
import weakref
from collections import deque

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import ProcessGroup as _ProcessGroup, Work as _Work

from collectives import CollectiveError

__all__ = ["ProcessGroupCommlib", "CommlibWork", "ElasticDataParallel", "quantized_hook", "BACKEND"]

BACKEND = "commlib"
_R = dist.ReduceOp.RedOpType
_OPS = {_R.SUM: "sum", _R.AVG: "avg", _R.PRODUCT: "prod", _R.MIN: "min", _R.MAX: "max", _R.BAND: "band",
        _R.BOR: "bor", _R.BXOR: "bxor"}


def _op_name(reduce_op, what, tensors=()):
    """(engine op name, premul factor or None) of a torch ReduceOp."""
    kind = getattr(reduce_op, "op", reduce_op)
    if kind not in (_R.SUM, _R.AVG, _R.PREMUL_SUM) and any(t.is_complex() for t in tensors):
        raise ValueError(f"commlib backend: {what} with ReduceOp {kind} is not defined on complex tensors "
                         "(SUM, AVG and PREMUL_SUM are)")
    if kind == _R.PREMUL_SUM:
        factor = getattr(reduce_op, "factor", None)
        if factor is None:
            raise NotImplementedError(f"commlib backend: {what} with PREMUL_SUM needs a torch whose ReduceOp shows "
                                      f"its factor to Python backends (torch {torch.__version__} does not): scale "
                                      "the tensor and use SUM")
        return "sum", factor
    if kind not in _OPS:
        raise NotImplementedError(f"commlib backend: {what} with ReduceOp {kind} is not supported")
    return _OPS[kind], None


# -- rank and size from MPI ---------------------------------------------------------------

_LAUNCHER_VARS = ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK", "MPI_LOCALRANKID", "PMI_SIZE",
                  "MV2_COMM_WORLD_RANK", "SLURM_PROCID")


def mpi_environment(force=False):
    """Fills RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT from
    MPI (rank 0 picks a free port) where they are not set.  Called by the import when an MPI
    launcher started this process; returns True when it filled them."""
    if not force and ("RANK" in os.environ or not any(v in os.environ for v in _LAUNCHER_VARS)):
        return False
    from mpi4py import MPI
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    node = world.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    hosts = world.allgather(socket.gethostname())
    port = None
    if rank == 0:
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        addr = "127.0.0.1" if len(set(hosts)) == 1 else socket.gethostbyname(hosts[0])
        port = (addr, port)
    addr, port = world.bcast(port, root=0)
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(size))
    os.environ.setdefault("LOCAL_RANK", str(node.Get_rank()))
    os.environ.setdefault("LOCAL_WORLD_SIZE", str(node.Get_size()))
    os.environ.setdefault("MASTER_ADDR", addr)
    os.environ.setdefault("MASTER_PORT", str(port))
    node.Free()
    return True


# -- Work --------------------------------------------------------------------------------

class CommlibWork(_Work):
    """One operation of the commlib group: wait() (any thread; for CUDA tensors it orders the
    current stream after the result), get_future() (completed by the group's completion
    thread; CUDA futures carry the stream dependency as NCCL's do), is_completed(),
    exception(), source rank of a receive."""

    def __init__(self, pg, works, result, device=None, finish=None, recv=False):
        super().__init__()
        self._pg, self._works, self._finish, self._result = pg, works, finish, result
        self._device, self._recv = device, recv
        self._future = torch.futures.Future(devices=[device] if device is not None else None)
        self._lock = threading.Lock()
        self._done, self._delivered, self._error, self._source, self._event = False, False, None, -1, None

    def _complete(self, passive=False):
        """Waits for the engine and runs the copy-backs (once; any thread).  passive: the
        group's completion thread sleeps until the engine's thread finished the operation
        (a program's own wait() moves it, which is quicker)."""
        if self._done:
            return
        with self._lock:
            if self._done:
                return
            try:
                ctx = torch.cuda.stream(self._pg._side_stream(self._device)) if self._device is not None \
                    else contextlib.nullcontext()
                with ctx:
                    for w in self._works:
                        r = w.wait(passive=passive)
                        if self._recv:
                            self._source = int(r)
                    if self._finish is not None:
                        self._finish()
                    if self._device is not None:  # the future's event: after the copies on the side stream
                        self._event = torch.cuda.Event()
                        self._event.record()
            except BaseException as e:  # noqa: B902 - every failure reaches the waiter
                self._error = e
            self._works = self._finish = None
            self._done = True

    def _deliver(self):
        """Completes the future (once).  Its callbacks run here: they may issue operations
        and wait for them (PowerSGD does), so the group's completion thread never runs this."""
        with self._lock:
            if self._delivered:
                return
            self._delivered = True
        if self._error is not None:
            self._future.set_exception(self._error)
        elif self._device is not None:
            with torch.cuda.stream(self._pg._side_stream(self._device)):
                torch.cuda.current_stream().wait_event(self._event)
                self._future.set_result(self._result)
        else:
            self._future.set_result(self._result)

    def wait(self, timeout=None):
        self._complete()
        self._deliver()  # the future is done when wait() returns, as NCCL's is
        if self._error is not None:
            raise self._error
        if not self._future.done():  # a delivery thread is completing it at this moment
            self._future.wait()
        if self._device is not None:
            torch.cuda.current_stream(self._device).wait_event(self._event)  # no host block
        return True

    def synchronize(self):
        self.wait()

    def get_future(self):
        return self._future

    def is_completed(self):
        if self._done:
            return True
        try:
            return all(w.is_completed() for w in (self._works or ()))
        except Exception:
            return True

    def is_success(self):
        return self._done and self._error is None

    def exception(self):
        return self._error

    def result(self):
        self.wait()
        return self._result

    def source_rank(self):
        self._complete()
        return self._source

    _source_rank = source_rank


class _Coalesced(CommlibWork):
    """Several operations issued between _start_coalescing and _end_coalescing."""

    def __init__(self, pg, parts, device):
        super().__init__(pg, [], [t for p in parts for t in (p._result or [])], device)
        self._parts = parts

    def _complete(self, passive=False):
        for p in self._parts:
            p._complete(passive)
        with self._lock:
            if self._done:
                return
            self._error = next((p._error for p in self._parts if p._error is not None), None)
            if self._device is not None and self._error is None:
                with torch.cuda.stream(self._pg._side_stream(self._device)):
                    for p in self._parts:
                        if p._event is not None:
                            torch.cuda.current_stream().wait_event(p._event)
                    self._event = torch.cuda.Event()
                    self._event.record()
            self._done = True


# -- the process group ------------------------------------------------------------------

def _contig(t):
    """(a contiguous tensor the engine may use, a copy-back or None)."""
    if t.is_contiguous():
        return t, None
    c = t.contiguous()
    return c, (lambda: t.copy_(c))


def _real(t):
    return torch.view_as_real(t) if t.is_complex() else t


class ProcessGroupCommlib(_ProcessGroup):
    """The torch.distributed process group over commlib's collective engine (see the module)."""

    def __init__(self, rank, size, comm=None, others=None, timeout=None):
        super().__init__(rank, size)
        from collectives.mpi import MPIComm
        self.comm = comm if comm is not None else MPIComm()
        if (self.comm.rank, self.comm.size) != (rank, size):
            raise CollectiveError(
                f"commlib backend: torch says rank {rank} of {size} but MPI says rank {self.comm.rank} of "
                f"{self.comm.size}: start the processes with `commlib run` / mpiexec (not torchrun), and let "
                "`import collectives.torch` set RANK and WORLD_SIZE")
        self._others = others or {}  # device type -> another backend ("cpu:gloo,cuda:commlib")
        self._timeout = timeout
        self._pending = deque()  # issued, the engine not yet waited for (the completion thread)
        self._cv = threading.Condition()
        self._deliveries = deque()  # futures to complete (the delivery threads)
        self._dcv = threading.Condition()
        self._idle = self._deliverers = 0
        self._delivery_threads = []
        self._streams = {}
        self._coalescing = None
        self._closed = False
        self._thread = threading.Thread(target=self._completer, name="commlib-torch-completion", daemon=True)
        self._thread.start()
        _groups.add(self)

    # -- plumbing --
    def getBackendName(self):
        return BACKEND

    # The group's name and description live in the C++ backends torch registers on a
    # ProcessGroup; this one has none (it is the backend), so it keeps them itself.
    def _set_group_name(self, name):
        self._group_name = name

    @property
    def group_name(self):
        return getattr(self, "_group_name", "")

    def _set_group_desc(self, desc):
        self._group_desc = desc

    @property
    def group_desc(self):
        return getattr(self, "_group_desc", "")

    def name(self):
        return BACKEND

    @property
    def _device_types(self):
        return [torch.device("cpu"), torch.device("cuda")]

    def _side_stream(self, device):
        s = self._streams.get(device)
        if s is None:
            s = self._streams[device] = torch.cuda.Stream(device=device)
        return s

    def _completer(self):
        """Engine waits and copy-backs, in issue order; futures go to the delivery threads."""
        while True:
            with self._cv:
                while not self._pending and not self._closed:
                    self._cv.wait()
                stop = not self._pending
                work = None if stop else self._pending[0]
            if stop:
                with self._dcv:
                    self._deliveries.append(None)
                    self._dcv.notify_all()
                return
            work._complete(passive=True)
            with self._cv:
                self._pending.popleft()
            with self._dcv:
                self._deliveries.append(work)
                if self._idle == 0 and self._deliverers < 64:
                    self._deliverers += 1
                    t = threading.Thread(target=self._deliverer, name="commlib-torch-futures", daemon=True)
                    self._delivery_threads.append(t)
                    t.start()
                self._dcv.notify()

    def _deliverer(self):
        """Completes futures.  A callback that blocks (waits for a later operation's future)
        holds only its own thread: another one is started when none is idle; spare threads
        leave after a few idle seconds (one stays)."""
        while True:
            with self._dcv:
                self._idle += 1
                while not self._deliveries:
                    if not self._dcv.wait(timeout=5.0) and self._deliverers > 1 and not self._deliveries:
                        self._idle -= 1
                        self._deliverers -= 1
                        return
                self._idle -= 1
                work = self._deliveries[0]
                if work is None:  # shut down
                    self._deliverers -= 1
                    return
                self._deliveries.popleft()
            work._deliver()

    def _issue(self, works, result, device=None, finish=None, recv=False):
        work = CommlibWork(self, works, result, device, finish, recv)
        if self._coalescing is not None:
            self._coalescing.append(work)
        self._enqueue(work)
        return work

    def _enqueue(self, work):
        with self._cv:
            self._pending.append(work)
            self._cv.notify()

    def _other(self, tensor):
        """The backend of another library for this tensor's device, or None."""
        if self._others:
            return self._others.get(tensor.device.type)
        return None

    @staticmethod
    def _device_of(tensors):
        for t in tensors:
            if t.is_cuda:
                return t.device
        return None

    def shutdown(self):
        """Finishes what was issued, stops the group's threads, frees the communicator (also at
        exit: threads left running into the interpreter's teardown abort it)."""
        if self._closed:
            return
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=60)
        for t in list(self._delivery_threads):
            t.join(timeout=60)
        self.comm.close()
        _groups.discard(self)

    def abort(self):
        self.shutdown()

    # -- coalescing (dist._coalescing_manager) --
    def _start_coalescing(self, device=None):
        self._coalescing = []

    def _end_coalescing(self, device=None):
        parts, self._coalescing = self._coalescing or [], None
        dev = next((p._device for p in parts if p._device is not None), None)
        work = _Coalesced(self, parts, dev)
        self._enqueue(work)
        return work

    # -- the operations --
    def allreduce(self, tensors, opts=None):
        if not isinstance(tensors, (list, tuple)):
            tensors = [tensors]
        if opts is not None and not hasattr(opts, "reduceOp"):  # allreduce(tensors, ReduceOp)
            op = opts
        else:
            op = opts.reduceOp if opts is not None else dist.ReduceOp.SUM
        other = self._other(tensors[0])
        if other is not None:
            o = dist.AllreduceOptions()
            o.reduceOp = op
            return other.allreduce(tensors, o)
        name, factor = _op_name(op, "allreduce", tensors)
        works, finishes = [], []
        for t in tensors:
            t = _real(t)
            if factor is not None:  # scaled in a copy: a failed operation leaves t as it was
                c = t.clone(memory_format=torch.contiguous_format)
                c.mul_(factor)
                back = _copier(t, c)
            else:
                c, back = _contig(t)
            works.append(self.comm.all_reduce(c, op=name, async_op=True))
            if back:
                finishes.append(back)
        return self._issue(works, list(tensors), self._device_of(tensors), _run_all(finishes))

    def allreduce_coalesced(self, tensors, opts=None):
        o = dist.AllreduceOptions()
        if opts is not None:
            o.reduceOp = opts.reduceOp
        return self.allreduce(list(tensors), o)

    def broadcast(self, tensors, opts=None):
        if not isinstance(tensors, (list, tuple)):
            tensors = [tensors]
        root = opts.rootRank if opts is not None else 0
        other = self._other(tensors[0])
        if other is not None:
            return other.broadcast(tensors, opts)
        works, finishes = [], []
        for t in tensors:
            c, back = _contig(_real(t))
            works.append(self.comm.broadcast(c, root=root, async_op=True))
            if back:
                finishes.append(back)
        return self._issue(works, list(tensors), self._device_of(tensors), _run_all(finishes))

    def allgather(self, output_lists, inputs, opts=None):
        if isinstance(inputs, torch.Tensor):
            inputs, output_lists = [inputs], [output_lists]
        other = self._other(inputs[0])
        if other is not None:
            return other.allgather(output_lists, inputs, opts or dist.AllgatherOptions())
        works, finishes = [], []
        for outs, x in zip(output_lists, inputs):
            if len(outs) != self.size():
                raise ValueError(f"allgather: {len(outs)} output tensors for a group of {self.size()}")
            for o in outs:
                if o.shape != x.shape or o.dtype != x.dtype:
                    raise ValueError(f"allgather: every output must be shaped like the input {tuple(x.shape)} "
                                     f"{x.dtype}, not {tuple(o.shape)} {o.dtype} (uneven all_gather is not supported)")
            xr, _ = _contig(_real(x))
            tmp = torch.empty((self.size(), *xr.shape), dtype=xr.dtype, device=xr.device)
            works.append(self.comm.all_gather(xr, out=tmp, async_op=True))
            finishes.append(_scatter_rows(tmp, [_real(o) for o in outs]))
        return self._issue(works, list(output_lists), self._device_of(inputs), _run_all(finishes))

    def _allgather_base(self, output, input, opts=None):
        other = self._other(input)
        if other is not None:
            return other._allgather_base(output, input, opts or dist.AllgatherOptions())
        x, out = _real(input), _real(output)
        if out.numel() != x.numel() * self.size() or out.dtype != x.dtype:
            raise ValueError(f"all_gather_into_tensor: the output needs {self.size()} x {x.numel()} elements of "
                             f"{x.dtype}, not {out.numel()} of {out.dtype}")
        xc, _ = _contig(x)
        oc, back = _contig(out)
        w = self.comm.all_gather(xc, out=oc.view(self.size(), *xc.shape), async_op=True)
        return self._issue([w], [output], self._device_of([input]), back)

    all_gather_single = _allgather_base

    def allgather_into_tensor_coalesced(self, outputs, inputs, opts=None):
        parts = [self._allgather_base(o, i) for o, i in zip(outputs, inputs)]
        return self._group_of(parts)

    all_gather_single_coalesced = allgather_into_tensor_coalesced

    def allgather_coalesced(self, output_lists, inputs, opts=None):
        # output_lists[q][i]: rank q's tensor i (torch's all_gather_coalesced and gloo's layout)
        if len(output_lists) != self.size() or any(len(outs) != len(inputs) for outs in output_lists):
            raise ValueError(f"all_gather_coalesced: the output needs {self.size()} lists (one per rank) of "
                             f"{len(inputs)} tensors")
        return self._group_of([self.allgather([[outs[i] for outs in output_lists]], [x])
                               for i, x in enumerate(inputs)])

    def reduce_scatter(self, outputs, input_lists, opts=None):
        if isinstance(outputs, torch.Tensor):
            outputs, input_lists = [outputs], [input_lists]
        op = opts.reduceOp if opts is not None else dist.ReduceOp.SUM
        other = self._other(outputs[0])
        if other is not None:
            return other.reduce_scatter(outputs, input_lists, opts)
        name, factor = _op_name(op, "reduce_scatter", outputs)
        works, finishes = [], []
        for out, ins in zip(outputs, input_lists):
            if len(ins) != self.size():
                raise ValueError(f"reduce_scatter: {len(ins)} input tensors for a group of {self.size()}")
            for i in ins:
                if i.shape != out.shape or i.dtype != out.dtype:
                    raise ValueError(f"reduce_scatter: every input must be shaped like the output "
                                     f"{tuple(out.shape)} {out.dtype}, not {tuple(i.shape)} {i.dtype}")
            stacked = torch.stack([_real(i) for i in ins])
            if factor is not None:
                stacked.mul_(factor)
            oc, back = _contig(_real(out))
            works.append(self.comm.reduce_scatter(stacked, op=name, out=oc.view(1, *oc.shape), async_op=True))
            if back:
                finishes.append(back)
        return self._issue(works, list(outputs), self._device_of(outputs), _run_all(finishes))

    def _reduce_scatter_base(self, output, input, opts=None):
        op = opts.reduceOp if opts is not None else dist.ReduceOp.SUM
        other = self._other(input)
        if other is not None:
            o = dist.ReduceScatterOptions()
            o.reduceOp = op
            return other._reduce_scatter_base(output, input, o)
        name, factor = _op_name(op, "reduce_scatter_tensor", [input])
        x, out = _real(input), _real(output)
        if x.numel() != out.numel() * self.size() or out.dtype != x.dtype:
            raise ValueError(f"reduce_scatter_tensor: the input needs {self.size()} x {out.numel()} elements of "
                             f"{out.dtype}, not {x.numel()} of {x.dtype}")
        xc, _ = _contig(x)
        if factor is not None:
            xc = xc * factor
        oc, back = _contig(out)
        w = self.comm.reduce_scatter(xc.view(self.size(), -1), op=name, out=oc.view(1, -1), async_op=True)
        return self._issue([w], [output], self._device_of([input]), back)

    reduce_scatter_single = _reduce_scatter_base

    def reduce_scatter_tensor_coalesced(self, outputs, inputs, opts=None):
        o = dist.ReduceScatterOptions()
        if opts is not None:
            o.reduceOp = opts.reduceOp
        return self._group_of([self._reduce_scatter_base(out, x, o) for out, x in zip(outputs, inputs)])

    reduce_scatter_single_coalesced = reduce_scatter_tensor_coalesced

    def alltoall_base(self, output, input, output_split_sizes, input_split_sizes, opts=None):
        other = self._other(input)
        if other is not None:
            return other.alltoall_base(output, input, output_split_sizes, input_split_sizes,
                                       opts or dist.AllToAllOptions())
        n = self.size()
        x, out = _real(input), _real(output)
        if not output_split_sizes and not input_split_sizes:
            if x.numel() % n or x.shape != out.shape:
                raise ValueError(f"all_to_all_single: input {tuple(x.shape)} and output {tuple(out.shape)} must be "
                                 f"equal and split into {n} equal blocks (or give the split sizes)")
            xc, _ = _contig(x)
            oc, back = _contig(out)
            w = self.comm.all_to_all(xc.view(n, -1), out=oc.view(n, -1), async_op=True)
            return self._issue([w], [output], self._device_of([input]), back)
        ins = _split_rows(x, input_split_sizes, n, "input")
        outs = _split_rows(out, output_split_sizes, n, "output")
        return self._exchange(ins, outs, [output], self._device_of([input]))

    all_to_all_single = alltoall_base

    def alltoall(self, outputs, inputs, opts=None):
        other = self._other(inputs[0])
        if other is not None:
            return other.alltoall(outputs, inputs, opts or dist.AllToAllOptions())
        n = self.size()
        if len(outputs) != n or len(inputs) != n:
            raise ValueError(f"all_to_all: {len(inputs)} inputs and {len(outputs)} outputs for a group of {n}")
        return self._exchange([_real(t) for t in inputs], [_real(t) for t in outputs], list(outputs),
                              self._device_of(inputs))

    def _exchange(self, ins, outs, result, device):
        """Block q of ins to rank q, block q of outs from rank q (any sizes): point-to-point."""
        me, works, finishes = self.rank(), [], []
        for k in range(1, self.size()):
            peer = (me + k) % self.size()  # spread the peers
            src = (me - k) % self.size()
            if ins[peer].numel():
                works.append(self.comm.send(_contig(ins[peer])[0], peer, tag=_A2A_TAG, async_op=True))
            if outs[src].numel():
                oc, back = _contig(outs[src])
                works.append(self.comm.recv(oc, src, tag=_A2A_TAG, async_op=True))
                if back:
                    finishes.append(back)
        if outs[me].shape != ins[me].shape:
            raise ValueError(f"all_to_all: this rank's own block is {tuple(ins[me].shape)} in and "
                             f"{tuple(outs[me].shape)} out")
        outs[me].copy_(ins[me])
        return self._issue(works, result, device, _run_all(finishes))

    def barrier(self, opts=None):
        return self._issue([self.comm.barrier(async_op=True)], [])

    def send(self, tensors, dst, tag=0):
        other = self._other(tensors[0])
        if other is not None:
            return other.send(tensors, dst, tag)
        works = [self.comm.send(_contig(_real(t))[0], dst, tag=tag, async_op=True) for t in tensors]
        return self._issue(works, list(tensors), self._device_of(tensors))

    def recv(self, tensors, src, tag=0):
        other = self._other(tensors[0])
        if other is not None:
            return other.recv(tensors, src, tag)
        return self._recv(tensors, src, tag)

    def recv_anysource(self, tensors, tag=0):
        other = self._other(tensors[0])
        if other is not None:
            return other.recv_anysource(tensors, tag)
        return self._recv(tensors, None, tag)

    def _recv(self, tensors, src, tag):
        works, finishes = [], []
        for t in tensors:
            c, back = _contig(_real(t))
            works.append(self.comm.recv(c, src, tag=tag, async_op=True))
            if back:
                finishes.append(back)
        return self._issue(works, list(tensors), self._device_of(tensors), _run_all(finishes), recv=True)

    def reduce(self, tensors, opts=None):
        root = opts.rootRank if opts is not None else 0
        op = opts.reduceOp if opts is not None else dist.ReduceOp.SUM
        other = self._other(tensors[0])
        if other is not None:
            return other.reduce(tensors, opts)
        name, factor = _op_name(op, "reduce", tensors)
        works, finishes = [], []
        for t in tensors:  # an all-reduce; only the root's tensor takes the result
            t = _real(t)
            in_place = self.rank() == root and factor is None
            c = t.contiguous() if in_place else t.clone(memory_format=torch.contiguous_format)
            if factor is not None:
                c.mul_(factor)
            works.append(self.comm.all_reduce(c, op=name, async_op=True))
            if self.rank() == root and c.data_ptr() != t.data_ptr():
                finishes.append(_copier(t, c))
        return self._issue(works, list(tensors), self._device_of(tensors), _run_all(finishes))

    def gather(self, output_lists, inputs, opts=None):
        root = opts.rootRank if opts is not None else 0
        other = self._other(inputs[0])
        if other is not None:
            return other.gather(output_lists, inputs, opts)
        x = _real(inputs[0])
        xc, _ = _contig(x)
        tmp = torch.empty((self.size(), *xc.shape), dtype=xc.dtype, device=xc.device)
        w = self.comm.all_gather(xc, out=tmp, async_op=True)
        finish = None
        if self.rank() == root:
            outs = output_lists[0]
            if len(outs) != self.size():
                raise ValueError(f"gather: {len(outs)} output tensors for a group of {self.size()}")
            finish = _scatter_rows(tmp, [_real(o) for o in outs])
        else:
            finish = _keep(tmp)
        return self._issue([w], output_lists, self._device_of(inputs), finish)

    def scatter(self, outputs, input_lists, opts=None):
        root = opts.rootRank if opts is not None else 0
        other = self._other(outputs[0])
        if other is not None:
            return other.scatter(outputs, input_lists, opts)
        out = _real(outputs[0])
        if self.rank() == root:
            ins = input_lists[0]
            if len(ins) != self.size():
                raise ValueError(f"scatter: {len(ins)} input tensors for a group of {self.size()}")
            tmp = torch.stack([_real(i) for i in ins])
        else:
            tmp = torch.empty((self.size(), *out.shape), dtype=out.dtype, device=out.device)
        w = self.comm.broadcast(tmp, root=root, async_op=True)
        return self._issue([w], outputs, self._device_of(outputs), _copier(out, tmp, self.rank()))

    def monitored_barrier(self, opts=None, *args, **kwargs):
        raise NotImplementedError("commlib backend: monitored_barrier is not supported (use barrier)")

    def _group_of(self, parts):
        # the parts are already in the completion queue; a Work that waits for all of them
        dev = next((p._device for p in parts if p._device is not None), None)
        work = _Coalesced(self, parts, dev)
        self._enqueue(work)
        return work


_groups = weakref.WeakSet()


@atexit.register
def _shutdown_all():
    for pg in list(_groups):
        try:
            pg.shutdown()
        except Exception:
            pass


_A2A_TAG = 0x3A2A  # the tag of all_to_all's point-to-point messages (MPIComm's private communicator)


def _run_all(fns):
    if not fns:
        return None
    return lambda: [f() for f in fns]


def _copier(dst, src, row=None):
    def copy():
        s = src if row is None else src[row]
        if dst.is_cuda:
            src.record_stream(torch.cuda.current_stream(dst.device))
        dst.copy_(s)
    return copy


def _keep(tmp):
    def keep():
        if tmp.is_cuda:
            tmp.record_stream(torch.cuda.current_stream(tmp.device))
    return keep


def _scatter_rows(tmp, outs):
    def copy():
        if tmp.is_cuda:
            tmp.record_stream(torch.cuda.current_stream(tmp.device))
        for q, o in enumerate(outs):
            o.copy_(tmp[q])
    return copy


def _split_rows(t, sizes, n, what):
    if not sizes:
        if t.shape[0] % n:
            raise ValueError(f"all_to_all_single: the {what}'s first axis ({t.shape[0]}) does not split into {n}")
        sizes = [t.shape[0] // n] * n
    if len(sizes) != n or sum(sizes) != t.shape[0]:
        raise ValueError(f"all_to_all_single: {what} split sizes {list(sizes)} do not split the first axis "
                         f"({t.shape[0]}) into {n} blocks")
    return list(torch.split(t, list(sizes)))


# -- registration --------------------------------------------------------------------------

def _other_backends(store, rank, size, timeout):
    """Under "cpu:gloo,cuda:commlib" (or any device given to gloo / nccl) the other library's
    backend for that device: the one torch already built for this group, else a new one."""
    frame = inspect.currentframe()
    config, pg = None, None
    try:
        f = frame.f_back
        while f is not None and config is None:
            if "backend_config" in f.f_locals:
                config, pg = f.f_locals["backend_config"], f.f_locals.get("pg")
            f = f.f_back
    finally:
        del frame
    if config is None:
        return {}
    others = {}
    for device, name in config.get_device_backend_map().items():
        if name == BACKEND:
            continue
        backend = None
        if pg is not None:
            try:
                backend = pg._get_backend(torch.device(device))
            except Exception:
                backend = None
        if backend is None:
            prefixed = dist.PrefixStore(f"commlib-{device}-{name}/", store)
            if name == "gloo":
                backend = dist.ProcessGroupGloo(prefixed, rank, size, timeout)
            elif name == "nccl":
                options = dist.ProcessGroupNCCL.Options()
                options._timeout = timeout
                backend = dist.ProcessGroupNCCL(prefixed, rank, size, options)
            else:
                raise NotImplementedError(f"commlib backend: {device}:{name} beside commlib is not supported "
                                          "(gloo and nccl are)")
        others[device] = backend
    return others


def _create(options, backend_options=None):
    from mpi4py import MPI
    world = MPI.COMM_WORLD
    ranks = list(options.global_ranks_in_group or [])
    size = options.group_size
    if not ranks or ranks == list(range(world.Get_size())):
        comm = world
    else:
        comm = world.Create_group(world.Get_group().Incl(ranks))
    from collectives.mpi import MPIComm
    others = _other_backends(options.store, options.group_rank, size, options.timeout)
    return ProcessGroupCommlib(options.group_rank, size, MPIComm(comm), others, options.timeout)


def register():
    """Registers the "commlib" backend with torch.distributed (the import does it)."""
    if BACKEND.upper() not in dist.Backend._plugins:
        dist.Backend.register_backend(BACKEND, _create, extended_api=True, devices=["cpu", "cuda"])


mpi_environment()
register()


from collectives._torch_elastic import ElasticDataParallel, quantized_hook  # noqa: E402
