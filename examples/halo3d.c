/*
 * halo3d: 26-neighbour halo exchange on a periodic 3-D decomposition.
 *
 * This is commlib's reference workload.  Each rank owns a box of
 * nx*ny*nz cells carrying Q quantities, surrounded by a halo of width R:
 *
 *     double a[Q][nz+2R][ny+2R][nx+2R]      (C order, x fastest)
 *
 * Every face, edge and corner strip is described by a 4-D
 * MPI_Type_create_subarray (Q is a dimension too), so the interposer sees
 * non-trivial nested strided datatypes.  Two ways to move them:
 *
 *   --mode pack    MPI_Pack into a contiguous buffer, send MPI_PACKED,
 *                  MPI_Unpack into the halo (what many codes do by hand);
 *   --mode direct  hand the subarray types straight to MPI_Isend/MPI_Irecv.
 *
 * Where the grid lives:
 *
 *   (default)      host memory;
 *   --device       GPU memory, the pack buffers too: the same MPI calls get
 *                  device pointers, as in a GPU code over a CUDA-aware MPI.
 *                  Over an MPI that is not CUDA-aware this needs commlib
 *                  preloaded (`commlib run`); without it the MPI reads the
 *                  device pointers as host memory and crashes;
 *   --stage-host   GPU memory, but every exchange copies the whole grid to
 *                  pinned host memory, exchanges there and copies it back:
 *                  what such codes do without commlib (the baseline of
 *                  `commlib bench halo`).
 *
 * Interior cells hold a closed-form function of (q, global x, y, z), so
 * after the exchange every halo cell can be checked against the value at
 * the periodically wrapped global coordinate, independent of how the data
 * travelled.  With GPU memory, filling and checking go through a host copy
 * of the grid, outside the timed part.
 *
 * GPU memory comes from the CUDA driver API, opened with dlopen at run
 * time: no CUDA headers or libraries at build time, so plain mpicc builds
 * this anywhere.  Exit status: 0 verified, 1 a mismatch, 2 a bad command
 * line, 77 --device or --stage-host without a usable GPU.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NDIR 26
#define SENTINEL (-1.0)
#define NO_GPU_EXIT 77

enum mode { MODE_PACK, MODE_DIRECT };
enum memory { MEM_HOST, MEM_DEVICE, MEM_STAGE_HOST };
static const char *const memory_name[] = {"host", "device", "stage-host"};

struct opts {
    int n[3];       /* local box edge per axis, x y z */
    int radius;
    int quantities;
    int iters;
    int warmup;
    enum mode mode;
    enum memory memory;
    int corrupt;    /* hidden: damage one halo cell to prove the checker bites */
    int phases;     /* --phases: time each part of an exchange */
};

static void usage(FILE *f, const char *prog)
{
    fprintf(f,
            "usage: %s [options]\n"
            "  --n N            local cube edge (default 32)\n"
            "  --nx/--ny/--nz N local edge along one axis (overrides --n)\n"
            "  --radius R       halo width, 1 <= R <= smallest edge (default 2)\n"
            "  --quantities Q   values per cell (default 3)\n"
            "  --iters K        timed exchanges (default 20)\n"
            "  --warmup W       untimed exchanges before timing (default 2)\n"
            "  --mode M         pack | direct (default pack)\n"
            "  --device         grid and pack buffers in GPU memory, handed to MPI as they are\n"
            "                   (needs commlib, `commlib run`, unless the MPI is CUDA-aware)\n"
            "  --stage-host     grid in GPU memory, copied whole to the host and back around\n"
            "                   each host exchange (the baseline without commlib)\n"
            "  --phases         also print where an exchange's time goes (slowest rank, us):\n"
            "                   posting receives, packing and sending, MPI_Waitall, unpacking,\n"
            "                   and a device synchronisation after the exchange (GPU work\n"
            "                   still queued; not part of time/exchange)\n"
            "  --help           show this message\n",
            prog);
}

static int parse_int(const char *s, int min, int *out)
{
    char *end;
    long v = strtol(s, &end, 10);
    if (*s == '\0' || *end != '\0' || v < min || v > 1000000000L)
        return -1;
    *out = (int)v;
    return 0;
}

/* Returns 0 to run, 1 for --help, -1 for a bad command line (with *why
 * set).  Every rank parses the same argv, so all of them reach the same
 * verdict without communicating. */
static int parse_args(int argc, char **argv, struct opts *o, const char **why)
{
    int n = 32, axis[3] = {-1, -1, -1};
    o->radius = 2;
    o->quantities = 3;
    o->iters = 20;
    o->warmup = 2;
    o->mode = MODE_PACK;
    o->memory = MEM_HOST;
    o->corrupt = 0;
    o->phases = 0;

    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        const char *val = NULL;
        char name[32];
        /* Accept both "--flag value" and "--flag=value". */
        const char *eq = strchr(arg, '=');
        if (eq && (size_t)(eq - arg) < sizeof name) {
            memcpy(name, arg, (size_t)(eq - arg));
            name[eq - arg] = '\0';
            val = eq + 1;
        } else {
            snprintf(name, sizeof name, "%s", arg);
        }

        if (!strcmp(name, "--help") || !strcmp(name, "-h"))
            return 1;
        if (!strcmp(name, "--corrupt")) {
            o->corrupt = 1;
            continue;
        }
        if (!strcmp(name, "--phases")) {
            o->phases = 1;
            continue;
        }
        if (!val && (!strcmp(name, "--device") || !strcmp(name, "--stage-host"))) {
            enum memory m = strcmp(name, "--device") ? MEM_STAGE_HOST : MEM_DEVICE;
            if (o->memory != MEM_HOST && o->memory != m) {
                *why = "--device and --stage-host (pick one)";
                return -1;
            }
            o->memory = m;
            continue;
        }
        if (!val) {
            if (i + 1 >= argc) {
                *why = arg;
                return -1;
            }
            val = argv[++i];
        }

        int rc;
        if (!strcmp(name, "--n"))               rc = parse_int(val, 1, &n);
        else if (!strcmp(name, "--nx"))         rc = parse_int(val, 1, &axis[0]);
        else if (!strcmp(name, "--ny"))         rc = parse_int(val, 1, &axis[1]);
        else if (!strcmp(name, "--nz"))         rc = parse_int(val, 1, &axis[2]);
        else if (!strcmp(name, "--radius"))     rc = parse_int(val, 1, &o->radius);
        else if (!strcmp(name, "--quantities")) rc = parse_int(val, 1, &o->quantities);
        else if (!strcmp(name, "--iters"))      rc = parse_int(val, 1, &o->iters);
        else if (!strcmp(name, "--warmup"))     rc = parse_int(val, 0, &o->warmup);
        else if (!strcmp(name, "--mode")) {
            rc = 0;
            if (!strcmp(val, "pack"))        o->mode = MODE_PACK;
            else if (!strcmp(val, "direct")) o->mode = MODE_DIRECT;
            else                             rc = -1;
        } else
            rc = -1;
        if (rc) {
            *why = arg;
            return -1;
        }
    }

    for (int k = 0; k < 3; k++) {
        o->n[k] = axis[k] > 0 ? axis[k] : n;
        /* A wider halo would need cells from beyond the direct neighbour. */
        if (o->radius > o->n[k]) {
            *why = "--radius (larger than a local edge)";
            return -1;
        }
    }
    return 0;
}

/* ---- GPU memory, through the CUDA driver found at run time ---- */

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef struct CUctx_st *CUcontext;

static struct {
    CUresult (*cuInit)(unsigned);
    CUresult (*cuDeviceGetCount)(int *);
    CUresult (*cuDeviceGet)(CUdevice *, int);
    CUresult (*cuDevicePrimaryCtxRetain)(CUcontext *, CUdevice);
    CUresult (*cuCtxSetCurrent)(CUcontext);
    CUresult (*cuMemAlloc)(CUdeviceptr *, size_t);
    CUresult (*cuMemFree)(CUdeviceptr);
    CUresult (*cuMemHostAlloc)(void **, size_t, unsigned);
    CUresult (*cuMemFreeHost)(void *);
    CUresult (*cuMemcpyHtoD)(CUdeviceptr, const void *, size_t);
    CUresult (*cuMemcpyDtoH)(void *, CUdeviceptr, size_t);
    CUresult (*cuCtxSynchronize)(void);
} cu;

/* NULL once the driver is loaded and sees a device, else why not.  Runs before
 * MPI_Init: an interposer such as commlib looks for a driver the process has
 * already loaded, so it must be there before the first device pointer reaches
 * an MPI call. */
static const char *cuda_open(void)
{
    void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL);
    if (!lib)
        return "no CUDA driver (libcuda.so.1 not found)";
#define SYM(field, name)                                   \
    if (!(*(void **)&cu.field = dlsym(lib, name)))         \
        return "the CUDA driver lacks " name;
    SYM(cuInit, "cuInit")
    SYM(cuDeviceGetCount, "cuDeviceGetCount")
    SYM(cuDeviceGet, "cuDeviceGet")
    SYM(cuDevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain")
    SYM(cuCtxSetCurrent, "cuCtxSetCurrent")
    SYM(cuMemAlloc, "cuMemAlloc_v2")
    SYM(cuMemFree, "cuMemFree_v2")
    SYM(cuMemHostAlloc, "cuMemHostAlloc")
    SYM(cuMemFreeHost, "cuMemFreeHost")
    SYM(cuMemcpyHtoD, "cuMemcpyHtoD_v2")
    SYM(cuMemcpyDtoH, "cuMemcpyDtoH_v2")
    SYM(cuCtxSynchronize, "cuCtxSynchronize")
#undef SYM
    int count = 0;
    if (cu.cuInit(0) != 0 || cu.cuDeviceGetCount(&count) != 0)
        return "cuInit failed";
    return count > 0 ? NULL : "no CUDA device";
}

/* The ranks of a node take its GPUs round robin (several may share one). */
static int cuda_use_device(int local_rank)
{
    int count = 0;
    CUdevice device;
    CUcontext context;
    return cu.cuDeviceGetCount(&count) == 0 && count > 0 &&
           cu.cuDeviceGet(&device, local_rank % count) == 0 &&
           cu.cuDevicePrimaryCtxRetain(&context, device) == 0 && cu.cuCtxSetCurrent(context) == 0;
}

static void cuda_check(CUresult rc, const char *what)
{
    if (rc != 0) {
        fprintf(stderr, "halo3d: %s failed (CUDA error %d)\n", what, rc);
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
}
#define CU(call) cuda_check((call), #call)

static void *device_alloc(size_t bytes)
{
    CUdeviceptr p = 0;
    CU(cu.cuMemAlloc(&p, bytes));
    return (void *)(uintptr_t)p;
}

static void device_free(void *p) { CU(cu.cuMemFree((CUdeviceptr)(uintptr_t)p)); }

/* Directions are the 26 offsets in {-1,0,1}^3 minus the origin, numbered
 * in lexicographic (z, y, x) order.  With that numbering the opposite of
 * direction d is 25 - d, which keeps tag bookkeeping trivial. */
static void dir_offset(int d, int off[3])
{
    int k = d < 13 ? d : d + 1;      /* skip (0,0,0), which would be k = 13 */
    off[0] = k % 3 - 1;
    off[1] = (k / 3) % 3 - 1;
    off[2] = k / 9 - 1;
}

static int opposite(int d) { return NDIR - 1 - d; }

/* Subarray covering the strip on side `off` of the box: for a send type
 * the outermost R interior cells, for a receive type the R halo cells
 * beyond them.  Along an axis with offset 0 the strip spans the interior. */
static MPI_Datatype region_type(const struct opts *o, const int off[3], int halo)
{
    const int R = o->radius;
    int sizes[4], subsizes[4], starts[4];
    sizes[0] = o->quantities;
    subsizes[0] = o->quantities;
    starts[0] = 0;
    for (int k = 0; k < 3; k++) {
        int n = o->n[k], dim = 3 - k;       /* x is the last (fastest) C dim */
        sizes[dim] = n + 2 * R;
        if (off[k] == 0) {
            subsizes[dim] = n;
            starts[dim] = R;
        } else {
            subsizes[dim] = R;
            if (off[k] < 0)
                starts[dim] = halo ? 0 : R;
            else
                starts[dim] = halo ? n + R : n;
        }
    }
    MPI_Datatype t;
    MPI_Type_create_subarray(4, sizes, subsizes, starts, MPI_ORDER_C, MPI_DOUBLE, &t);
    MPI_Type_commit(&t);
    return t;
}

/* --phases: the parts of an exchange, in order */
enum { PH_POST, PH_SEND, PH_WAIT, PH_UNPACK, PH_SYNC, NPHASE };
static const char *const phase_name[NPHASE] = {"post-recv", "pack+send", "waitall", "unpack", "sync"};

struct domain {
    struct opts o;
    MPI_Comm comm;
    int dims[3], coords[3];
    long global[3];             /* global grid edge per axis */
    int ext[3];                 /* local extent incl. halo, x y z */
    size_t ncells;
    double *grid;               /* host memory, or GPU memory (--device, --stage-host) */
    double *host;               /* what fill and verify see: the grid itself, or its host copy */
    int nbr[NDIR];              /* rank in direction d */
    MPI_Datatype send_t[NDIR];  /* interior strip next to side d */
    MPI_Datatype recv_t[NDIR];  /* halo strip on side d */
    char *sbuf[NDIR], *rbuf[NDIR];
    int rsize[NDIR];
    double phase[NPHASE];       /* --phases: seconds in each part, timed exchanges only */
    int timing;                 /* the exchange running now is a timed one */
};

static size_t idx(const struct domain *dm, int q, int z, int y, int x)
{
    return (((size_t)q * dm->ext[2] + z) * dm->ext[1] + y) * dm->ext[0] + x;
}

/* Unique per (q, cell) and an integer below 2^53, hence exact in a double,
 * so verification can compare with == . */
static double field(const struct domain *dm, int q, long gx, long gy, long gz)
{
    long cells = dm->global[0] * dm->global[1] * dm->global[2];
    return (double)q * (double)cells + (double)((gz * dm->global[1] + gy) * dm->global[0] + gx);
}

/* Global coordinate of local index i (halo included) along axis k, wrapped
 * into [0, global) because the domain is periodic. */
static long wrap(const struct domain *dm, int k, int i)
{
    long g = (long)dm->coords[k] * dm->o.n[k] + i - dm->o.radius;
    long N = dm->global[k];
    return ((g % N) + N) % N;
}

static int in_interior(const struct domain *dm, int k, int i)
{
    return i >= dm->o.radius && i < dm->o.radius + dm->o.n[k];
}

static void fill(struct domain *dm)
{
    const int Q = dm->o.quantities;
    for (int q = 0; q < Q; q++)
        for (int z = 0; z < dm->ext[2]; z++)
            for (int y = 0; y < dm->ext[1]; y++)
                for (int x = 0; x < dm->ext[0]; x++) {
                    int inside = in_interior(dm, 0, x) && in_interior(dm, 1, y) &&
                                 in_interior(dm, 2, z);
                    dm->host[idx(dm, q, z, y, x)] =
                        inside ? field(dm, q, wrap(dm, 0, x), wrap(dm, 1, y), wrap(dm, 2, z))
                               : SENTINEL;
                }
}

/* Stale halo values from the previous exchange would hide a message that
 * never arrived, so the halo is poisoned before every exchange. */
static void poison_halo(struct domain *dm)
{
    const int R = dm->o.radius, nx = dm->o.n[0];
    for (int q = 0; q < dm->o.quantities; q++)
        for (int z = 0; z < dm->ext[2]; z++)
            for (int y = 0; y < dm->ext[1]; y++) {
                double *row = &dm->host[idx(dm, q, z, y, 0)];
                if (!in_interior(dm, 2, z) || !in_interior(dm, 1, y)) {
                    for (int x = 0; x < dm->ext[0]; x++)
                        row[x] = SENTINEL;
                } else {
                    for (int x = 0; x < R; x++) {
                        row[x] = SENTINEL;
                        row[R + nx + x] = SENTINEL;
                    }
                }
            }
}

/* --phases: adds the time since *t to part ph of a timed exchange and restarts *t. */
static void lap(struct domain *dm, int ph, double *t)
{
    if (!dm->o.phases || !dm->timing)
        return;
    double now = MPI_Wtime();
    dm->phase[ph] += now - *t;
    *t = now;
}

/* The message sent toward direction d carries tag d; it arrives from the
 * neighbour on the opposite side and fills our halo on that side.  Tags
 * keep messages apart when several directions map to the same rank (always
 * the case at 1 or 2 ranks). */
static void exchange(struct domain *dm, double *a)
{
    MPI_Request req[2 * NDIR];
    int nreq = 0;
    double t = dm->o.phases ? MPI_Wtime() : 0.0;

    for (int d = 0; d < NDIR; d++) {
        int from = opposite(d);
        if (dm->o.mode == MODE_PACK)
            MPI_Irecv(dm->rbuf[d], dm->rsize[d], MPI_PACKED, dm->nbr[from], d, dm->comm,
                      &req[nreq++]);
        else
            MPI_Irecv(a, 1, dm->recv_t[from], dm->nbr[from], d, dm->comm, &req[nreq++]);
    }
    lap(dm, PH_POST, &t);
    for (int d = 0; d < NDIR; d++) {
        if (dm->o.mode == MODE_PACK) {
            int pos = 0;
            MPI_Pack(a, 1, dm->send_t[d], dm->sbuf[d], dm->rsize[d], &pos, dm->comm);
            MPI_Isend(dm->sbuf[d], pos, MPI_PACKED, dm->nbr[d], d, dm->comm, &req[nreq++]);
        } else {
            MPI_Isend(a, 1, dm->send_t[d], dm->nbr[d], d, dm->comm, &req[nreq++]);
        }
    }
    lap(dm, PH_SEND, &t);
    MPI_Waitall(nreq, req, MPI_STATUSES_IGNORE);
    lap(dm, PH_WAIT, &t);

    if (dm->o.mode == MODE_PACK)
        for (int d = 0; d < NDIR; d++) {
            int pos = 0;
            MPI_Unpack(dm->rbuf[d], dm->rsize[d], &pos, a, 1, dm->recv_t[opposite(d)],
                       dm->comm);
        }
    lap(dm, PH_UNPACK, &t);
}

static size_t grid_bytes(const struct domain *dm) { return dm->ncells * sizeof(double); }

/* The host copy to the GPU and back; nothing to do when the grid is host memory. */
static void upload(struct domain *dm)
{
    if (dm->grid != dm->host)
        CU(cu.cuMemcpyHtoD((CUdeviceptr)(uintptr_t)dm->grid, dm->host, grid_bytes(dm)));
}

static void download(struct domain *dm)
{
    if (dm->grid != dm->host)
        CU(cu.cuMemcpyDtoH(dm->host, (CUdeviceptr)(uintptr_t)dm->grid, grid_bytes(dm)));
}

/* One timed exchange.  --stage-host takes the whole grid through host memory,
 * as a code must whose MPI cannot take device pointers. */
static void step(struct domain *dm)
{
    if (dm->o.memory == MEM_STAGE_HOST) {
        download(dm);
        exchange(dm, dm->host);
        upload(dm);
    } else {
        exchange(dm, dm->grid);
    }
}

/* Checks every cell, halo and interior: the interior must survive the
 * exchange untouched as well. */
static long verify(const struct domain *dm, int rank)
{
    long bad = 0;
    for (int q = 0; q < dm->o.quantities; q++)
        for (int z = 0; z < dm->ext[2]; z++)
            for (int y = 0; y < dm->ext[1]; y++)
                for (int x = 0; x < dm->ext[0]; x++) {
                    double want = field(dm, q, wrap(dm, 0, x), wrap(dm, 1, y), wrap(dm, 2, z));
                    double got = dm->host[idx(dm, q, z, y, x)];
                    if (got != want) {
                        if (bad == 0)
                            fprintf(stderr,
                                    "halo3d: rank %d: first mismatch at q=%d z=%d y=%d x=%d "
                                    "(local, halo included): got %.17g want %.17g\n",
                                    rank, q, z, y, x, got, want);
                        bad++;
                    }
                }
    return bad;
}

static void setup(struct domain *dm, int size)
{
    int periods[3] = {1, 1, 1};
    MPI_Dims_create(size, 3, dm->dims);
    MPI_Cart_create(MPI_COMM_WORLD, 3, dm->dims, periods, 0, &dm->comm);
    int me;
    MPI_Comm_rank(dm->comm, &me);
    MPI_Cart_coords(dm->comm, me, 3, dm->coords);

    dm->ncells = (size_t)dm->o.quantities;
    for (int k = 0; k < 3; k++) {
        dm->global[k] = (long)dm->dims[k] * dm->o.n[k];
        dm->ext[k] = dm->o.n[k] + 2 * dm->o.radius;
        dm->ncells *= (size_t)dm->ext[k];
    }
    if (dm->o.memory == MEM_HOST) {
        dm->grid = dm->host = malloc(grid_bytes(dm));
    } else {
        dm->grid = device_alloc(grid_bytes(dm));
        /* pinned: the fastest copies the --stage-host baseline can have */
        void *pinned = NULL;
        CU(cu.cuMemHostAlloc(&pinned, grid_bytes(dm), 0));
        dm->host = pinned;
    }
    if (!dm->host) {
        fprintf(stderr, "halo3d: out of memory (%zu cells)\n", dm->ncells);
        MPI_Abort(MPI_COMM_WORLD, 1);
    }

    for (int d = 0; d < NDIR; d++) {
        int off[3], c[3];
        dir_offset(d, off);
        /* Wrap explicitly rather than rely on MPI_Cart_rank doing it. */
        for (int k = 0; k < 3; k++)
            c[k] = (dm->coords[k] + off[k] + dm->dims[k]) % dm->dims[k];
        MPI_Cart_rank(dm->comm, c, &dm->nbr[d]);
        dm->send_t[d] = region_type(&dm->o, off, 0);
        dm->recv_t[d] = region_type(&dm->o, off, 1);
        dm->sbuf[d] = dm->rbuf[d] = NULL;
        dm->rsize[d] = 0;
        if (dm->o.mode == MODE_PACK) {
            /* Send and receive strips on a side have the same shape, so one
             * size serves both buffers. */
            MPI_Pack_size(1, dm->send_t[d], dm->comm, &dm->rsize[d]);
            if (dm->o.memory == MEM_DEVICE) {   /* the whole exchange stays on the GPU */
                dm->sbuf[d] = device_alloc((size_t)dm->rsize[d]);
                dm->rbuf[d] = device_alloc((size_t)dm->rsize[d]);
            } else {
                dm->sbuf[d] = malloc((size_t)dm->rsize[d]);
                dm->rbuf[d] = malloc((size_t)dm->rsize[d]);
            }
            if (!dm->sbuf[d] || !dm->rbuf[d])
                MPI_Abort(MPI_COMM_WORLD, 1);
        }
    }
}

static void teardown(struct domain *dm)
{
    for (int d = 0; d < NDIR; d++) {
        MPI_Type_free(&dm->send_t[d]);
        MPI_Type_free(&dm->recv_t[d]);
        if (dm->o.memory == MEM_DEVICE && dm->sbuf[d]) {
            device_free(dm->sbuf[d]);
            device_free(dm->rbuf[d]);
        } else {
            free(dm->sbuf[d]);
            free(dm->rbuf[d]);
        }
    }
    if (dm->grid != dm->host) {
        device_free(dm->grid);
        CU(cu.cuMemFreeHost(dm->host));
    } else {
        free(dm->host);
    }
    MPI_Comm_free(&dm->comm);
}

/* 1 when every rank has a GPU to use (all exit alike otherwise). */
static int gpus_ready(const char *no_gpu, int rank)
{
    MPI_Comm node;
    int local_rank, ok, all_ok;
    MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &node);
    MPI_Comm_rank(node, &local_rank);
    MPI_Comm_free(&node);
    ok = !no_gpu && cuda_use_device(local_rank);
    MPI_Allreduce(&ok, &all_ok, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    if (!ok)
        fprintf(stderr, "halo3d: rank %d: no GPU to use: %s\n", rank,
                no_gpu ? no_gpu : "could not select a device");
    return all_ok;
}

int main(int argc, char **argv)
{
    /* The command line is read before MPI_Init so that a GPU run can load the
     * CUDA driver first (see cuda_open); errors are reported after it. */
    struct domain dm;
    memset(&dm, 0, sizeof dm);
    const char *why = NULL, *no_gpu = NULL;
    int pr = parse_args(argc, argv, &dm.o, &why);
    if (pr == 0 && dm.o.memory != MEM_HOST)
        no_gpu = cuda_open();

    MPI_Init(&argc, &argv);
    int rank, size;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);

    if (pr != 0) {
        if (rank == 0) {
            if (pr < 0)
                fprintf(stderr, "halo3d: bad argument: %s\n", why);
            usage(pr > 0 ? stdout : stderr, argv[0]);
        }
        MPI_Finalize();
        return pr > 0 ? 0 : 2;
    }
    if (dm.o.memory != MEM_HOST) {
        if (!gpus_ready(no_gpu, rank)) {
            MPI_Finalize();
            return NO_GPU_EXIT;
        }
        /* Said, not hidden: a host MPI handed device pointers fails in its own way. */
        if (dm.o.memory == MEM_DEVICE && rank == 0 && !dlsym(RTLD_DEFAULT, "commlib_stat"))
            fprintf(stderr, "halo3d: --device without commlib: the MPI gets device pointers, which "
                            "only a CUDA-aware MPI can take (run it under `commlib run`)\n");
    }

    setup(&dm, size);
    fill(&dm);

    double elapsed = 0.0;
    for (int it = 0; it < dm.o.warmup + dm.o.iters; it++) {
        poison_halo(&dm);
        upload(&dm);
        /* Line ranks up so one rank's slow poisoning is not billed as
         * communication time to its neighbours. */
        MPI_Barrier(dm.comm);
        double t0 = MPI_Wtime();
        dm.timing = it >= dm.o.warmup;
        step(&dm);
        if (dm.timing)
            elapsed += MPI_Wtime() - t0;
        if (dm.o.phases && dm.o.memory != MEM_HOST) {
            /* GPU work the exchange left queued (packs held back, say), apart */
            double t1 = MPI_Wtime();
            CU(cu.cuCtxSynchronize());
            if (dm.timing)
                dm.phase[PH_SYNC] += MPI_Wtime() - t1;
        }
    }
    dm.timing = 0;
    download(&dm);

    if (dm.o.corrupt && rank == size - 1)
        dm.host[idx(&dm, dm.o.quantities - 1, 0, 0, 0)] += 1.0;   /* a corner halo cell */

    long bad = verify(&dm, rank), total_bad = 0;
    MPI_Allreduce(&bad, &total_bad, 1, MPI_LONG, MPI_SUM, MPI_COMM_WORLD);
    double avg = elapsed / dm.o.iters, worst = 0.0;
    MPI_Reduce(&avg, &worst, 1, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD);

    if (rank == 0) {
        char verdict[64];
        if (total_bad == 0)
            snprintf(verdict, sizeof verdict, "OK");
        else
            snprintf(verdict, sizeof verdict, "FAILED (%ld mismatched cells)", total_bad);
        printf("halo3d: ranks=%d dims=%dx%dx%d local=%dx%dx%d radius=%d quantities=%d "
               "mode=%s memory=%s iters=%d time/exchange=%.1f us verified=%s\n",
               size, dm.dims[0], dm.dims[1], dm.dims[2], dm.o.n[0], dm.o.n[1], dm.o.n[2],
               dm.o.radius, dm.o.quantities, dm.o.mode == MODE_PACK ? "pack" : "direct",
               memory_name[dm.o.memory], dm.o.iters, worst * 1e6, verdict);
        fflush(stdout);
    }
    if (dm.o.phases) {
        double slowest[NPHASE];
        MPI_Reduce(dm.phase, slowest, NPHASE, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD);
        if (rank == 0) {
            printf("halo3d phases (us per exchange, slowest rank):");
            for (int p = 0; p < NPHASE; p++)
                printf(" %s=%.1f", phase_name[p], slowest[p] / dm.o.iters * 1e6);
            printf("\n");
            fflush(stdout);
        }
    }

    teardown(&dm);
    MPI_Finalize();
    /* Every rank knows the global verdict, so all exit alike. */
    return total_bad == 0 ? 0 : 1;
}
