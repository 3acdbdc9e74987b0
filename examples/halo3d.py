"""halo3d.py: the 26-neighbour halo exchange of examples/halo3d.c, with mpi4py.

The same workload, flags and summary line as the C program: a periodic 3-D
decomposition, Q quantities per cell, a halo of width R, every face, edge and
corner strip a 4-D subarray datatype, and either

  --mode pack    Datatype.Pack into a contiguous buffer, send MPI.PACKED,
                 Datatype.Unpack into the halo;
  --mode direct  the subarray types handed straight to Isend/Irecv.

Where the grid lives:

  (default)      a numpy array;
  --device       a cupy array (pack buffers too), handed to mpi4py as it is:
                 mpi4py passes the device pointer on (__cuda_array_interface__),
                 so over an MPI that is not CUDA-aware this needs commlib
                 preloaded (`commlib run`); without it the MPI crashes;
  --stage-host   a cupy array, copied whole into pinned host memory around
                 each host exchange: what such codes do without commlib.

The ordering rule of CUDA-aware MPI holds for commlib too: a device buffer
must be ready when the MPI call is made, so the current stream is
synchronized before the exchange (mpi4py does not do it).

    commlib run -n 4 python examples/halo3d.py --n 16
    commlib run -n 2 python examples/halo3d.py --n 64 --device --mode direct

Every cell, halo and interior, is checked against a closed-form function of
its periodically wrapped global coordinate.  Exit status: 0 verified, 1 a
mismatch, 2 a bad command line, 77 --device or --stage-host without cupy or
a GPU.
"""
import argparse
import sys

import numpy as np

NDIR = 26
SENTINEL = -1.0
NO_GPU_EXIT = 77


class BadArgument(Exception):
    pass


class Parser(argparse.ArgumentParser):
    """argparse that reports instead of exiting: only rank 0 should print."""

    def error(self, message):
        raise BadArgument(message)


def at_least(low):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}")
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}: {value}")
        return value
    return parse


def make_parser():
    p = Parser(prog="halo3d.py", add_help=False,
               description="26-neighbour halo exchange with subarray datatypes over mpi4py")
    p.add_argument("--n", type=at_least(1), default=32, help="local cube edge (default 32)")
    for axis in "xyz":
        p.add_argument(f"--n{axis}", type=at_least(1), help="local edge along one axis (overrides --n)")
    p.add_argument("--radius", type=at_least(1), default=2,
                   help="halo width, 1 <= R <= smallest edge (default 2)")
    p.add_argument("--quantities", type=at_least(1), default=3, help="values per cell (default 3)")
    p.add_argument("--iters", type=at_least(1), default=20, help="timed exchanges (default 20)")
    p.add_argument("--warmup", type=at_least(0), default=2,
                   help="untimed exchanges before timing (default 2)")
    p.add_argument("--mode", choices=("pack", "direct"), default="pack", help="(default pack)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--device", dest="memory", action="store_const", const="device", default="host",
                       help="grid and pack buffers are cupy arrays, handed to MPI as they are "
                            "(needs commlib, `commlib run`, unless the MPI is CUDA-aware)")
    where.add_argument("--stage-host", dest="memory", action="store_const", const="stage-host",
                       help="grid is a cupy array, copied whole to the host and back around each "
                            "host exchange (the baseline without commlib)")
    p.add_argument("--phases", action="store_true",
                   help="also print where an exchange's time goes (slowest rank, us): posting receives, "
                        "packing and sending, Waitall, unpacking, and a device synchronisation after the "
                        "exchange (GPU work still queued; not part of time/exchange)")
    p.add_argument("--corrupt", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("-h", "--help", action="store_true", help="show this message")
    return p


def parse_args(argv):
    """(options, None) or (None, why); every rank reaches the same verdict alone."""
    try:
        opts = make_parser().parse_args(argv)
    except BadArgument as e:
        return None, str(e)
    if opts.help:
        return opts, None
    opts.edges = [opts.nx or opts.n, opts.ny or opts.n, opts.nz or opts.n]   # x y z
    if opts.radius > min(opts.edges):
        return None, "--radius (larger than a local edge)"
    return opts, None


def open_cupy():
    """(cupy, None), or (None, why there is no GPU to use).

    Runs before mpi4py initialises MPI: an interposer such as commlib looks for a CUDA
    driver the process has already loaded, so it must be there before the first device
    pointer reaches an MPI call."""
    try:
        import cupy
    except ImportError as e:
        return None, f"cupy is not installed ({e})"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None, "no CUDA device"
    except Exception as e:          # cupy raises its CUDARuntimeError without a driver
        return None, f"no CUDA device ({e})"
    return cupy, None


def direction_offset(d):
    """Offsets (x, y, z) in {-1,0,1}^3 of direction d, numbered as in halo3d.c: the
    opposite of d is 25 - d."""
    k = d if d < 13 else d + 1
    return (k % 3 - 1, k // 3 % 3 - 1, k // 9 - 1)


def opposite(d):
    return NDIR - 1 - d


# --phases: the parts of an exchange, in order
PHASES = ("post-recv", "pack+send", "waitall", "unpack", "sync")


class Domain:
    def __init__(self, MPI, opts, xp):
        self.MPI, self.opts, self.xp = MPI, opts, xp
        self.phase = dict.fromkeys(PHASES, 0.0)   # --phases: seconds in each part, timed exchanges
        self.timing = False                        # the exchange running now is a timed one
        world = MPI.COMM_WORLD
        self.dims = MPI.Compute_dims(world.Get_size(), 3)
        self.comm = world.Create_cart(self.dims, periods=[True] * 3, reorder=False)
        self.coords = self.comm.Get_coords(self.comm.Get_rank())
        n, R, Q = opts.edges, opts.radius, opts.quantities
        self.ext = [n[k] + 2 * R for k in range(3)]
        self.shape = (Q, self.ext[2], self.ext[1], self.ext[0])       # x fastest
        self.global_ = [self.dims[k] * n[k] for k in range(3)]

        self.nbr, self.send_t, self.recv_t = [], [], []
        for d in range(NDIR):
            off = direction_offset(d)
            c = [(self.coords[k] + off[k]) % self.dims[k] for k in range(3)]
            self.nbr.append(self.comm.Get_cart_rank(c))
            self.send_t.append(self.region_type(off, halo=False))
            self.recv_t.append(self.region_type(off, halo=True))
        self.sbuf = self.rbuf = None
        if opts.mode == "pack":
            # Pack buffers live where the exchange runs: with --device on the GPU.
            bxp = xp if opts.memory == "device" else np
            sizes = [t.Pack_size(1, self.comm) for t in self.send_t]
            self.sbuf = [bxp.empty(s, dtype=np.uint8) for s in sizes]
            self.rbuf = [bxp.empty(s, dtype=np.uint8) for s in sizes]

        self.want = self.expected()
        self.grid = xp.array(self.want)       # a copy, on the GPU with cupy
        self.host = None
        if opts.memory == "stage-host":
            import cupyx
            self.host = cupyx.empty_pinned(self.shape, dtype=np.float64)

    def region_type(self, off, halo):
        """Subarray of the strip on side `off`: the outermost R interior cells (send) or
        the R halo cells beyond them (receive); an axis with offset 0 spans the interior."""
        n, R, Q = self.opts.edges, self.opts.radius, self.opts.quantities
        sizes, subsizes, starts = [Q, 0, 0, 0], [Q, 0, 0, 0], [0, 0, 0, 0]
        for k in range(3):
            dim = 3 - k
            sizes[dim] = n[k] + 2 * R
            if off[k] == 0:
                subsizes[dim], starts[dim] = n[k], R
            else:
                subsizes[dim] = R
                starts[dim] = (0 if halo else R) if off[k] < 0 else (n[k] + R if halo else n[k])
        return self.MPI.DOUBLE.Create_subarray(sizes, subsizes, starts,
                                               order=self.MPI.ORDER_C).Commit()

    def expected(self):
        """Every cell's value after an exchange (numpy): unique per (q, cell), an integer
        below 2^53, so exact in a double."""
        n, R, Q = self.opts.edges, self.opts.radius, self.opts.quantities
        g = [(self.coords[k] * n[k] + np.arange(self.ext[k]) - R) % self.global_[k] for k in range(3)]
        gx, gy, gz = g
        cells = self.global_[0] * self.global_[1] * self.global_[2]
        value = (np.arange(Q).reshape(Q, 1, 1, 1) * cells
                 + (gz.reshape(1, -1, 1, 1) * self.global_[1] + gy.reshape(1, 1, -1, 1)) * self.global_[0]
                 + gx.reshape(1, 1, 1, -1))
        return value.astype(np.float64)

    def poison_halo(self):
        """Stale halo values would hide a message that never arrived."""
        n, R = self.opts.edges, self.opts.radius
        for axis, edge in ((1, n[2]), (2, n[1]), (3, n[0])):
            low = [slice(None)] * 4
            high = list(low)
            low[axis], high[axis] = slice(0, R), slice(R + edge, None)
            self.grid[tuple(low)] = SENTINEL
            self.grid[tuple(high)] = SENTINEL

    def sync(self):
        """The ordering rule: device work on a buffer is done before it reaches MPI."""
        if self.xp is not np:
            self.xp.cuda.get_current_stream().synchronize()

    def lap(self, part, t):
        """--phases: adds the time since t to a timed exchange's part; returns the time now."""
        if not (self.opts.phases and self.timing):
            return t
        now = self.MPI.Wtime()
        self.phase[part] += now - t
        return now

    def exchange(self, a):
        """Direction d's message carries tag d; it comes from the neighbour on the opposite
        side and fills the halo on that side."""
        MPI, comm, pack = self.MPI, self.comm, self.opts.mode == "pack"
        t = MPI.Wtime()
        requests = []
        for d in range(NDIR):
            src = self.nbr[opposite(d)]
            if pack:
                requests.append(comm.Irecv([self.rbuf[d], MPI.PACKED], src, d))
            else:
                requests.append(comm.Irecv([a, 1, self.recv_t[opposite(d)]], src, d))
        t = self.lap("post-recv", t)
        for d in range(NDIR):
            if pack:
                size = self.send_t[d].Pack(a, self.sbuf[d], 0, comm)
                requests.append(comm.Isend([self.sbuf[d], size, MPI.PACKED], self.nbr[d], d))
            else:
                requests.append(comm.Isend([a, 1, self.send_t[d]], self.nbr[d], d))
        t = self.lap("pack+send", t)
        MPI.Request.Waitall(requests)
        t = self.lap("waitall", t)
        if pack:
            for d in range(NDIR):
                self.recv_t[opposite(d)].Unpack(self.rbuf[d], 0, a, comm)
        self.lap("unpack", t)

    def step(self):
        """One timed exchange; --stage-host takes the whole grid through host memory."""
        if self.opts.memory == "stage-host":
            self.grid.get(out=self.host)
            self.exchange(self.host)
            self.grid.set(self.host)
            self.sync()
        else:
            self.exchange(self.grid)

    def verify(self, rank):
        got = self.grid if self.xp is np else self.xp.asnumpy(self.grid)
        wrong = got != self.want
        bad = int(np.count_nonzero(wrong))
        if bad:
            q, z, y, x = (int(i) for i in np.argwhere(wrong)[0])
            print(f"halo3d.py: rank {rank}: first mismatch at q={q} z={z} y={y} x={x} (local, halo "
                  f"included): got {got[q, z, y, x]!r} want {self.want[q, z, y, x]!r}",
                  file=sys.stderr, flush=True)
        return bad

    def free(self):
        for t in self.send_t + self.recv_t:
            t.Free()
        self.comm.Free()


def commlib_loaded():
    import ctypes
    return hasattr(ctypes.CDLL(None), "commlib_stat")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    opts, why = parse_args(argv)
    cupy, no_gpu = None, None
    if opts and not opts.help and opts.memory != "host":
        cupy, no_gpu = open_cupy()

    from mpi4py import MPI
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    if why or opts.help:
        if rank == 0:
            if why:
                print(f"halo3d.py: bad argument: {why}", file=sys.stderr)
            make_parser().print_help(sys.stderr if why else sys.stdout)
        return 2 if why else 0

    xp = np
    if opts.memory != "host":
        if cupy:
            local = world.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
            cupy.cuda.Device(local.Get_rank() % cupy.cuda.runtime.getDeviceCount()).use()
            local.Free()
            xp = cupy
        else:
            print(f"halo3d.py: rank {rank}: no GPU to use: {no_gpu}", file=sys.stderr)
        if world.allreduce(0 if cupy is None else 1, op=MPI.MIN) == 0:
            return NO_GPU_EXIT
        if opts.memory == "device" and rank == 0 and not commlib_loaded():
            print("halo3d.py: --device without commlib: the MPI gets device pointers, which only "
                  "a CUDA-aware MPI can take (run it under `commlib run`)", file=sys.stderr)

    dm = Domain(MPI, opts, xp)
    elapsed = 0.0
    for it in range(opts.warmup + opts.iters):
        dm.poison_halo()
        dm.sync()
        # Line ranks up so one rank's slow poisoning is not billed as communication time.
        dm.comm.Barrier()
        t0 = MPI.Wtime()
        dm.timing = it >= opts.warmup
        dm.step()
        if dm.timing:
            elapsed += MPI.Wtime() - t0
        if opts.phases and xp is not np:
            t1 = MPI.Wtime()     # GPU work the exchange left queued, apart
            xp.cuda.Device().synchronize()
            if dm.timing:
                dm.phase["sync"] += MPI.Wtime() - t1
    dm.timing = False

    if opts.corrupt and rank == size - 1:
        dm.grid[opts.quantities - 1, 0, 0, 0] += 1.0      # a corner halo cell

    total_bad = world.allreduce(dm.verify(rank), op=MPI.SUM)
    worst = world.reduce(elapsed / opts.iters, op=MPI.MAX, root=0)
    if rank == 0:
        verdict = "OK" if total_bad == 0 else f"FAILED ({total_bad} mismatched cells)"
        n = opts.edges
        print(f"halo3d.py: ranks={size} dims={dm.dims[0]}x{dm.dims[1]}x{dm.dims[2]} "
              f"local={n[0]}x{n[1]}x{n[2]} radius={opts.radius} quantities={opts.quantities} "
              f"mode={opts.mode} memory={opts.memory} iters={opts.iters} "
              f"time/exchange={worst * 1e6:.1f} us verified={verdict}", flush=True)
    if opts.phases:
        slowest = [world.reduce(dm.phase[p], op=MPI.MAX, root=0) for p in PHASES]
        if rank == 0:
            print("halo3d.py phases (us per exchange, slowest rank): " +
                  " ".join(f"{p}={s / opts.iters * 1e6:.1f}" for p, s in zip(PHASES, slowest)), flush=True)
    dm.free()
    # Every rank knows the global verdict, so all exit alike.
    return 0 if total_bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
