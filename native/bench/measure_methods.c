/* The measuring program behind `commlib measure` (commlib/measure.py), built at install
 * time into commlib/_bin.  Runs under mpiexec with libcommlib.so preloaded.
 *
 *   measure_methods --method M [--sizes 1024,4096,...] [--budget-ms MS]
 *       Two ranks; COMMLIB_METHOD=M (set by the caller) forces the method.  Rank 0 holds
 *       device memory, rank 1 host memory, so only rank 0's side goes through commlib's
 *       staging.  For each layout (contig: MPI_BYTE; derived: 256-byte blocks at a
 *       512-byte stride), size and direction, rank 0 times a round trip of one message
 *       of that size and a 1-byte host message (median over the iterations that fit the
 *       time budget) and prints "DIRECTION M LAYOUT BYTES MICROSECONDS".  Then
 *       "# counts=..." with commlib's method counters, so the caller can check that M
 *       really ran (an aware run over an MPI that is not CUDA-aware falls back).
 *   measure_methods --probe
 *       One rank: "# model=JSON" with commlib_model_json() (CUDA-awareness, the GPU and
 *       MPI as the library names them, the model in effect) after creating a context on
 *       the first GPU, if there is one.
 *
 * Lines starting "# skipped=" say why nothing was measured (no GPU, no commlib).  The
 * CUDA driver comes from dlopen: no CUDA at build time. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int CUresult;
typedef unsigned long long CUdeviceptr;
typedef void *CUcontext;

static struct {
    CUresult (*cuInit)(unsigned);
    CUresult (*cuDeviceGetCount)(int *);
    CUresult (*cuDeviceGet)(int *, int);
    CUresult (*cuDevicePrimaryCtxRetain)(CUcontext *, int);
    CUresult (*cuCtxSetCurrent)(CUcontext);
    CUresult (*cuMemAlloc)(CUdeviceptr *, size_t);
    CUresult (*cuMemFree)(CUdeviceptr);
} cu;

/* 1 with a context current on the first device. */
static int load_cuda(void)
{
    void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL);
    if (!lib) return 0;
#define SYM(field, name) \
    if (!(*(void **)&cu.field = dlsym(lib, name))) return 0;
    SYM(cuInit, "cuInit") SYM(cuDeviceGetCount, "cuDeviceGetCount") SYM(cuDeviceGet, "cuDeviceGet")
    SYM(cuDevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain") SYM(cuCtxSetCurrent, "cuCtxSetCurrent")
    SYM(cuMemAlloc, "cuMemAlloc_v2") SYM(cuMemFree, "cuMemFree_v2")
#undef SYM
    int count = 0, device;
    CUcontext context;
    return !cu.cuInit(0) && !cu.cuDeviceGetCount(&count) && count > 0 && !cu.cuDeviceGet(&device, 0) &&
           !cu.cuDevicePrimaryCtxRetain(&context, device) && !cu.cuCtxSetCurrent(context);
}

static int probe(void)
{
    size_t (*model_json)(char *, size_t) = (size_t (*)(char *, size_t))dlsym(RTLD_DEFAULT, "commlib_model_json");
    if (!model_json) {
        printf("# skipped=commlib is not preloaded\n");
        return 0;
    }
    load_cuda();
    static char json[1 << 16];
    model_json(json, sizeof json);
    printf("# model=%s\n", json);
    return 0;
}

static int compare(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

enum { BLOCK = 256, STRIDE = 512 };

/* One timed round trip: rank 0 moves `bytes` between its device buffer (`type`, count
 * `count`) and rank 1's host buffer; a 1-byte host message goes the other way. */
static void round_trip(int rank, int receiving, void *device, int count, MPI_Datatype type, char *host, int bytes)
{
    char one = 0;
    if (rank == 0 && !receiving) {
        MPI_Send(device, count, type, 1, 1, MPI_COMM_WORLD);
        MPI_Recv(&one, 1, MPI_CHAR, 1, 2, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
    } else if (rank == 0) {
        MPI_Send(&one, 1, MPI_CHAR, 1, 2, MPI_COMM_WORLD);
        MPI_Recv(device, count, type, 1, 1, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
    } else if (!receiving) {
        MPI_Recv(host, bytes, MPI_BYTE, 0, 1, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        MPI_Send(&one, 1, MPI_CHAR, 0, 2, MPI_COMM_WORLD);
    } else {
        MPI_Recv(&one, 1, MPI_CHAR, 0, 2, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        MPI_Send(host, bytes, MPI_BYTE, 0, 1, MPI_COMM_WORLD);
    }
}

/* Median microseconds of a round trip on rank 0 (-1 on rank 1).  Three calibrating
 * rounds fix how many timed ones fit the budget (at least 3, at most 200). */
static double time_one(int rank, int receiving, void *device, int count, MPI_Datatype type, char *host, int bytes,
                       double budget_s)
{
    double start = MPI_Wtime();
    for (int i = 0; i < 3; i++) round_trip(rank, receiving, device, count, type, host, bytes);
    int iterations = 0;
    if (rank == 0) {
        double each = (MPI_Wtime() - start) / 3;
        iterations = each > 0 ? (int)(budget_s / each) : 200;
        iterations = iterations < 3 ? 3 : iterations > 200 ? 200 : iterations;
    }
    MPI_Bcast(&iterations, 1, MPI_INT, 0, MPI_COMM_WORLD);
    double *times = malloc((size_t)iterations * sizeof *times);
    for (int i = 0; i < iterations; i++) {
        double t0 = MPI_Wtime();
        round_trip(rank, receiving, device, count, type, host, bytes);
        times[i] = MPI_Wtime() - t0;
    }
    qsort(times, (size_t)iterations, sizeof *times, compare);
    double median = times[iterations / 2] * 1e6;
    free(times);
    return rank == 0 ? median : -1;
}

static int parse_sizes(const char *text, long long *sizes, int max)
{
    int n = 0;
    for (const char *p = text; *p && n < max;) {
        char *end;
        long long v = strtoll(p, &end, 10);
        if (end == p || v < BLOCK || v % BLOCK || v > (1ll << 30)) return -1;
        sizes[n++] = v;
        p = *end == ',' ? end + 1 : end;
        if (*end && *end != ',') return -1;
    }
    return n;
}

int main(int argc, char **argv)
{
    const char *method = NULL, *size_text = "1024,4096,16384,65536,262144,1048576,4194304,16777216,67108864";
    double budget_s = 0.02;
    int probing = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--probe")) probing = 1;
        else if (!strcmp(argv[i], "--method") && i + 1 < argc) method = argv[++i];
        else if (!strcmp(argv[i], "--sizes") && i + 1 < argc) size_text = argv[++i];
        else if (!strcmp(argv[i], "--budget-ms") && i + 1 < argc) budget_s = atof(argv[++i]) / 1e3;
        else {
            fprintf(stderr, "usage: %s --probe | --method M [--sizes B,B,...] [--budget-ms MS]\n", argv[0]);
            return 2;
        }
    }
    MPI_Init(&argc, &argv);
    int rank, nranks;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &nranks);
    if (probing) {
        int rc = rank == 0 ? probe() : 0;
        MPI_Finalize();
        return rc;
    }
    long long sizes[64];
    int nsizes = parse_sizes(size_text, sizes, 64);
    long long (*stat)(const char *) = (long long (*)(const char *))dlsym(RTLD_DEFAULT, "commlib_stat");
    int ready = rank != 0 || load_cuda(), all_ready = 0;
    MPI_Allreduce(&ready, &all_ready, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    const char *skip = nranks != 2 ? "needs exactly 2 ranks" : !method || nsizes < 1 ? "no method or bad --sizes"
                       : !stat ? "commlib is not preloaded" : !all_ready ? "no GPU" : NULL;
    if (skip) {
        if (rank == 0) printf("# skipped=%s\n", skip);
        MPI_Finalize();
        return 0;
    }
    long long largest = 0;
    for (int i = 0; i < nsizes; i++) largest = sizes[i] > largest ? sizes[i] : largest;
    void *device = NULL;
    char *host = NULL;
    CUdeviceptr d = 0;
    int ok = 1;
    if (rank == 0) ok = !cu.cuMemAlloc(&d, (size_t)largest * (STRIDE / BLOCK)), device = (void *)(uintptr_t)d;
    else ok = (host = calloc(1, (size_t)largest)) != NULL;
    int all_ok = 0;
    MPI_Allreduce(&ok, &all_ok, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    if (!all_ok) {
        if (rank == 0) printf("# skipped=cannot allocate %lld bytes\n", largest * 2);
        MPI_Finalize();
        return 1;
    }
    static const char *layouts[2] = {"contig", "derived"}, *directions[2] = {"send", "recv"};
    for (int derived = 0; derived < 2; derived++)
        for (int i = 0; i < nsizes; i++) {
            int bytes = (int)sizes[i], count = bytes;
            MPI_Datatype type = MPI_BYTE;
            if (derived) {
                MPI_Type_vector(bytes / BLOCK, BLOCK, STRIDE, MPI_BYTE, &type);
                MPI_Type_commit(&type);
                count = 1;
            }
            for (int receiving = 0; receiving < 2; receiving++) {
                double us = time_one(rank, receiving, device, count, type, host, bytes, budget_s);
                if (rank == 0) printf("%s %s %s %d %.3f\n", directions[receiving], method, layouts[derived], bytes, us);
                fflush(stdout);
            }
            if (derived) MPI_Type_free(&type);
        }
    if (rank == 0) {
        printf("# counts=");
        static const char *names[6] = {"send_oneshot", "send_device", "send_aware", "recv_oneshot", "recv_device", "recv_aware"};
        for (int i = 0; i < 6; i++) {
            char name[64];
            snprintf(name, sizeof name, "method.%s", names[i]);
            printf("%s%s:%lld", i ? "," : "", names[i], stat(name));
        }
        printf("\n");
        cu.cuMemFree(d);
    }
    free(host);
    MPI_Finalize();
    return 0;
}
