"""Elastic all-reduce: fault-tolerant, dynamic membership, bit-identical shared state.

    import collectives.elastic as el
    comm = el.ElasticComm("10.0.0.5:48200", secret=os.environ["COMMLIB_SECRET"])
    while training:
        comm.update_topology()                 # admits waiting peers, drops dead ones
        comm.sync_state({"w": w}, revision=step)
        try:
            comm.all_reduce(g, op="avg")       # in place; numpy array or torch tensor
        except el.PeerFailure:
            continue                           # g is exactly as before the call

The engine is C (native/elastic, libcommlib_elastic.so) reached through cffi; the data
path never runs Python.  The protocol and its failure semantics are described in
native/elastic/elastic.h.
"""
import atexit
import concurrent.futures
import json
import os
import threading
import weakref

import cffi
import numpy as np

import collectives
from commlib import paths

_ffi = cffi.FFI()
_ffi.cdef("""
typedef struct el_coordinator el_coordinator;
typedef struct el_peer el_peer;
int el_coordinator_start(const char *host, int port, const uint8_t *secret, size_t secret_len, int min_peers,
                         el_coordinator **out, int *bound_port, char *err, size_t errlen);
int el_coordinator_start_ex(const char *host, int port, const uint8_t *secret, size_t secret_len, int min_peers,
                            const char *standby_of, el_coordinator **out, int *bound_port, char *err, size_t errlen);
void el_coordinator_stop(el_coordinator *c);
size_t el_coordinator_info(el_coordinator *c, char *buf, size_t len);
int el_peer_connect(const char *address, const uint8_t *secret, size_t secret_len, int timeout_ms,
                    el_peer **out, char *err, size_t errlen);
const char *el_peer_error(el_peer *p);
int el_peer_update_topology(el_peer *p, int timeout_ms);
int el_peer_info(el_peer *p, int64_t *epoch, int *rank, int *world, uint64_t *id);
int el_peer_data_port(el_peer *p);
int el_peer_allreduce(el_peer *p, void *buf, uint64_t count, int dtype, int op, int timeout_ms);
int el_peer_allreduce_ex(el_peer *p, void *buf, uint64_t count, int dtype, int op, int quantize, int timeout_ms);
int el_peer_sync_state(el_peer *p, int n, void *const *ptrs, const uint64_t *sizes, const uint8_t *const *descs,
                       const uint32_t *desc_lens, int64_t revision, int timeout_ms, int64_t *synced_revision,
                       uint64_t *fetched_bytes, uint8_t *digest_out);
void el_peer_close(el_peer *p, int graceful);
int el_peer_wire_stats(el_peer *p, uint64_t *sent, uint64_t *received);
void el_sha256(const void *data, size_t len, uint8_t out[32]);
void el_hmac_sha256(const uint8_t *key, size_t key_len, const void *data, size_t len, uint8_t out[32]);
int el_blake2b(const void *data, size_t len, uint8_t *out, size_t outlen, const void *key, size_t keylen);
int el_reduce(void *dst, const void *src, uint64_t count, int dtype, int op);
""")

_lib = None
_lib_lock = threading.Lock()


def lib():
    """libcommlib_elastic.so, loaded once."""
    global _lib
    with _lib_lock:
        if _lib is None:
            _lib = _ffi.dlopen(paths.elastic_library())
    return _lib


# Open peers and coordinators are closed at exit: their C threads must not outlive the
# interpreter (or the library being unloaded under them).
_open = weakref.WeakSet()


@atexit.register
def _close_all():
    for obj in list(_open):
        try:
            obj.close() if isinstance(obj, ElasticComm) else obj.stop()
        except Exception:
            pass


class ElasticError(collectives.CollectiveError):
    """Base of the elastic engine's errors."""


class PeerFailure(ElasticError):
    """A peer died or failed: the operation was rolled back on every peer (the buffer holds
    exactly what it held before the call).  Call update_topology() and retry."""


class Timeout(ElasticError, collectives.Timeout):
    """The call's deadline passed."""


class AuthError(ElasticError):
    """The shared secret does not match (this peer's or the coordinator's)."""


class CoordinatorLost(ElasticError):
    """The coordinator is unreachable, silent or gone."""


class StateError(ElasticError):
    """sync_state: the revision rule was broken or the state does not match after a fetch."""


class NotMember(ElasticError):
    """This peer has not been admitted yet: call update_topology()."""


_ERRORS = {1: PeerFailure, 2: Timeout, 3: AuthError, 4: ValueError, 5: CoordinatorLost, 6: StateError, 7: OSError,
           8: NotMember}

DTYPES = {"float16": 0, "bfloat16": 1, "float32": 2, "float64": 3, "int8": 4, "int16": 5, "int32": 6, "int64": 7,
          "uint8": 8, "uint16": 9, "uint32": 10, "uint64": 11}
OPS = {"sum": 0, "avg": 1, "min": 2, "max": 3, "prod": 4}
QUANTIZE = {"uint8": 1, "uint4": 2}  # el_peer_allreduce_ex's quantize (0: off)


def _quantize_code(quantize):
    """all_reduce's quantize= as the C argument: False/None/0 off, True/1/"uint8" 8-bit
    codes, "uint4" 4-bit codes; anything else is a ValueError before anything moves."""
    if isinstance(quantize, str):
        code = QUANTIZE.get(quantize)
    elif quantize is None or (isinstance(quantize, (bool, int, np.bool_, np.integer)) and quantize in (0, 1)):
        code = int(bool(quantize))
    else:
        code = None
    if code is None:
        raise ValueError(f"quantize={quantize!r}: use False/None (off), True or 'uint8' (8-bit codes), "
                         "or 'uint4' (4-bit codes)")
    return code


def _timeout_env(name, default):
    try:
        value = float(os.environ.get(name, default))
        return value if value > 0 else default
    except ValueError:
        return default


def default_timeout():
    """COMMLIB_ELASTIC_TIMEOUT (seconds): when silence means death."""
    return _timeout_env("COMMLIB_ELASTIC_TIMEOUT", 2.5)


def join_timeout():
    """COMMLIB_ELASTIC_JOIN_TIMEOUT (seconds): how long update_topology / sync_state wait for the others."""
    return _timeout_env("COMMLIB_ELASTIC_JOIN_TIMEOUT", 300.0)


def _secret_bytes(secret):
    if secret is None:
        secret = os.environ.get("COMMLIB_SECRET")
    if secret is None:
        raise ValueError("no secret: pass secret=... or set COMMLIB_SECRET")
    data = secret.encode() if isinstance(secret, str) else bytes(secret)
    if not data:
        raise ValueError("the secret is empty")
    return data


def read_secret_file(path):
    """A secret file's contents without the trailing newline."""
    with open(path, "rb") as f:
        data = f.read().rstrip(b"\r\n")
    if not data:
        raise ValueError(f"{path}: the secret file is empty")
    return data


class Coordinator:
    """The coordinator, on a thread of this process (`commlib coordinator` runs the same).

    port=0 binds any free port (see .port); min_peers: the first epoch forms when this many
    peers call update_topology.  standby_of="HOST:PORT": a standby of that (active or
    standby) coordinator, with the same secret: it refuses peers while its primary lives
    and takes over membership, epochs, verdicts and revisions when the primary dies
    (peers learn its address from the primary).  Raises AuthError when the primary refuses
    it, CoordinatorLost when the primary cannot be reached."""

    def __init__(self, port=0, secret=None, host="0.0.0.0", min_peers=1, standby_of=None):
        key = _secret_bytes(secret)
        out = _ffi.new("el_coordinator **")
        bound = _ffi.new("int *")
        err = _ffi.new("char[]", 512)
        standby = _ffi.new("char[]", standby_of.encode()) if standby_of else _ffi.NULL
        rc = lib().el_coordinator_start_ex(host.encode(), int(port), key, len(key), int(min_peers), standby, out, bound,
                                           err, 512)
        if rc:
            raise _ERRORS.get(rc, ElasticError)(_ffi.string(err).decode())
        self._handle = out[0]
        self.port = bound[0]
        self.host = host
        _open.add(self)

    @property
    def address(self):
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", "*") else self.host
        return f"{host}:{self.port}"

    def info(self):
        """A snapshot: epoch, world, clients, waiting, dropped, refused, commits, aborts,
        revision, running, role ("active" / "standby"), recovering (a standby that took over
        and still rebuilds membership from the peers), failovers (takeovers by this one),
        standbys (connected to this one), resumed (peers that came back with RESUME) and
        resumed_waiting (of them, those waiting for the verdict of an operation)."""
        buf = _ffi.new("char[]", 1024)
        lib().el_coordinator_info(self._handle, buf, 1024)
        return json.loads(_ffi.string(buf).decode())

    def stop(self):
        if self._handle is not None:
            lib().el_coordinator_stop(self._handle)
            self._handle = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def __del__(self):
        try:
            self.stop()
        except Exception:
            pass


def _dtype_name(x):
    """(dtype name, is_torch)."""
    mod = type(x).__module__
    if mod.startswith("torch"):
        return str(x.dtype).replace("torch.", "").replace("half", "float16").replace("bfloat16", "bfloat16"), True
    return np.dtype(x.dtype).name, False


def _host_view(x):
    """(pointer, element count, dtype name, keepalive) of a host tensor, without copying."""
    name, is_torch = _dtype_name(x)
    if name not in DTYPES:
        raise TypeError(f"dtype {name} is not supported (supported: {', '.join(DTYPES)})")
    if is_torch:
        if not x.is_contiguous():
            raise ValueError("all_reduce needs a contiguous tensor")
        return _ffi.cast("void *", x.data_ptr()), x.numel(), name, x
    if not isinstance(x, np.ndarray):
        raise TypeError(f"all_reduce takes numpy arrays and torch tensors, not {type(x).__name__}")
    if not x.flags.c_contiguous or not x.flags.writeable:
        raise ValueError("all_reduce needs a C-contiguous, writeable array (it works in place)")
    return _ffi.from_buffer(x, require_writable=True), x.size, name, x


def _is_device(x):
    mod = type(x).__module__
    if mod.startswith("cupy"):
        return True
    return mod.startswith("torch") and x.device.type != "cpu"


class Work(collectives.Work):
    """An operation started with async_op=True (see collectives.Work)."""

    def __init__(self, future):
        self._future = future

    def is_completed(self):
        return self._future.done()

    def wait(self, timeout=None):
        """Waits up to timeout seconds (None: until done); raises the operation's error, or
        Timeout if it is still running (the operation itself goes on)."""
        try:
            return self._future.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            raise Timeout(f"the operation did not finish within {timeout} s") from None

    def exception(self):
        return self._future.exception() if self._future.done() else None


class ElasticComm:
    """One peer of an elastic group.  Connects and authenticates at construction; becomes a
    member at the first update_topology().

    address: "HOST:PORT", or "H1:P1,H2:P2,..." (a primary coordinator and its standbys, in
    the order to try; a standby whose primary lives refuses and the next is tried).  The
    coordinator also tells its peers its standbys.  With more than one address known, a
    lost coordinator connection is re-established to whichever took over, within
    COMMLIB_ELASTIC_FAILOVER_TIMEOUT, and calls in flight go on; only then CoordinatorLost."""

    def __init__(self, address=None, secret=None, timeout=None):
        address = address or os.environ.get("COMMLIB_ELASTIC_COORDINATOR")
        if not address:
            raise ValueError("no coordinator address: pass HOST:PORT or set COMMLIB_ELASTIC_COORDINATOR")
        key = _secret_bytes(secret)
        out = _ffi.new("el_peer **")
        err = _ffi.new("char[]", 512)
        ms = int(1000 * (timeout if timeout is not None else max(default_timeout(), 10.0)))
        rc = lib().el_peer_connect(str(address).encode(), key, len(key), ms, out, err, 512)
        if rc:
            raise _ERRORS.get(rc, ElasticError)(_ffi.string(err).decode())
        self._peer = out[0]
        self.address = address
        # Operations run one after another on one worker, in the order they were issued
        # (every peer must issue them in the same order); async_op returns at once.
        self._worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="elastic")
        self._closed = False
        _open.add(self)

    # -- helpers --
    def _check(self, rc):
        if rc:
            message = _ffi.string(lib().el_peer_error(self._peer)).decode(errors="replace")
            raise _ERRORS.get(rc, ElasticError)(message)

    def _run(self, fn, *args):
        if self._closed:
            raise ElasticError("the communicator is closed")
        return self._worker.submit(fn, *args).result()

    def _info(self):
        e, r, w, i = _ffi.new("int64_t *"), _ffi.new("int *"), _ffi.new("int *"), _ffi.new("uint64_t *")
        lib().el_peer_info(self._peer, e, r, w, i)
        return e[0], r[0], w[0], i[0]

    @property
    def epoch(self):
        return self._info()[0]

    @property
    def rank(self):
        return self._info()[1]

    @property
    def world(self):
        return self._info()[2]

    @property
    def size(self):
        """The members of the current epoch (the contract's name for `world`)."""
        return self._info()[2]

    @property
    def peer_id(self):
        return self._info()[3]

    @property
    def data_port(self):
        """The TCP port ring neighbours and state fetchers connect to."""
        return lib().el_peer_data_port(self._peer)

    # -- the API --
    def update_topology(self, timeout=None):
        """Barrier of the members: drops dead peers, admits waiting ones.  Returns the
        epoch (it changes when the membership did or an operation failed)."""
        ms = int(1000 * (timeout if timeout is not None else join_timeout()))
        self._run(lambda: self._check(lib().el_peer_update_topology(self._peer, ms)))
        return self.epoch

    def all_reduce(self, x, op="sum", async_op=False, timeout=None, quantize=False):
        """In place.  On PeerFailure x holds exactly what it held before the call.
        quantize=True or "uint8": min-max uint8 codes on the wire; "uint4": 4-bit codes, two
        per byte (float dtypes, sum/avg; others raise ValueError): lossy, but the result is
        bit-identical on every peer.  Each reduce-scatter hop and the final chunk are off
        by at most scale / 2, scale = (max - min) / 255 (uint8) or / 15 (uint4) of the
        chunk it quantizes."""
        if op not in OPS:
            raise ValueError(f"op {op!r} is not one of {', '.join(OPS)}")
        quantize = _quantize_code(quantize)
        ms = int(1000 * timeout) if timeout else 0
        if _is_device(x):
            fn = lambda: self._device_all_reduce(x, op, ms, quantize)  # noqa: E731
        else:
            ptr, count, name, keep = _host_view(x)

            def fn():
                _ = keep
                self._check(lib().el_peer_allreduce_ex(self._peer, ptr, count, DTYPES[name], OPS[op], quantize, ms))
                return x
        if async_op:
            return Work(self._worker.submit(fn))
        self._run(fn)
        return x

    # The rest of the collectives contract: the elastic engine has only the all-reduce (and
    # the shared state); these say so instead of answering wrong.
    def _missing(self, name):
        raise NotImplementedError(f"ElasticComm.{name}: the elastic engine has no {name} (only all_reduce, "
                                  "update_topology and sync_state); use MPIComm for it")

    def reduce_scatter(self, *args, **kwargs):
        self._missing("reduce_scatter")

    def all_gather(self, *args, **kwargs):
        self._missing("all_gather")

    def broadcast(self, *args, **kwargs):
        self._missing("broadcast")

    def all_to_all(self, *args, **kwargs):
        self._missing("all_to_all")

    def send(self, *args, **kwargs):
        self._missing("send")

    def recv(self, *args, **kwargs):
        self._missing("recv")

    def barrier(self, *args, **kwargs):
        self._missing("barrier (update_topology is the members' barrier)")

    def _device_all_reduce(self, x, op, ms, quantize=False):
        """GPU tensors go through pinned host memory; the device buffer is written only
        after the all-reduce committed."""
        if type(x).__module__.startswith("cupy"):
            import cupy
            mem = cupy.cuda.alloc_pinned_memory(x.nbytes)
            host = np.frombuffer(mem, x.dtype, x.size).reshape(x.shape)
            x.get(out=host)
            ptr, count, name, _ = _host_view(host)
            self._check(lib().el_peer_allreduce_ex(self._peer, ptr, count, DTYPES[name], OPS[op], quantize, ms))
            x.set(host)
            return x
        import torch
        host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        host.copy_(x)
        ptr, count, name, _ = _host_view(host)
        self._check(lib().el_peer_allreduce_ex(self._peer, ptr, count, DTYPES[name], OPS[op], quantize, ms))
        x.copy_(host)
        return x

    def wire_stats(self):
        """Bytes this peer sent and received on its data connections (ring all-reduce and
        state transfer, chunk headers included) since it connected."""
        sent, received = _ffi.new("uint64_t *"), _ffi.new("uint64_t *")
        lib().el_peer_wire_stats(self._peer, sent, received)
        return {"sent": int(sent[0]), "received": int(received[0])}

    def sync_state(self, state, revision, timeout=None):
        """Makes `state` (name -> array, updated in place) bit-identical on every member.
        The majority's (revision, hashes) wins; its revision must be the last synchronised
        one or one more; peers that differ fetch from an up-to-date peer and verify.
        revision=None: this peer has nothing yet (a joiner) and takes the group's state.
        Returns {'revision', 'fetched_bytes', 'digest'}."""
        names = sorted(state)
        views, descs = [], []
        for name in names:
            x = state[name]
            if _is_device(x):
                raise TypeError(f"sync_state: {name} is on a GPU; pass host arrays")
            ptr, count, dtype, keep = _host_view(x)
            shape = tuple(x.shape)
            nbytes = count * (2 if dtype in ("float16", "bfloat16") else np.dtype(dtype).itemsize)
            views.append((ptr, nbytes, keep))
            descs.append(f"{name}\0{dtype}\0{shape}".encode())
        n = len(names)
        ptrs = _ffi.new("void *[]", [v[0] for v in views] or [_ffi.NULL])
        sizes = _ffi.new("uint64_t[]", [v[1] for v in views] or [0])
        desc_bufs = [_ffi.from_buffer(d) for d in descs]
        desc_ptrs = _ffi.new("uint8_t *[]", [_ffi.cast("uint8_t *", d) for d in desc_bufs] or [_ffi.NULL])
        desc_lens = _ffi.new("uint32_t[]", [len(d) for d in descs] or [0])
        synced = _ffi.new("int64_t *")
        fetched = _ffi.new("uint64_t *")
        digest = _ffi.new("uint8_t[32]")
        ms = int(1000 * (timeout if timeout is not None else join_timeout()))

        def fn():
            _ = (views, desc_bufs)
            self._check(lib().el_peer_sync_state(self._peer, n, ptrs, sizes, desc_ptrs, desc_lens, -(1 << 63) if revision is None else int(revision), ms,
                                                 synced, fetched, digest))
        self._run(fn)
        return {"revision": synced[0], "fetched_bytes": fetched[0], "digest": bytes(_ffi.buffer(digest, 32)).hex()}

    def close(self, graceful=True):
        """Leaves the group (graceful: the coordinator is told at once)."""
        if self._closed:
            return
        self._closed = True
        self._worker.shutdown(wait=True)
        lib().el_peer_close(self._peer, 1 if graceful else 0)
        self._peer = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        # A comm dropped without close() would leave its heartbeat thread running (the
        # coordinator would keep a member that never calls again): leave gracefully.
        try:
            self.close()
        except Exception:
            pass


def blake2b(data, digest_size=32, key=b""):
    """The engine's BLAKE2b (for the test vectors)."""
    out = _ffi.new("uint8_t[]", digest_size)
    data = bytes(data)
    lib().el_blake2b(data, len(data), out, digest_size, key, len(key))
    return bytes(_ffi.buffer(out, digest_size))


def sha256(data):
    out = _ffi.new("uint8_t[32]")
    data = bytes(data)
    lib().el_sha256(data, len(data), out)
    return bytes(_ffi.buffer(out, 32))


def hmac_sha256(key, data):
    out = _ffi.new("uint8_t[32]")
    key, data = bytes(key), bytes(data)
    lib().el_hmac_sha256(key, len(key), data, len(data), out)
    return bytes(_ffi.buffer(out, 32))
