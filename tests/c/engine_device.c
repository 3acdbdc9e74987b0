/* The collective engine on device buffers (native/engine/device.c): every kind of
 * operation, whole and partitioned, with device inputs and outputs allocated to exactly
 * their size, against values computed on the host.
 *
 *   engine_device [mpi]      (under `commlib run`: the engine's functions come from the
 *                             preloaded library; `mpi` is only a label, the transport is
 *                             chosen with COMMLIB_ENGINE_TRANSPORT)
 *
 * Runs against a real GPU or the stand-in driver of CI (tests/c/fake_cuda.c, whose device
 * memory the CPU cannot touch and whose copies fail past their allocation).  Lines "FAIL"
 * say what differs; "engine_device: checks=N failures=0" ends a good run. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_loader.h"

static int rank, size, failures, checks;

#define CHECK(cond, ...)                                                 \
    do {                                                                 \
        checks++;                                                        \
        if (!(cond)) {                                                   \
            failures++;                                                  \
            printf("FAIL rank %d line %d: ", rank, __LINE__);            \
            printf(__VA_ARGS__);                                         \
            printf("\n");                                                \
            fflush(stdout);                                              \
        }                                                                \
    } while (0)

static struct {
    int (*comm_create)(int64_t, void **, char *, size_t);
    void (*comm_free)(void *);
    int (*start)(void *, int, int, int, const void *, void *, int64_t, const int64_t *, int, int, int, int64_t, void *,
                 int, int64_t, void **, char *, size_t);
    int (*ready)(void *, int, int);
    int (*wait)(void *, int, int64_t);
    int (*status)(void *, char *, size_t, int *);
    int (*stream_wait)(void *, void *);
    void (*op_free)(void *);
} e;

enum { ALLREDUCE, REDUCE_SCATTER, ALLGATHER, BROADCAST, ALLTOALL, SEND, RECV, BARRIER };
enum { F32 = 2, F64 = 3, I32 = 6 };
enum { SUM = 0, AVG = 1, MAX = 3 };

static void *comm;

static double *device_doubles(const double *host, int64_t n)
{
    CUdeviceptr d = 0;
    if (cu.cuMemAlloc(&d, (size_t)(n ? n : 1) * sizeof(double))) {
        printf("FAIL: cuMemAlloc\n");
        exit(1);
    }
    if (n && host) cu.cuMemcpyHtoD(d, host, (size_t)n * sizeof(double));
    return (double *)(uintptr_t)d;
}

static void to_host(double *host, const double *device, int64_t n)
{
    if (n) cu.cuMemcpyDtoH(host, (CUdeviceptr)(uintptr_t)device, (size_t)n * sizeof(double));
}

/* Runs one operation to its end; returns its status. */
static int run(int kind, int op, const void *send, void *recv, int64_t count, const int64_t *counts, int root,
               int parts, int64_t unit, int ready_backwards)
{
    void *o = NULL;
    char err[256];
    int rc = e.start(comm, kind, F64, op, send, recv, count, counts, root, 0, parts, unit, NULL, parts > 1 ? 2 : 0, 0, &o, err, sizeof err);
    CHECK(rc == 0, "start (kind %d): %s", kind, err);
    if (rc) return rc;
    for (int i = 0; parts > 1 && i < parts; i++) {
        int p = ready_backwards ? parts - 1 - i : i;
        e.ready(o, p, p + 1);
    }
    e.wait(o, -1, -1);
    rc = e.status(o, err, sizeof err, NULL);
    CHECK(rc == 0, "kind %d failed: %s", kind, err);
    CHECK(e.stream_wait(o, NULL) == 0, "stream_wait");
    e.op_free(o);
    return rc;
}

static double value(int r, int64_t i) { return (double)((r + 1) * 1000 + i % 997); }

static void allreduce(int64_t n, int parts, int in_place)
{
    double *h = calloc((size_t)n + 1, sizeof *h), *want = calloc((size_t)n + 1, sizeof *want);
    for (int64_t i = 0; i < n; i++) {
        h[i] = value(rank, i);
        want[i] = 0;
        for (int q = 0; q < size; q++) want[i] += value(q, i);
    }
    double *in = in_place ? NULL : device_doubles(h, n), *out = device_doubles(in_place ? h : NULL, n);
    run(ALLREDUCE, SUM, in, out, n, NULL, 0, parts, 1, 1);
    to_host(h, out, n);
    int64_t bad = -1;
    for (int64_t i = 0; i < n && bad < 0; i++)
        if (h[i] != want[i]) bad = i;
    CHECK(bad < 0, "all_reduce n=%lld parts=%d in_place=%d: element %lld is %g, want %g", (long long)n, parts, in_place,
          (long long)bad, bad >= 0 ? h[bad] : 0, bad >= 0 ? want[bad] : 0);
    free(h);
    free(want);
}

static void shares(int64_t per_rank_base, int64_t *counts, int64_t *displs, int64_t *total)
{
    *total = 0;
    for (int q = 0; q < size; q++) {
        counts[q] = per_rank_base + q; /* unequal shares */
        displs[q] = *total;
        *total += counts[q];
    }
}

static void reduce_scatter(int64_t base, int parts)
{
    int64_t counts[64] = {0}, displs[64] = {0}, total = 0;
    shares(base, counts, displs, &total);
    double *h = malloc((size_t)(total + 1) * sizeof *h), *got = malloc((size_t)(counts[rank] + 1) * sizeof *got);
    for (int64_t i = 0; i < total; i++) h[i] = value(rank, i);
    double *in = device_doubles(h, total), *out = device_doubles(NULL, counts[rank]);
    run(REDUCE_SCATTER, SUM, in, out, 0, counts, 0, parts, 1, 0);
    to_host(got, out, counts[rank]);
    int64_t bad = -1;
    for (int64_t i = 0; i < counts[rank] && bad < 0; i++) {
        double want = 0;
        for (int q = 0; q < size; q++) want += value(q, displs[rank] + i);
        if (got[i] != want) bad = i;
    }
    CHECK(bad < 0, "reduce_scatter base=%lld parts=%d: element %lld wrong", (long long)base, parts, (long long)bad);
    free(h);
    free(got);
}

static void allgather(int64_t base, int parts)
{
    int64_t counts[64] = {0}, displs[64] = {0}, total = 0;
    shares(base, counts, displs, &total);
    double *h = malloc((size_t)(counts[rank] + 1) * sizeof *h), *got = malloc((size_t)(total + 1) * sizeof *got);
    for (int64_t i = 0; i < counts[rank]; i++) h[i] = value(rank, i);
    double *in = device_doubles(h, counts[rank]), *out = device_doubles(NULL, total);
    run(ALLGATHER, SUM, in, out, 0, counts, 0, parts, 1, 0);
    to_host(got, out, total);
    int64_t bad = -1;
    for (int q = 0; q < size && bad < 0; q++)
        for (int64_t i = 0; i < counts[q] && bad < 0; i++)
            if (got[displs[q] + i] != value(q, i)) bad = displs[q] + i;
    CHECK(bad < 0, "all_gather base=%lld parts=%d: element %lld wrong", (long long)base, parts, (long long)bad);
    free(h);
    free(got);
}

static void broadcast(int64_t n, int root)
{
    double *h = malloc((size_t)(n + 1) * sizeof *h);
    for (int64_t i = 0; i < n; i++) h[i] = rank == root ? value(root, i) : -1;
    double *buf = device_doubles(h, n);
    run(BROADCAST, SUM, NULL, buf, n, NULL, root, 1, 1, 0);
    to_host(h, buf, n);
    int64_t bad = -1;
    for (int64_t i = 0; i < n && bad < 0; i++)
        if (h[i] != value(root, i)) bad = i;
    CHECK(bad < 0, "broadcast n=%lld root=%d: element %lld wrong", (long long)n, root, (long long)bad);
    free(h);
}

static void alltoall(int64_t block)
{
    int64_t counts[64], total = block * size;
    for (int q = 0; q < size; q++) counts[q] = block;
    double *h = malloc((size_t)(total + 1) * sizeof *h);
    for (int64_t i = 0; i < total; i++) h[i] = value(rank, i);
    double *in = device_doubles(h, total), *out = device_doubles(NULL, total);
    run(ALLTOALL, SUM, in, out, 0, counts, 0, 1, 1, 0);
    to_host(h, out, total);
    int64_t bad = -1;
    for (int q = 0; q < size && bad < 0; q++) /* from q: its block `rank` */
        for (int64_t i = 0; i < block && bad < 0; i++)
            if (h[q * block + i] != value(q, rank * block + i)) bad = q * block + i;
    CHECK(bad < 0, "all_to_all block=%lld: element %lld wrong", (long long)block, (long long)bad);
    free(h);
}

static void point_to_point(int64_t n)
{
    if (size < 2) return;
    double *h = malloc((size_t)(n + 1) * sizeof *h);
    for (int64_t i = 0; i < n; i++) h[i] = value(rank, i);
    double *buf = device_doubles(h, n);
    if (rank == 0) run(SEND, SUM, buf, NULL, n, NULL, 1, 1, 1, 0);
    if (rank == 1) {
        run(RECV, SUM, NULL, buf, n, NULL, 0, 1, 1, 0);
        to_host(h, buf, n);
        int64_t bad = -1;
        for (int64_t i = 0; i < n && bad < 0; i++)
            if (h[i] != value(0, i)) bad = i;
        CHECK(bad < 0, "send/recv n=%lld: element %lld wrong", (long long)n, (long long)bad);
    }
    free(h);
}

int main(int argc, char **argv)
{
    int provided;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    (void)argv;
#define SYM(field, name) *(void **)&e.field = dlsym(RTLD_DEFAULT, name);
    SYM(comm_create, "commlib_engine_comm_create") SYM(comm_free, "commlib_engine_comm_free")
    SYM(start, "commlib_engine_start") SYM(ready, "commlib_engine_ready") SYM(wait, "commlib_engine_wait")
    SYM(status, "commlib_engine_status") SYM(stream_wait, "commlib_engine_stream_wait")
    SYM(op_free, "commlib_engine_op_free")
#undef SYM
    if (!e.comm_create || !e.start) {
        if (rank == 0) printf("FAIL: run under commlib run (the engine's functions are not loaded)\n");
        MPI_Finalize();
        return 1;
    }
    if (!cuda_load(rank, NULL, 0)) {
        if (rank == 0) printf("FAIL: no CUDA driver\n");
        MPI_Finalize();
        return 1;
    }
    char err[256];
    if (e.comm_create(MPI_Comm_c2f(MPI_COMM_WORLD), &comm, err, sizeof err)) {
        printf("FAIL: comm_create: %s\n", err);
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    int64_t sizes[] = {0, 1, 7, 1000, 100003, 1 << 18};
    for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++) {
        allreduce(sizes[i], 1, 0);
        allreduce(sizes[i], 1, 1);
        broadcast(sizes[i], (int)(i % (size_t)size));
        point_to_point(sizes[i]);
    }
    allreduce(100003, 4, 0);
    allreduce(1 << 18, 8, 1);
    for (int64_t base = 0; base < 20000; base = base * 10 + 3) {
        reduce_scatter(base, 1);
        allgather(base, 1);
        alltoall(base);
    }
    reduce_scatter(30000, 3);
    allgather(30000, 5);
    e.comm_free(comm);
    int total = 0;
    MPI_Allreduce(&failures, &total, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    if (rank == 0) printf("engine_device: checks=%d failures=%d\n", checks, total);
    MPI_Finalize();
    return total ? 1 : 0;
}
