"""Random datatype trees sent device to device against the host MPI's own packing.

Run on 2 ranks under commlib (COMMLIB_IPC=1 for the GPU-to-GPU path), with a CUDA driver
(the stand-in tests/c/fake_cuda.c in CI):

    commlib run -n 2 python tests/ipc_typegen.py SEED TREES

For every tree (tests/typegen.py, regular ones: a receive type must not overlap itself)
rank 0 sends the same random bytes twice with the tree as the send and receive type:
from host memory, which commlib hands to the host MPI untouched (its own pack and
unpack), and from device memory, through commlib.  Rank 1 receives both into buffers
poisoned alike, copies the device one back and compares the two byte for byte, and the
statuses' counts.  Counts are chosen so that most messages reach 1 KiB, the smallest that
goes GPU to GPU (TYPEGEN_MIN_BYTES: another size, e.g. 1 MiB for pipelined staging -
COMMLIB_PIPELINE=1 - with TYPEGEN_MAX_SPAN the largest buffer, 4 MiB by default).
TYPEGEN_IRECV=1: the device receive is an MPI_Irecv completed by MPI_Wait (a completion call:
its GPU-to-GPU unpack goes through the batched kernel, pack/device_pack.h); TYPEGEN_ISEND=1:
the device send is an MPI_Isend completed by MPI_Wait (with COMMLIB_PROGRESS=thread and
COMMLIB_IPC_DIRECT_BYTES, read by the receiver from the sender's buffer).  Last line
(rank 1): "ipc_typegen: seed=S trees=N mismatches=M".
"""
import ctypes
import os
import random
import sys

from mpi4py import MPI

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from typegen import TypeGen, buffer_span  # noqa: E402

MIN_BYTES = int(os.environ.get("TYPEGEN_MIN_BYTES", 1024))
MAX_SPAN = int(os.environ.get("TYPEGEN_MAX_SPAN", 4 << 20))
IRECV = os.environ.get("TYPEGEN_IRECV") == "1"
ISEND = os.environ.get("TYPEGEN_ISEND") == "1"


class Driver:
    """The few CUDA driver calls this needs, through ctypes."""

    def __init__(self):
        self.cu = ctypes.CDLL("libcuda.so.1")
        cu = self.cu
        assert cu.cuInit(0) == 0, "cuInit"
        dev, ctx = ctypes.c_int(), ctypes.c_void_p()
        assert cu.cuDeviceGet(ctypes.byref(dev), 0) == 0
        assert cu.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev) == 0
        assert cu.cuCtxSetCurrent(ctx) == 0

    def alloc(self, n):
        p = ctypes.c_uint64()
        assert self.cu.cuMemAlloc_v2(ctypes.byref(p), ctypes.c_size_t(n)) == 0, f"cuMemAlloc({n})"
        return p.value

    def free(self, p):
        self.cu.cuMemFree_v2(ctypes.c_uint64(p))

    def put(self, p, data):
        assert self.cu.cuMemcpyHtoD_v2(ctypes.c_uint64(p), data, ctypes.c_size_t(len(data))) == 0

    def get(self, p, n):
        out = ctypes.create_string_buffer(n)
        assert self.cu.cuMemcpyDtoH_v2(out, ctypes.c_uint64(p), ctypes.c_size_t(n)) == 0
        return out.raw


def message(address, lo, hi, count, dtype):
    """A buffer spec whose pointer sits `-lo` bytes into [address, address + hi - lo)."""
    return [MPI.memory.fromaddress(address - lo, hi - lo + max(lo, 0)), count, dtype]


def main():
    seed, trees = int(sys.argv[1]), int(sys.argv[2])
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    assert comm.Get_size() == 2, "2 ranks"
    cu = Driver()
    gen = TypeGen(seed, regular_p=1.0, allow_nonpositive_extent=False)
    rng = random.Random(seed * 7919 + 1)
    mismatches, tested = 0, 0
    for i in range(trees):
        t = gen.generate()
        info = t.info()
        count = max(1, min(64 if MIN_BYTES <= 1024 else 1 << 20, -(-MIN_BYTES // info.size))) if info.size else 1
        lo, hi = buffer_span(info, count)
        while count > 1 and hi - lo > MAX_SPAN:
            count //= 2
            lo, hi = buffer_span(info, count)
        span = hi - lo
        if info.size == 0 or span <= 0 or span > MAX_SPAN:
            t.free()
            continue
        tested += 1
        if rank == 0:
            data = rng.randbytes(span)
            host = ctypes.create_string_buffer(data, span)
            dev = cu.alloc(span)
            cu.put(dev, data)
            comm.Send(message(ctypes.addressof(host), lo, hi, count, t.dtype), dest=1, tag=2 * i)
            if ISEND:
                comm.Isend(message(dev, lo, hi, count, t.dtype), dest=1, tag=2 * i + 1).Wait()
            else:
                comm.Send(message(dev, lo, hi, count, t.dtype), dest=1, tag=2 * i + 1)
            comm.Recv([bytearray(1), MPI.BYTE], source=1, tag=2 * i)  # the device buffer was read
            cu.free(dev)
        else:
            rng.randbytes(span)  # the sender's bytes: keep the two generators in step
            poison = (bytes((k * 37 + i) & 0xFF for k in range(256)) * (span // 256 + 1))[:span]
            host = ctypes.create_string_buffer(poison, span)
            dev = cu.alloc(span)
            cu.put(dev, poison)
            st_host, st_dev = MPI.Status(), MPI.Status()
            comm.Recv(message(ctypes.addressof(host), lo, hi, count, t.dtype), source=0, tag=2 * i, status=st_host)
            if IRECV:
                comm.Irecv(message(dev, lo, hi, count, t.dtype), source=0, tag=2 * i + 1).Wait(st_dev)
            else:
                comm.Recv(message(dev, lo, hi, count, t.dtype), source=0, tag=2 * i + 1, status=st_dev)
            got = cu.get(dev, span)
            want = host.raw[:span]
            counts = (st_host.Get_count(MPI.BYTE), st_dev.Get_count(MPI.BYTE))
            if got != want or counts[0] != counts[1]:
                mismatches += 1
                first = next((k for k in range(span) if got[k] != want[k]), -1)
                print(f"ipc_typegen: MISMATCH tree {i} count {count} bytes {counts} first differing byte {first}"
                      f" of {span}: {t.desc}", flush=True)
            comm.Send([bytearray(1), MPI.BYTE], dest=0, tag=2 * i)
            cu.free(dev)
        t.free()
    if rank == 1:
        print(f"ipc_typegen: seed={seed} trees={tested} mismatches={mismatches}", flush=True)
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
