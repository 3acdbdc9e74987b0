"""Python face of libcommlib.so (cffi, ABI mode): the same decode and pack code the
interposer runs, for types registered explicitly.

    from mpi4py import MPI
    from commlib import native
    t = MPI.DOUBLE.Create_vector(4, 2, 5).Commit()
    native.register(t)["pieces"]   # [{'offset': 0, 'block': 16, 'dims': [[4, 40]]}]
    pos = native.pack(t, src, 1, out)
"""
import json

import cffi
import numpy as np

from commlib import paths

_ffi = cffi.FFI()
_ffi.cdef("""
long long commlib_stat(const char *name);
size_t commlib_stats_json(char *buf, size_t len);
const char *commlib_build_info(void);
size_t commlib_knobs_json(char *buf, size_t len);
size_t commlib_kernels_json(char *buf, size_t len);
int commlib_type_register(intptr_t handle, char *json, size_t len);
int commlib_type_forget(intptr_t handle);
int commlib_type_pack(intptr_t handle, const void *inbuf, int64_t incount, void *outbuf,
                      int64_t outsize, int64_t *position);
int commlib_type_unpack(intptr_t handle, const void *inbuf, int64_t insize, int64_t *position,
                        void *outbuf, int64_t outcount);
int commlib_type_pack_size(intptr_t handle, int64_t count, int64_t *size);
""")

OK, ERR_UNSUPPORTED, ERR_TRUNCATE, ERR_ARG, ERR_UNKNOWN_TYPE = range(5)


class UnsupportedType(Exception):
    """The type did not reduce to strided pieces; the interposer leaves it to the host MPI."""


class PackError(ValueError):
    """A buffer is too small or an argument is invalid (the host MPI would raise its error)."""


_lib = None


def lib():
    """The loaded library (loaded once, on first use)."""
    global _lib
    if _lib is None:
        _lib = _ffi.dlopen(paths.preload_library())
    return _lib


def _handle(dtype):
    """The handle as a C intptr_t (mpi4py reports MPICH's int handles as unsigned)."""
    if not isinstance(dtype, int):
        from mpi4py import MPI
        dtype = MPI._handleof(dtype)
    return dtype - (1 << 64) if dtype >= 1 << 63 else dtype


def _json(fill, size=1 << 16):
    buf = _ffi.new("char[]", size)
    need = fill(buf, size)
    if need >= size:
        buf = _ffi.new("char[]", need + 1)
        fill(buf, need + 1)
    return json.loads(_ffi.string(buf).decode())


def _raise(rc, what):
    if rc == OK:
        return
    if rc == ERR_UNSUPPORTED:
        raise UnsupportedType(f"{what}: datatype does not reduce to strided pieces")
    if rc == ERR_UNKNOWN_TYPE:
        raise PackError(f"{what}: datatype not registered (call commlib.native.register first)")
    if rc == ERR_TRUNCATE:
        raise PackError(f"{what}: buffer too small")
    raise PackError(f"{what}: invalid argument")


def _pointer(buf, writable):
    """Address and size of a buffer: a buffer-protocol object (numpy array, bytearray,
    ...) or device memory exposing __cuda_array_interface__ (cupy, torch CUDA tensors)."""
    cai = getattr(buf, "__cuda_array_interface__", None)
    if cai is not None:
        if cai.get("strides") not in (None, ()) and not _c_contiguous(cai):
            raise PackError("device buffer must be contiguous")
        if writable and cai["data"][1]:
            raise PackError("output buffer is read-only")
        size = int(np.dtype(cai["typestr"]).itemsize) * int(np.prod(cai["shape"], dtype=np.int64))
        return _ffi.cast("char *", cai["data"][0]), size
    view = memoryview(buf)
    if writable and view.readonly:
        raise PackError("output buffer is read-only")
    if not view.c_contiguous:
        raise PackError("buffer must be contiguous")
    return _ffi.from_buffer("char[]", buf, require_writable=writable), view.nbytes


def _c_contiguous(cai):
    itemsize = np.dtype(cai["typestr"]).itemsize
    expected = itemsize
    for extent, stride in zip(reversed(cai["shape"]), reversed(cai["strides"])):
        if extent > 1 and stride != expected:
            return False
        expected *= extent
    return True


def register(dtype):
    """Decodes a committed type into the cache; returns its canonical form as a dict."""
    size = 1 << 20  # room for COMMLIB_MAX_PIECES pieces of 32 dimensions
    buf = _ffi.new("char[]", size)
    _raise(lib().commlib_type_register(_handle(dtype), buf, size), "register")
    return json.loads(_ffi.string(buf).decode())


def forget(dtype):
    """Drops a registered type (call before freeing it: handles are reused)."""
    _raise(lib().commlib_type_forget(_handle(dtype)), "forget")


def pack(dtype, inbuf, incount, outbuf, position=0, offset=0):
    """MPI_Pack: `incount` elements read at byte `offset` of inbuf, written to outbuf at
    `position`; returns the new position."""
    src, src_size = _pointer(inbuf, False)
    dst, dst_size = _pointer(outbuf, True)
    if not 0 <= offset <= src_size:
        raise PackError("offset outside the input buffer")
    pos = _ffi.new("int64_t *", position)
    _raise(lib().commlib_type_pack(_handle(dtype), src + offset, incount, dst, dst_size, pos), "pack")
    return pos[0]


def unpack(dtype, inbuf, position, outbuf, outcount, offset=0):
    """MPI_Unpack: reads packed bytes of inbuf from `position`, writes `outcount` elements
    at byte `offset` of outbuf; returns the new position."""
    src, src_size = _pointer(inbuf, False)
    dst, dst_size = _pointer(outbuf, True)
    if not 0 <= offset <= dst_size:
        raise PackError("offset outside the output buffer")
    pos = _ffi.new("int64_t *", position)
    _raise(lib().commlib_type_unpack(_handle(dtype), src, src_size, pos, dst + offset, outcount), "unpack")
    return pos[0]


def pack_size(dtype, count):
    """MPI_Pack_size for a registered type."""
    size = _ffi.new("int64_t *")
    _raise(lib().commlib_type_pack_size(_handle(dtype), count, size), "pack_size")
    return size[0]


def stat(name):
    """One counter of this process ('pack.fast', ...), -1 for an unknown name."""
    return lib().commlib_stat(name.encode())


def stats():
    return _json(lambda b, n: lib().commlib_stats_json(b, n))


def build_info():
    return json.loads(_ffi.string(lib().commlib_build_info()).decode())


def knobs():
    return _json(lambda b, n: lib().commlib_knobs_json(b, n))


def kernels():
    """Where device pack kernels come from: {'route': COMMLIB_KERNELS, 'fatbin_bytes': the
    embedded nvcc image (0: none), 'source_bytes': the embedded source, 'runtime': {'nvrtc':
    the libnvrtc found or None, 'nvrtc_version', 'cache_dir'}}.  Looks for NVRTC."""
    return _json(lambda b, n: lib().commlib_kernels_json(b, n))
