/* bench_device_pack: MPI_Pack of device memory into device memory (commlib's device engine
 * when libcommlib.so is preloaded) against, in the same run, cudaMemcpy device-to-device of
 * the packed byte count and cudaMemcpy2D gathering the same strided blocks (the copy
 * engine), over TEMPI's grid: 2D objects of bytes (vector, hvector, subarray) of 1 KiB,
 * 1 MiB and 4 MiB, blocks of 1..512 bytes at stride 512, packed with count 1 and 2.
 *
 * No CUDA headers or libraries: the driver API is found with dlopen("libcuda.so.1").
 * One rank.  Every figure is the median wall-clock time of one call including its
 * completion (MPI_Pack returns when the bytes are packed; the copies are followed by a
 * stream synchronisation), the three (and MPI_Unpack back into the typed buffer) timed
 * interleaved call by call.  The packed bytes are compared with PMPI_Pack of a host copy.
 *
 * Output on stdout: '#' comment lines, then CSV with a header, one line per shape.
 * Usage: bench_device_pack [-q] [-t TARGET_MS] [-n MIN_CALLS] [-m MAX_EXTENT_MIB] [-f SUBSTRING] [-l]
 *   -q  quick (target 20 ms per shape)        -t  time spent per shape (default 150 ms)
 *   -n  at least this many calls of each (default 30; 10 with -q)
 *   -m  skip shapes whose input spans more (default 4608)
 *   -f  only shapes whose name contains SUBSTRING           -l  list the shapes and exit
 * Exit status: 0 all identical, 1 a mismatch, 2 error, 77 no CUDA device.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef struct CUctx_st *CUcontext;
typedef struct CUstream_st *CUstream;

typedef struct { /* CUDA_MEMCPY2D (v2 layout) */
    size_t srcXInBytes, srcY;
    int srcMemoryType;
    const void *srcHost;
    CUdeviceptr srcDevice;
    void *srcArray;
    size_t srcPitch;
    size_t dstXInBytes, dstY;
    int dstMemoryType;
    void *dstHost;
    CUdeviceptr dstDevice;
    void *dstArray;
    size_t dstPitch;
    size_t WidthInBytes, Height;
} memcpy2d_args;
#define MEMORYTYPE_DEVICE 2
#define ATTRIBUTE_MULTIPROCESSOR_COUNT 16

static struct {
    CUresult (*cuInit)(unsigned);
    CUresult (*cuDeviceGet)(CUdevice *, int);
    CUresult (*cuDeviceGetName)(char *, int, CUdevice);
    CUresult (*cuDeviceGetAttribute)(int *, int, CUdevice);
    CUresult (*cuDevicePrimaryCtxRetain)(CUcontext *, CUdevice);
    CUresult (*cuCtxSetCurrent)(CUcontext);
    CUresult (*cuMemGetInfo)(size_t *, size_t *);
    CUresult (*cuMemAlloc)(CUdeviceptr *, size_t);
    CUresult (*cuMemFree)(CUdeviceptr);
    CUresult (*cuMemcpyHtoD)(CUdeviceptr, const void *, size_t);
    CUresult (*cuMemcpyDtoH)(void *, CUdeviceptr, size_t);
    CUresult (*cuMemcpyDtoDAsync)(CUdeviceptr, CUdeviceptr, size_t, CUstream);
    CUresult (*cuMemcpy2DAsync)(const memcpy2d_args *, CUstream);
    CUresult (*cuStreamSynchronize)(CUstream);
} cu;

static void check(CUresult rc, const char *what)
{
    if (rc == 0) return;
    fprintf(stderr, "bench_device_pack: %s failed: CUDA error %d\n", what, rc);
    PMPI_Abort(MPI_COMM_WORLD, 2);
}

static void check_mpi(int rc, const char *what)
{
    if (rc == MPI_SUCCESS) return;
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    PMPI_Error_string(rc, msg, &len);
    fprintf(stderr, "bench_device_pack: %s failed: %s\n", what, msg);
    PMPI_Abort(MPI_COMM_WORLD, 2);
}

static int cuda_open(char *name, int len, int *sms)
{
    void *h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL);
    if (!h) return 0;
#define SYM(field, sym) \
    if (!(*(void **)&cu.field = dlsym(h, sym))) return 0;
    SYM(cuInit, "cuInit") SYM(cuDeviceGet, "cuDeviceGet") SYM(cuDeviceGetName, "cuDeviceGetName")
    SYM(cuDeviceGetAttribute, "cuDeviceGetAttribute") SYM(cuDevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain")
    SYM(cuCtxSetCurrent, "cuCtxSetCurrent") SYM(cuMemGetInfo, "cuMemGetInfo_v2") SYM(cuMemAlloc, "cuMemAlloc_v2")
    SYM(cuMemFree, "cuMemFree_v2") SYM(cuMemcpyHtoD, "cuMemcpyHtoD_v2") SYM(cuMemcpyDtoH, "cuMemcpyDtoH_v2")
    SYM(cuMemcpyDtoDAsync, "cuMemcpyDtoDAsync_v2") SYM(cuMemcpy2DAsync, "cuMemcpy2DAsync_v2")
    SYM(cuStreamSynchronize, "cuStreamSynchronize")
#undef SYM
    CUdevice dev;
    CUcontext ctx;
    if (cu.cuInit(0) || cu.cuDeviceGet(&dev, 0) || cu.cuDevicePrimaryCtxRetain(&ctx, dev) || cu.cuCtxSetCurrent(ctx))
        return 0;
    cu.cuDeviceGetName(name, len, dev);
    cu.cuDeviceGetAttribute(sms, ATTRIBUTE_MULTIPROCESSOR_COUNT, dev);
    return 1;
}

static double now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

typedef long long (*stat_fn)(const char *name);
static stat_fn commlib_stat;
static long long stat_value(const char *name) { return commlib_stat ? commlib_stat(name) : -1; }

#define MAX_SHAPES 256
#define SLACK 64
#define STRIDE 512

struct shape {
    char name[64];
    const char *kind;
    MPI_Datatype type;
    int count;
    long long target, block, numblocks, packed, lo, span;
};
static struct shape shapes[MAX_SHAPES];
static int n_shapes;

static void add_shape(const char *kind, long long target, int block, int count, const char *filter,
                      long long max_span)
{
    struct shape s;
    memset(&s, 0, sizeof s);
    const char *short_kind = !strcmp(kind, "vector") ? "vec" : !strcmp(kind, "hvector") ? "hvec" : "subarr";
    snprintf(s.name, sizeof s.name, "%s_%lld%s_b%d_c%d", short_kind, target >= 1 << 20 ? target >> 20 : target >> 10,
             target >= 1 << 20 ? "MiB" : "KiB", block, count);
    if (filter && !strstr(s.name, filter)) return;
    s.kind = kind;
    s.target = target;
    s.block = block;
    s.count = count;
    s.numblocks = target / block;
    int n = (int)s.numblocks;
    if (!strcmp(kind, "vector"))
        check_mpi(MPI_Type_vector(n, block, STRIDE, MPI_BYTE, &s.type), "MPI_Type_vector");
    else if (!strcmp(kind, "hvector"))
        check_mpi(MPI_Type_create_hvector(n, block, STRIDE, MPI_BYTE, &s.type), "MPI_Type_create_hvector");
    else {
        int sizes[2] = {n, STRIDE}, subsizes[2] = {n, block}, starts[2] = {0, 0};
        check_mpi(MPI_Type_create_subarray(2, sizes, subsizes, starts, MPI_ORDER_C, MPI_BYTE, &s.type),
                  "MPI_Type_create_subarray");
    }
    check_mpi(MPI_Type_commit(&s.type), "MPI_Type_commit");
    MPI_Aint lb, extent, true_lb, true_extent;
    PMPI_Type_get_extent(s.type, &lb, &extent);
    PMPI_Type_get_true_extent(s.type, &true_lb, &true_extent);
    s.lo = true_lb;
    s.span = true_extent + (long long)(count - 1) * extent;
    s.packed = target * count;
    if (s.span > max_span) {
        printf("# skipped %s: input spans %lld bytes > limit %lld (-m, or device memory)\n", s.name, s.span, max_span);
        MPI_Type_free(&s.type);
        return;
    }
    if (n_shapes == MAX_SHAPES) return;
    shapes[n_shapes++] = s;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

/* The timed operations on one shape. */
enum { OP_PACK, OP_UNPACK, OP_MEMCPY, OP_MEMCPY2D, N_OPS };
static const char *const op_names[N_OPS] = {"pack", "unpack", "memcpy", "memcpy2d"};

struct buffers {
    char *typed;          /* device: the typed buffer's pointer */
    char *packed;         /* device: what MPI_Pack writes and MPI_Unpack reads */
    CUdeviceptr src, dst; /* device: the copies' source and destination */
};

static double run_op(int op, const struct shape *s, const struct buffers *b)
{
    double t0 = now_ns();
    int pos = 0;
    switch (op) {
    case OP_PACK:
        check_mpi(MPI_Pack(b->typed, s->count, s->type, b->packed, (int)s->packed, &pos, MPI_COMM_WORLD), "MPI_Pack");
        break;
    case OP_UNPACK:
        check_mpi(MPI_Unpack(b->packed, (int)s->packed, &pos, b->typed, s->count, s->type, MPI_COMM_WORLD),
                  "MPI_Unpack");
        break;
    case OP_MEMCPY:
        check(cu.cuMemcpyDtoDAsync(b->dst, b->src, (size_t)s->packed, NULL), "cuMemcpyDtoDAsync");
        check(cu.cuStreamSynchronize(NULL), "cuStreamSynchronize");
        break;
    case OP_MEMCPY2D: {
        memcpy2d_args a;
        memset(&a, 0, sizeof a);
        a.srcMemoryType = a.dstMemoryType = MEMORYTYPE_DEVICE;
        a.srcDevice = (CUdeviceptr)(uintptr_t)(b->typed + s->lo);
        a.srcPitch = STRIDE;
        a.dstDevice = b->dst; /* not b->packed: MPI_Unpack writes that back into the typed buffer */
        a.dstPitch = (size_t)s->block;
        a.WidthInBytes = (size_t)s->block;
        a.Height = (size_t)(s->numblocks * s->count);
        check(cu.cuMemcpy2DAsync(&a, NULL), "cuMemcpy2DAsync");
        check(cu.cuStreamSynchronize(NULL), "cuStreamSynchronize");
        break;
    }
    }
    return now_ns() - t0;
}

static void usage(void)
{
    fprintf(stderr, "usage: bench_device_pack [-q] [-t TARGET_MS] [-n MIN_CALLS] [-m MAX_EXTENT_MIB] "
                    "[-f SUBSTRING] [-l]\n");
}

int main(int argc, char **argv)
{
    double target_ms = 150;
    int min_calls = 30, list_only = 0, opt;
    long long max_extent_mib = 4608;
    const char *filter = NULL;
    while ((opt = getopt(argc, argv, "qt:n:m:f:l")) != -1) {
        switch (opt) {
        case 'q': target_ms = 20; min_calls = 10; break;
        case 't': target_ms = atof(optarg); break;
        case 'n': min_calls = atoi(optarg); break;
        case 'm': max_extent_mib = atoll(optarg); break;
        case 'f': filter = optarg; break;
        case 'l': list_only = 1; break;
        default: usage(); return 2;
        }
    }
    if (target_ms <= 0 || min_calls < 1 || max_extent_mib < 1) {
        usage();
        return 2;
    }
    MPI_Init(&argc, &argv);
    int nranks;
    MPI_Comm_size(MPI_COMM_WORLD, &nranks);
    if (nranks != 1) {
        fprintf(stderr, "bench_device_pack: run on one rank (got %d)\n", nranks);
        PMPI_Abort(MPI_COMM_WORLD, 2);
    }
    commlib_stat = (stat_fn)dlsym(RTLD_DEFAULT, "commlib_stat");
    char device[256] = "none";
    int sms = 0;
    int have_cuda = cuda_open(device, sizeof device, &sms);
    if (!have_cuda && !list_only) {
        printf("# no CUDA device: nothing measured\n");
        MPI_Finalize();
        return 77;
    }
    long long max_span = max_extent_mib << 20;
    if (have_cuda) {
        size_t free_bytes = 0, total_bytes = 0;
        cu.cuMemGetInfo(&free_bytes, &total_bytes);
        long long room = (long long)free_bytes - (256LL << 20); /* packed buffers, the driver */
        if (room < max_span) max_span = room;
    }
    char version[MPI_MAX_LIBRARY_VERSION_STRING];
    int vlen = 0;
    PMPI_Get_library_version(version, &vlen);
    for (char *p = version; *p; p++)
        if (*p == '\n' || *p == '\r') *p = ' ';
    printf("# mpi_library=%.200s\n# device=%s\n# sm_count=%d\n# commlib_stat=%s\n# target_ms=%g\n# min_calls=%d\n",
           version, device, sms, commlib_stat ? "available" : "unavailable", target_ms, min_calls);

    static const long long targets[] = {1 << 10, 1 << 20, 4 << 20};
    static const int blocks[] = {1, 2, 4, 8, 32, 64, 128, 256, 512};
    static const char *const kinds[] = {"vector", "hvector", "subarray"};
    for (int t = 0; t < 3; t++)
        for (int count = 1; count <= 2; count++)
            for (int k = 0; k < 3; k++)
                for (int b = 0; b < 9; b++) add_shape(kinds[k], targets[t], blocks[b], count, filter, max_span);
    if (list_only) {
        for (int i = 0; i < n_shapes; i++) printf("%s\n", shapes[i].name);
        MPI_Finalize();
        return 0;
    }

    /* One typed buffer for every shape, with a pattern in which misplaced bytes show. */
    long long span = 0, packed = 0;
    for (int i = 0; i < n_shapes; i++) {
        if (shapes[i].span > span) span = shapes[i].span;
        if (shapes[i].packed > packed) packed = shapes[i].packed;
    }
    size_t words = (size_t)(span + 7) / 8;
    uint64_t *host_typed = malloc(words * 8 + 8);
    unsigned char *host_ref = malloc((size_t)packed + SLACK), *host_got = malloc((size_t)packed + SLACK);
    if (!host_typed || !host_ref || !host_got) {
        fprintf(stderr, "bench_device_pack: cannot allocate %lld bytes of host memory\n", span + 2 * packed);
        PMPI_Abort(MPI_COMM_WORLD, 2);
    }
    for (size_t i = 0; i < words; i++) { /* splitmix64 */
        uint64_t z = (i + 1) * 0x9e3779b97f4a7c15ull;
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        host_typed[i] = z ^ (z >> 31);
    }
    CUdeviceptr typed_d, packed_d, src_d, dst_d;
    /* + STRIDE: with count 2 the copy engine's rows run past the second element */
    check(cu.cuMemAlloc(&typed_d, words * 8 + STRIDE), "cuMemAlloc (typed)");
    check(cu.cuMemAlloc(&packed_d, (size_t)packed + SLACK), "cuMemAlloc (packed)");
    check(cu.cuMemAlloc(&src_d, (size_t)packed), "cuMemAlloc (memcpy source)");
    check(cu.cuMemAlloc(&dst_d, (size_t)packed), "cuMemAlloc (memcpy destination)");
    check(cu.cuMemcpyHtoD(typed_d, host_typed, words * 8), "cuMemcpyHtoD");
    check(cu.cuMemcpyHtoD(src_d, host_typed, (size_t)packed), "cuMemcpyHtoD");

    printf("name,kind,count,target_bytes,block_bytes,stride_bytes,packed_bytes,extent_bytes,calls,");
    for (int op = 0; op < N_OPS; op++) printf("%s_ns,%s_min_ns,", op_names[op], op_names[op]);
    printf("stat_fast,stat_fallback,identical\n");
    fflush(stdout);

    int mismatches = 0;
    double *times[N_OPS];
    int cap = 1 << 16;
    for (int op = 0; op < N_OPS; op++) times[op] = malloc(sizeof(double) * (size_t)cap);
    for (int i = 0; i < n_shapes; i++) {
        const struct shape *s = &shapes[i];
        struct buffers b = {(char *)(uintptr_t)typed_d - s->lo, (char *)(uintptr_t)packed_d, src_d, dst_d};

        /* Check first (also warms up: the type's plan, the kernels' first load). */
        memset(host_got, 0xa5, (size_t)s->packed + SLACK);
        check(cu.cuMemcpyHtoD(packed_d, host_got, (size_t)s->packed + SLACK), "cuMemcpyHtoD");
        int pos_ref = 0;
        check_mpi(PMPI_Pack((char *)host_typed - s->lo, s->count, s->type, host_ref, (int)s->packed, &pos_ref,
                            MPI_COMM_WORLD), "PMPI_Pack");
        run_op(OP_PACK, s, &b);
        check(cu.cuMemcpyDtoH(host_got, packed_d, (size_t)s->packed + SLACK), "cuMemcpyDtoH");
        int identical = pos_ref == s->packed && !memcmp(host_got, host_ref, (size_t)s->packed);
        for (int j = 0; j < SLACK; j++) identical &= host_got[s->packed + j] == 0xa5;
        if (!identical) {
            mismatches++;
            printf("# MISMATCH %s: MPI_Pack of device memory differs from PMPI_Pack of a host copy\n", s->name);
        }

        /* Calls of each: enough for about target_ms in all, at least min_calls. */
        double one = 0;
        for (int op = 0; op < N_OPS; op++) one += run_op(op, s, &b);
        int calls = (int)(target_ms * 1e6 / (one > 1 ? one : 1));
        if (calls < min_calls) calls = min_calls;
        if (calls > cap) calls = cap;
        long long fast0 = stat_value("pack.fast"), fallback0 = stat_value("pack.fallback");
        for (int c = 0; c < calls; c++)
            for (int k = 0; k < N_OPS; k++) { /* a rotating order: no op always runs first */
                int op = (k + c) % N_OPS;
                times[op][c] = run_op(op, s, &b);
            }
        long long fast1 = stat_value("pack.fast"), fallback1 = stat_value("pack.fallback");
        printf("%s,%s,%d,%lld,%lld,%d,%lld,%lld,%d,", s->name, s->kind, s->count, s->target, s->block, STRIDE,
               s->packed, s->span, calls);
        for (int op = 0; op < N_OPS; op++) {
            double lo = times[op][0];
            for (int c = 1; c < calls; c++)
                if (times[op][c] < lo) lo = times[op][c];
            printf("%.1f,%.1f,", median(times[op], calls), lo);
        }
        printf("%lld,%lld,%s\n", fast0 >= 0 ? fast1 - fast0 : -1, fallback0 >= 0 ? fallback1 - fallback0 : -1,
               identical ? "ok" : "MISMATCH");
        fflush(stdout);
    }
    for (int i = 0; i < n_shapes; i++) MPI_Type_free(&shapes[i].type);
    cu.cuMemFree(typed_d);
    cu.cuMemFree(packed_d);
    cu.cuMemFree(src_d);
    cu.cuMemFree(dst_d);
    MPI_Finalize();
    return mismatches ? 1 : 0;
}
