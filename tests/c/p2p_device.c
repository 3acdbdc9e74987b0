/* Device buffers over an MPI that is not CUDA-aware: point-to-point between device
 * memory, and device <-> host and managed <-> device mixes, with contiguous, vector,
 * subarray, struct and an irregular (holey) type that commlib leaves to the host MPI
 * (the typed span copy).  Blocking, nonblocking (with a plain host request in the same
 * MPI_Waitall), Sendrecv, a short message and one ending inside an element,
 * MPI_Request_free of a device send and MPI_Cancel of a device receive.  The method
 * (COMMLIB_METHOD, the model) is the caller's to set; "stats:" shows which ran.
 *
 * The CUDA driver comes from dlopen("libcuda.so.1"): no CUDA headers or libraries at
 * build time.  Every received buffer is copied back to the host and compared with what
 * the host MPI makes of the message (PMPI_Pack + PMPI_Unpack on host copies).  Needs
 * commlib preloaded (the host MPI alone would be handed device pointers) and an even
 * number of ranks; all ranks may share one GPU.  Prints "p2p_device: skipped ..." and
 * exits 0 without a GPU, "stats: ..." with commlib's counters, exit status 1 on failure. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <mpi.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_loader.h"

static int rank, partner, failures, line_no;
static FILE *log_out; /* stdout, or one file per rank (argv[1] PREFIX: PREFIX.RANK) */

#define CHECK(cond, ...)                                                 \
    do {                                                                 \
        if (!(cond)) {                                                   \
            fprintf(log_out, "rank %d: FAIL (line %d): ", rank, __LINE__);         \
            fprintf(log_out, __VA_ARGS__);                                         \
            fprintf(log_out, "\n");                                                \
            failures++;                                                  \
        }                                                                \
    } while (0)
#define CU(call) CHECK((call) == 0, "%s failed", #call)

/* 0 without a usable GPU. */
static int load_cuda(void) { return cuda_load(rank, NULL, 0); }

/* Buffers of three kinds; the test only reads and writes them through these. */
enum kind { HOST, DEVICE, MANAGED };
static const char *kind_name[3] = {"host", "device", "managed"};

static void *alloc(enum kind k, size_t bytes)
{
    if (k == HOST) return malloc(bytes);
    CUdeviceptr p = 0;
    if (k == DEVICE) CU(cu.cuMemAlloc(&p, bytes));
    else CU(cu.cuMemAllocManaged(&p, bytes, CU_MEM_ATTACH_GLOBAL));
    return (void *)(uintptr_t)p;
}

static void release(enum kind k, void *p)
{
    if (k == HOST) free(p);
    else CU(cu.cuMemFree((CUdeviceptr)(uintptr_t)p));
}

static void put(enum kind k, void *dst, const void *src, size_t n)
{
    if (k == HOST) memcpy(dst, src, n);
    else CU(cu.cuMemcpyHtoD((CUdeviceptr)(uintptr_t)dst, src, n));
}

static void get(enum kind k, void *dst, const void *src, size_t n)
{
    if (k == HOST) memcpy(dst, src, n);
    else CU(cu.cuMemcpyDtoH(dst, (CUdeviceptr)(uintptr_t)src, n));
}

struct item {
    int a;
    double b[2];
    char c;
};

enum { T_CONTIG, T_VECTOR, T_SUBARRAY, T_STRUCT, T_HOLEY, NTYPES };
static struct tcase {
    const char *name;
    MPI_Datatype type;
    int count;
    size_t bytes; /* buffer: 10 elements (40 for contig) */
} types[NTYPES];

static void make_types(void)
{
    MPI_Datatype vector, subarray, item, item_resized, holey;
    MPI_Type_vector(8, 3, 5, MPI_DOUBLE, &vector);
    int sizes[3] = {6, 5, 4}, subsizes[3] = {3, 2, 2}, starts[3] = {1, 2, 1};
    MPI_Type_create_subarray(3, sizes, subsizes, starts, MPI_ORDER_C, MPI_INT, &subarray);
    int blocks[3] = {1, 2, 1};
    MPI_Aint displs[3] = {offsetof(struct item, a), offsetof(struct item, b), offsetof(struct item, c)};
    MPI_Datatype members[3] = {MPI_INT, MPI_DOUBLE, MPI_CHAR};
    MPI_Type_create_struct(3, blocks, displs, members, &item);
    MPI_Type_create_resized(item, 0, sizeof(struct item), &item_resized);
    MPI_Type_free(&item);
    int lengths[3] = {2, 0, 3}, offsets[3] = {0, 4, 7};
    MPI_Type_indexed(3, lengths, offsets, MPI_INT, &holey);
    struct tcase all[NTYPES] = {{"contig", MPI_DOUBLE, 40, 0}, {"vector", vector, 3, 0}, {"subarray", subarray, 2, 0},
                                {"struct", item_resized, 5, 0}, {"holey", holey, 3, 0}};
    for (int t = 0; t < NTYPES; t++) {
        if (t != T_CONTIG) MPI_Type_commit(&all[t].type);
        MPI_Aint lb, extent;
        MPI_Type_get_extent(all[t].type, &lb, &extent);
        all[t].bytes = (size_t)((t == T_CONTIG ? 40 : 10) * extent + 16);
        types[t] = all[t];
    }
}

static char *pattern(size_t bytes, int seed)
{
    unsigned char *p = malloc(bytes);
    for (size_t i = 0; i < bytes; i++) p[i] = (unsigned char)(seed * 37 + i * 11 + 1);
    return (char *)p;
}

static char *sentinel(size_t bytes)
{
    char *p = malloc(bytes);
    memset(p, 0xEE, bytes);
    return p;
}

/* A buffer of kind k holding the pattern of seed (or the sentinel when seed < 0). */
static void *filled(enum kind k, int t, int seed)
{
    char *host = seed < 0 ? sentinel(types[t].bytes) : pattern(types[t].bytes, seed);
    void *p = alloc(k, types[t].bytes);
    put(k, p, host, types[t].bytes);
    free(host);
    return p;
}

/* Host MPI's result of `count` elements of type st (pattern of seed) received as rt into
 * a buffer holding the sentinel (base_seed < 0) or the pattern of base_seed. */
static char *expected_over(int st, int count, int rt, int seed, int base_seed)
{
    char *src = pattern(types[st].bytes, seed);
    char *out = base_seed < 0 ? sentinel(types[rt].bytes) : pattern(types[rt].bytes, base_seed);
    int size, position = 0, back = 0, rsize;
    PMPI_Pack_size(count, types[st].type, MPI_COMM_WORLD, &size);
    char *packed = malloc((size_t)size + 1);
    PMPI_Pack(src, count, types[st].type, packed, size, &position, MPI_COMM_WORLD);
    PMPI_Type_size(types[rt].type, &rsize);
    PMPI_Unpack(packed, position, &back, out, position / rsize, types[rt].type, MPI_COMM_WORLD);
    free(src);
    free(packed);
    return out;
}

static char *expected(int st, int count, int rt, int seed) { return expected_over(st, count, rt, seed, -1); }

static void verify(const char *what, enum kind k, int rt, const void *buf, int st, int count, int seed,
                   const MPI_Status *status)
{
    char *got = malloc(types[rt].bytes), *want = expected(st, count, rt, seed);
    get(k, got, buf, types[rt].bytes);
    CHECK(!memcmp(got, want, types[rt].bytes), "%s %s %s: received data differs", what, kind_name[k], types[rt].name);
    int n = -1, st_size, rt_size;
    if (status) {
        MPI_Get_count(status, types[rt].type, &n);
        MPI_Type_size(types[st].type, &st_size);
        MPI_Type_size(types[rt].type, &rt_size);
        CHECK(n == count * st_size / rt_size, "%s %s: MPI_Get_count %d", what, types[rt].name, n);
        CHECK(status->MPI_SOURCE == partner, "%s: source %d", what, status->MPI_SOURCE);
    }
    fprintf(log_out, "rank %d: %03d %s into %s %s: ok=%d count=%d\n", rank, line_no++, what, kind_name[k], types[rt].name,
           !memcmp(got, want, types[rt].bytes), n);
    free(got);
    free(want);
}

static const enum kind mixes[][2] = {{DEVICE, DEVICE}, {DEVICE, HOST}, {HOST, DEVICE}, {MANAGED, DEVICE},
                                     {DEVICE, MANAGED}};
#define NMIXES (int)(sizeof mixes / sizeof mixes[0])

/* Blocking, then nonblocking (MPI_Waitall with an MPI_Ibarrier request and a null). */
static void test_exchanges(void)
{
    for (int mix = 0; mix < NMIXES; mix++)
        for (int t = 0; t < NTYPES; t++)
            for (int blocking = 0; blocking < 2; blocking++)
                for (int direction = 0; direction < 2; direction++) {
                    int test = 100 * mix + 10 * t + 2 * blocking + direction, tag = test;
                    int sends = rank % 2 == direction;
                    enum kind k = mixes[mix][sends ? 0 : 1];
                    void *buf = filled(k, t, sends ? rank * 1000 + test : -1);
                    MPI_Status status;
                    if (blocking) {
                        if (sends) MPI_Send(buf, types[t].count, types[t].type, partner, tag, MPI_COMM_WORLD);
                        else MPI_Recv(buf, types[t].count, types[t].type, partner, tag, MPI_COMM_WORLD, &status);
                    } else {
                        MPI_Request reqs[3] = {MPI_REQUEST_NULL};
                        MPI_Status statuses[3];
                        MPI_Ibarrier(MPI_COMM_WORLD, &reqs[1]);
                        if (sends) MPI_Isend(buf, types[t].count, types[t].type, partner, tag, MPI_COMM_WORLD, &reqs[2]);
                        else MPI_Irecv(buf, types[t].count, types[t].type, partner, tag, MPI_COMM_WORLD, &reqs[2]);
                        CHECK(MPI_Waitall(3, reqs, statuses) == MPI_SUCCESS, "waitall");
                        status = statuses[2];
                    }
                    if (!sends)
                        verify(blocking ? "recv" : "irecv", k, t, buf, t, types[t].count, partner * 1000 + test,
                               &status);
                    release(k, buf);
                }
}

/* Sendrecv device to device with different types of one signature; a short message and
 * one ending inside an element into device memory; MPI_Request_free on a device send;
 * MPI_Cancel of a device receive. */
static void test_more(void)
{
    void *out = filled(DEVICE, T_VECTOR, rank * 1000 + 900), *in = filled(DEVICE, T_CONTIG, -1);
    MPI_Status status;
    MPI_Sendrecv(out, 1, types[T_VECTOR].type, partner, 900, in, 24, MPI_DOUBLE, partner, 900, MPI_COMM_WORLD, &status);
    verify("sendrecv", DEVICE, T_CONTIG, in, T_VECTOR, 1, partner * 1000 + 900, &status);
    release(DEVICE, out);
    release(DEVICE, in);

    /* replace: the holes of the vector keep this rank's own pattern */
    void *both = filled(DEVICE, T_VECTOR, rank * 1000 + 905);
    MPI_Sendrecv_replace(both, 3, types[T_VECTOR].type, partner, 905, partner, 905, MPI_COMM_WORLD, &status);
    char *got = malloc(types[T_VECTOR].bytes);
    char *want = expected_over(T_VECTOR, 3, T_VECTOR, partner * 1000 + 905, rank * 1000 + 905);
    get(DEVICE, got, both, types[T_VECTOR].bytes);
    CHECK(!memcmp(got, want, types[T_VECTOR].bytes), "sendrecv_replace on device: data differs");
    fprintf(log_out, "rank %d: %03d sendrecv-replace device: ok=%d\n", rank, line_no++,
            !memcmp(got, want, types[T_VECTOR].bytes));
    release(DEVICE, both);
    free(got);
    free(want);

    /* contiguous replace: each side may take its own method (one may be handed to a
     * CUDA-aware MPI as it is while the other is staged) */
    both = filled(DEVICE, T_CONTIG, rank * 1000 + 907);
    MPI_Sendrecv_replace(both, 40, MPI_DOUBLE, partner, 907, partner, 907, MPI_COMM_WORLD, &status);
    got = malloc(types[T_CONTIG].bytes);
    want = expected_over(T_CONTIG, 40, T_CONTIG, partner * 1000 + 907, rank * 1000 + 907);
    get(DEVICE, got, both, types[T_CONTIG].bytes);
    CHECK(!memcmp(got, want, types[T_CONTIG].bytes), "contiguous sendrecv_replace on device: data differs");
    fprintf(log_out, "rank %d: %03d sendrecv-replace-contig device: ok=%d\n", rank, line_no++,
            !memcmp(got, want, types[T_CONTIG].bytes));
    release(DEVICE, both);
    free(got);
    free(want);

    for (int direction = 0; direction < 2; direction++) {
        int sends = rank % 2 == direction;
        void *buf = filled(DEVICE, T_VECTOR, sends ? rank * 1000 + 910 : -1);
        if (sends) {
            MPI_Send(buf, 4, types[T_VECTOR].type, partner, 910, MPI_COMM_WORLD);
        } else {
            MPI_Recv(buf, 10, types[T_VECTOR].type, partner, 910, MPI_COMM_WORLD, &status);
            verify("short", DEVICE, T_VECTOR, buf, T_VECTOR, 4, partner * 1000 + 910, &status);
        }
        release(DEVICE, buf);
    }

    for (int direction = 0; direction < 2; direction++) {
        int sends = rank % 2 == direction;
        if (sends) {
            void *buf = filled(DEVICE, T_CONTIG, rank * 1000 + 920);
            MPI_Send(buf, 30, MPI_DOUBLE, partner, 920, MPI_COMM_WORLD);
            release(DEVICE, buf);
            continue;
        }
        void *buf = filled(DEVICE, T_VECTOR, -1);
        char *got = malloc(types[T_VECTOR].bytes), *want = sentinel(types[T_VECTOR].bytes);
        char *sent = pattern(types[T_CONTIG].bytes, partner * 1000 + 920);
        for (int k = 0; k < 30; k++) memcpy(want + 8 * (k / 24 * 38 + k % 24 / 3 * 5 + k % 3), sent + 8 * k, 8);
        MPI_Recv(buf, 2, types[T_VECTOR].type, partner, 920, MPI_COMM_WORLD, &status);
        int n = 0, e = 0;
        MPI_Get_count(&status, types[T_VECTOR].type, &n);
        MPI_Get_elements(&status, types[T_VECTOR].type, &e);
        get(DEVICE, got, buf, types[T_VECTOR].bytes);
        CHECK(n == MPI_UNDEFINED && e == 30 && !memcmp(got, want, types[T_VECTOR].bytes),
              "partial element: count %d elements %d", n, e);
        fprintf(log_out, "rank %d: %03d partial-element into device: ok=%d\n", rank, line_no++,
               !memcmp(got, want, types[T_VECTOR].bytes));
        release(DEVICE, buf);
        free(got);
        free(want);
        free(sent);
    }

    for (int direction = 0; direction < 2; direction++) {
        int sends = rank % 2 == direction;
        void *buf = filled(DEVICE, T_SUBARRAY, sends ? rank * 1000 + 930 : -1);
        if (sends) {
            MPI_Request request;
            MPI_Isend(buf, 2, types[T_SUBARRAY].type, partner, 930, MPI_COMM_WORLD, &request);
            MPI_Request_free(&request);
            CHECK(request == MPI_REQUEST_NULL, "request_free");
            MPI_Recv(NULL, 0, MPI_BYTE, partner, 931, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        } else {
            MPI_Recv(buf, 2, types[T_SUBARRAY].type, partner, 930, MPI_COMM_WORLD, &status);
            verify("request-free-send", DEVICE, T_SUBARRAY, buf, T_SUBARRAY, 2, partner * 1000 + 930, &status);
            MPI_Send(NULL, 0, MPI_BYTE, partner, 931, MPI_COMM_WORLD);
        }
        release(DEVICE, buf);
    }

    void *buf = filled(DEVICE, T_VECTOR, -1);
    MPI_Request request;
    int cancelled = 0;
    MPI_Irecv(buf, 3, types[T_VECTOR].type, partner, 999, MPI_COMM_WORLD, &request);
    MPI_Cancel(&request);
    MPI_Wait(&request, &status);
    MPI_Test_cancelled(&status, &cancelled);
    char *after = malloc(types[T_VECTOR].bytes), *untouched = sentinel(types[T_VECTOR].bytes);
    get(DEVICE, after, buf, types[T_VECTOR].bytes);
    CHECK(cancelled && !memcmp(after, untouched, types[T_VECTOR].bytes), "cancel: cancelled=%d", cancelled);
    fprintf(log_out, "rank %d: %03d cancel device receive: cancelled=%d\n", rank, line_no++, cancelled);
    release(DEVICE, buf);
    free(after);
    free(untouched);
}

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    int nranks, ready;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &nranks);
    log_out = stdout;
    if (argc > 1) {
        char path[4096];
        snprintf(path, sizeof path, "%s.%d", argv[1], rank);
        if (!(log_out = fopen(path, "w"))) MPI_Abort(MPI_COMM_WORLD, 3);
    }
    /* A host-only call just before the driver loads, and device memory in a call right
     * after: commlib must notice the load at once (tests/test_p2p_device.py). */
    char host_bytes[8] = "01234567", packed[8];
    int position = 0;
    MPI_Pack(host_bytes, 8, MPI_BYTE, packed, 8, &position, MPI_COMM_SELF);
    int have_gpu = load_cuda();
    if (have_gpu) {
        CUdeviceptr first;
        CU(cu.cuMemAlloc(&first, 8));
        CU(cu.cuMemcpyHtoD(first, "abcdefgh", 8));
        position = 0;
        CHECK(MPI_Pack((void *)(uintptr_t)first, 8, MPI_BYTE, packed, 8, &position, MPI_COMM_SELF) == MPI_SUCCESS &&
                  !memcmp(packed, "abcdefgh", 8),
              "MPI_Pack of device memory right after the driver loaded");
        CU(cu.cuMemFree(first));
    }
    MPI_Allreduce(&have_gpu, &ready, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    if (!ready || nranks % 2) {
        fprintf(log_out, "p2p_device: skipped (%s)\n", ready ? "needs an even number of ranks" : "no GPU");
        if (log_out != stdout) fclose(log_out);
        MPI_Finalize();
        return 0;
    }
    partner = rank ^ 1;
    make_types();
    test_exchanges();
    test_more();
    for (int t = 1; t < NTYPES; t++) MPI_Type_free(&types[t].type);
    long long (*stat)(const char *) = (long long (*)(const char *))dlsym(RTLD_DEFAULT, "commlib_stat");
    if (stat)
        fprintf(log_out,
                "stats: rank %d staged_send=%lld staged_recv=%lld staged_typed=%lld send_oneshot=%lld send_device=%lld "
                "send_aware=%lld recv_oneshot=%lld recv_device=%lld recv_aware=%lld handed_off=%lld\n",
                rank, stat("p2p.staged_send"), stat("p2p.staged_recv"), stat("p2p.staged_typed"),
                stat("method.send_oneshot"), stat("method.send_device"), stat("method.send_aware"),
                stat("method.recv_oneshot"), stat("method.recv_device"), stat("method.recv_aware"),
                stat("p2p.handed_off"));
    fprintf(log_out, "rank %d: done failures=%d\n", rank, failures);
    if (log_out != stdout) fclose(log_out);
    MPI_Finalize();
    return failures ? 1 : 0;
}
