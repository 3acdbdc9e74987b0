"""commlib collectives: the training-script API.

    import collectives
    comm = collectives.init()            # under commlib run / mpiexec: MPIComm; with
                                         # COMMLIB_ELASTIC_COORDINATOR set: ElasticComm
    comm.all_reduce(grad, op="avg")      # numpy, cupy, torch CPU or CUDA, in place
    w = comm.all_gather(x, async_op=True); ...; out = w.wait()

One contract for every backend (`Communicator` below, close to torch.distributed):
`rank`, `size`; `all_reduce`, `reduce_scatter`, `all_gather`, `broadcast`, `all_to_all`,
`send`, `recv`, `barrier`, each with `async_op=True` returning a `Work`.  Operations run in
issue order and every rank issues the same sequence.  Failures are exceptions with a clear
message, never a hang or a silently wrong result.  Where a backend lacks an operation it
raises NotImplementedError naming it.

Backends: `collectives.mpi.MPIComm` (any communicator of the host MPI, commlib's own
collective engine underneath: native/engine) and `collectives.elastic.ElasticComm` (peers
join and fail mid-run).  `collectives.overlap` builds producer -> collective pipelines on
the partitioned operations.
"""
import os

__all__ = ["init", "Work", "CollectiveError", "MismatchError", "Timeout", "OPS", "DTYPES"]

# The engines' numbering (native/engine/reduce.h; the elastic engine uses the same).
DTYPES = {"float16": 0, "bfloat16": 1, "float32": 2, "float64": 3, "int8": 4, "int16": 5, "int32": 6, "int64": 7,
          "uint8": 8, "uint16": 9, "uint32": 10, "uint64": 11, "bool": 12}
OPS = {"sum": 0, "avg": 1, "min": 2, "max": 3, "prod": 4, "band": 5, "bor": 6, "bxor": 7}
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


class CollectiveError(Exception):
    """An operation failed (the message says why)."""


class MismatchError(CollectiveError, ValueError):
    """The ranks did not issue the same operation (kind, dtype, op, shape or root): the
    operation failed on every rank, and no buffer was written."""


class Timeout(CollectiveError):
    """A wait's deadline passed; the operation itself goes on."""


def check_op(op, dtype):
    """op name -> code, with a clear error for an op the dtype has no meaning for."""
    if op not in OPS:
        raise ValueError(f"op {op!r} is not one of {', '.join(OPS)}")
    if op in ("band", "bor", "bxor") and dtype in FLOAT_DTYPES:
        raise ValueError(f"op {op!r} is defined on integer and bool tensors, not {dtype}")
    if op == "avg" and dtype == "bool":
        raise ValueError("op 'avg' is not defined on bool tensors")
    return OPS[op]


class Work:
    """An operation started with async_op=True.

    wait(timeout=None) blocks until it finished (None: for as long as it takes) and returns
    its result (the output array; recv: the source rank), or raises its error, or Timeout
    (the operation goes on).  For GPU tensors wait() also orders the current stream after
    the result, as NCCL's wait does.  is_completed() never blocks; exception() is the
    error of a finished operation, or None."""

    def wait(self, timeout=None):
        raise NotImplementedError

    def is_completed(self):
        raise NotImplementedError

    def exception(self):
        raise NotImplementedError


class DoneWork(Work):
    """A Work that finished when it was made (an operation done in the call)."""

    def __init__(self, result=None, error=None):
        self._result, self._error = result, error

    def wait(self, timeout=None):
        if self._error is not None:
            raise self._error
        return self._result

    def is_completed(self):
        return True

    def exception(self):
        return self._error


_default = None


def init(backend=None, **kwargs):
    """The communicator of this launch: "elastic" when COMMLIB_ELASTIC_COORDINATOR is set
    (commlib elastic-run), else "mpi" over the world (commlib run / mpiexec).  backend=
    forces one; keyword arguments go to the communicator's constructor."""
    global _default
    if backend is None:
        backend = "elastic" if os.environ.get("COMMLIB_ELASTIC_COORDINATOR") else "mpi"
    if backend == "mpi":
        from collectives.mpi import MPIComm
        comm = MPIComm(**kwargs)
    elif backend == "elastic":
        from collectives.elastic import ElasticComm
        comm = ElasticComm(**kwargs)
        comm.update_topology()
    else:
        raise ValueError(f"backend {backend!r}: 'mpi' or 'elastic'")
    _default = comm
    return comm


def default():
    """The communicator the last init() made (None before)."""
    return _default
