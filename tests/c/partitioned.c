/* MPI-4 partitioned point-to-point (MPI_Psend_init, MPI_Precv_init, MPI_Pready,
 * MPI_Pready_range, MPI_Pready_list, MPI_Parrived) with the buffers commlib stages.
 *
 *   partitioned host|device [SEED]
 *
 * Two ranks.  Every case - a datatype (contiguous, vector, subarray, interleaved columns
 * whose partitions share their span, and an indexed type with an empty block that commlib
 * leaves to the host MPI), a partitioning (partitions x elements per partition) and a mix
 * of buffer kinds (sender, receiver) - runs ITERATIONS times over one pair of partitioned
 * requests, re-armed with MPI_Start or MPI_Startall, with new data each time, and ends
 * with MPI_Request_free.  The sender writes each partition only just before declaring it
 * ready (so a library that copied the buffer at MPI_Start would send the previous data),
 * in a seeded random order: one MPI_Pready at a time, MPI_Pready_range over two ranges,
 * MPI_Pready_list over two lists, or three threads declaring partitions while the main
 * thread already waits.  The receiver resets its buffer before each start, then writes a
 * byte into a gap of the type map; it polls MPI_Parrived and compares each partition with
 * the expected bytes exactly when it is reported (one thread or three at once, on the
 * same partitions), or leaves everything to the completion call (MPI_Wait, MPI_Waitall
 * with an MPI_Ibarrier, an MPI_Test loop).  Afterwards the whole buffer must hold the
 * sentinel everywhere but the type map's bytes (the sender's data) and the gap byte, and
 * the status must count every element from the right source and tag.
 *
 * Kinds: host (a plain pointer: staged under COMMLIB_STAGE_HOST=1), bottom (host memory
 * named by MPI_BOTTOM and an absolute type: never staged, so with COMMLIB_STAGE_HOST=1 the
 * staged side meets a host-memory peer both ways), device (cuMemAlloc through
 * libcuda.so.1, found at run time).  `host` mode mixes host and bottom, `device` mode
 * device with device, device with host and host with device.
 *
 * Prints "FAIL ..." lines, then per rank "partitioned: rank R seed=S ... failures=F
 * staged_partitions=N" (N: commlib's p2p.partitions counter, -1 without commlib); exits 1
 * on failure.  "partitioned: skipped (...)" on an MPI-3 library or without a GPU. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <mpi.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#if MPI_VERSION >= 4
#include "cuda_loader.h"

#define SENTINEL 0xEE
#define GAP_VALUE 0x42
#define ITERATIONS 3
#define THREADS 3

static int rank, partner, device_mode, thread_multiple, cases, iterations;
static int failures, checks; /* atomics: threads check too */
static unsigned seed;
static CUcontext context;

/* EXPECT only reports a failure; CHECK also counts the check (the data and status checks) */
#define CHECK(cond, ...)                                                         \
    do {                                                                         \
        __atomic_add_fetch(&checks, 1, __ATOMIC_RELAXED);                        \
        EXPECT(cond, __VA_ARGS__);                                               \
    } while (0)
#define EXPECT(cond, ...)                                                        \
    do {                                                                         \
        if (!(cond)) {                                                           \
            char why_[300];                                                      \
            snprintf(why_, sizeof why_, __VA_ARGS__);                            \
            __atomic_add_fetch(&failures, 1, __ATOMIC_RELAXED);                  \
            printf("FAIL rank %d line %d: %s\n", rank, __LINE__, why_);          \
            fflush(stdout);                                                      \
        }                                                                        \
    } while (0)
#define CU(call) EXPECT((call) == 0, "%s failed", #call)
#define MPI_OK(call) EXPECT((call) == MPI_SUCCESS, "%s failed", #call)

/* ---- buffers ---- */

enum kind { HOST, BOTTOM, DEVICE };
static const char *kind_name[3] = {"host", "bottom", "device"};

static char *alloc(enum kind k, size_t bytes)
{
    if (k != DEVICE) return malloc(bytes);
    CUdeviceptr p = 0;
    CU(cu.cuMemAlloc(&p, bytes));
    return (char *)(uintptr_t)p;
}

static void release(enum kind k, char *p)
{
    if (k != DEVICE) free(p);
    else CU(cu.cuMemFree((CUdeviceptr)(uintptr_t)p));
}

static void put(enum kind k, char *dst, const char *src, size_t n)
{
    if (k != DEVICE) memcpy(dst, src, n);
    else CU(cu.cuMemcpyHtoD((CUdeviceptr)(uintptr_t)dst, src, n));
}

static void get(enum kind k, char *dst, const char *src, size_t n)
{
    if (k != DEVICE) memcpy(dst, src, n);
    else CU(cu.cuMemcpyDtoH(dst, (CUdeviceptr)(uintptr_t)src, n));
}

/* The bytes of src where mask is set, into dst: a partition's type map and nothing else
 * (the partitions of the columns type interleave). */
static void put_masked(enum kind k, char *dst, const char *src, const unsigned char *mask, size_t n)
{
    for (size_t a = 0; a < n;) {
        if (!mask[a]) {
            a++;
            continue;
        }
        size_t b = a;
        while (b < n && mask[b]) b++;
        put(k, dst + a, src + a, b - a);
        a = b;
    }
}

static char *pattern(size_t bytes, unsigned s)
{
    unsigned char *p = malloc(bytes);
    for (size_t i = 0; i < bytes; i++) p[i] = (unsigned char)(s * 37 + i * 11 + 1 + (i >> 8));
    return (char *)p;
}

static unsigned next_random(unsigned *state)
{
    *state = *state * 1103515245u + 12345u;
    return *state >> 8;
}

/* ---- types ---- */

enum { T_CONTIG, T_VECTOR, T_SUBARRAY, T_COLUMNS, T_HOLEY, NTYPES };
static struct tcase {
    const char *name;
    MPI_Datatype type;
    MPI_Aint extent, true_lb, true_extent;
    int max_elements; /* columns: 16 columns of an 8 x 16 matrix */
} types[NTYPES];

static void make_types(void)
{
    MPI_Datatype vector, subarray, column, columns, holey;
    MPI_Type_vector(3, 2, 5, MPI_DOUBLE, &vector);
    int sizes[3] = {4, 6, 5}, subsizes[3] = {2, 3, 2}, starts[3] = {1, 2, 1};
    MPI_Type_create_subarray(3, sizes, subsizes, starts, MPI_ORDER_C, MPI_INT, &subarray);
    MPI_Type_vector(8, 1, 16, MPI_DOUBLE, &column);
    MPI_Type_create_resized(column, 0, sizeof(double), &columns);
    MPI_Type_free(&column);
    int lengths[3] = {2, 0, 3}, offsets[3] = {0, 4, 7};
    MPI_Type_indexed(3, lengths, offsets, MPI_INT, &holey);
    struct tcase all[NTYPES] = {{"contig", MPI_DOUBLE, 0, 0, 0, 1 << 20}, {"vector", vector, 0, 0, 0, 1 << 20},
                                {"subarray", subarray, 0, 0, 0, 1 << 20}, {"columns", columns, 0, 0, 0, 16},
                                {"holey", holey, 0, 0, 0, 1 << 20}};
    for (int t = 0; t < NTYPES; t++) {
        if (t != T_CONTIG) MPI_Type_commit(&all[t].type);
        MPI_Aint lb;
        MPI_Type_get_extent(all[t].type, &lb, &all[t].extent);
        MPI_Type_get_true_extent(all[t].type, &all[t].true_lb, &all[t].true_extent);
        types[t] = all[t];
    }
}

/* Bytes from the buffer pointer to the end of n elements (every true_lb here is >= 0). */
static size_t span(int t, int n) { return (size_t)((n - 1) * types[t].extent + types[t].true_lb + types[t].true_extent); }

/* 0xff where elements [first, first + count) of type t lie, as the host MPI unpacks them. */
static unsigned char *mask_of(int t, int first, int count, size_t bytes)
{
    unsigned char *mask = calloc(bytes, 1);
    int size = 0, position = 0;
    PMPI_Pack_size(count, types[t].type, MPI_COMM_SELF, &size);
    char *ones = malloc((size_t)size + 1);
    memset(ones, 0xff, (size_t)size);
    PMPI_Unpack(ones, size, &position, mask + first * types[t].extent, count, types[t].type, MPI_COMM_SELF);
    free(ones);
    return mask;
}

/* The receive buffer after the message: the sentinel, the gap byte, and the sender's data
 * (pattern of data_seed) on the type map's bytes, as the host MPI places them. */
static char *expected(int t, int n, size_t bytes, unsigned data_seed, long gap)
{
    char *src = pattern(bytes, data_seed), *out = malloc(bytes);
    memset(out, SENTINEL, bytes);
    if (gap >= 0) out[gap] = GAP_VALUE;
    int size = 0, position = 0, back = 0;
    PMPI_Pack_size(n, types[t].type, MPI_COMM_SELF, &size);
    char *packed = malloc((size_t)size + 1);
    PMPI_Pack(src, n, types[t].type, packed, size, &position, MPI_COMM_SELF);
    PMPI_Unpack(packed, position, &back, out, n, types[t].type, MPI_COMM_SELF);
    free(src);
    free(packed);
    return out;
}

/* ---- one case ---- */

struct side {
    int t, partitions, count;
    enum kind k;
    char *buf;
    size_t bytes;
    MPI_Request request;
    unsigned char **masks; /* per partition */
    const char *data;      /* sender: this iteration's data */
    const char *want;      /* receiver: the buffer expected at the end */
    const char *what;
};

static void prepare_partitions(const struct side *s, int first, int n)
{
    for (int p = first; p < first + n; p++) put_masked(s->k, s->buf, s->data, s->masks[p], s->bytes);
}

/* Partition p arrived: its bytes must be the sender's now. */
static void check_partition(const struct side *s, int p)
{
    char *got = malloc(s->bytes);
    get(s->k, got, s->buf, s->bytes);
    size_t bad = s->bytes;
    for (size_t a = 0; a < s->bytes && bad == s->bytes; a++)
        if (s->masks[p][a] && got[a] != s->want[a]) bad = a;
    CHECK(bad == s->bytes, "%s: partition %d reported arrived, byte %zu is 0x%02x, expected 0x%02x", s->what, p, bad,
          bad < s->bytes ? (unsigned char)got[bad] : 0, bad < s->bytes ? (unsigned char)s->want[bad] : 0);
    free(got);
}

struct worker {
    const struct side *s;
    int index;
    pthread_t thread;
};

static void *ready_worker(void *arg)
{
    struct worker *w = arg;
    if (device_mode) cu.cuCtxSetCurrent(context);
    for (int p = w->index; p < w->s->partitions; p += THREADS) {
        prepare_partitions(w->s, p, 1);
        MPI_OK(MPI_Pready(p, w->s->request));
    }
    return NULL;
}

/* Polls every partition (the other workers poll the same ones). */
static void *arrival_worker(void *arg)
{
    struct worker *w = arg;
    if (device_mode) cu.cuCtxSetCurrent(context);
    int left = w->s->partitions;
    char *seen = calloc((size_t)left, 1);
    while (left)
        for (int p = 0; p < w->s->partitions; p++) {
            int flag = 0;
            if (seen[p]) continue;
            MPI_OK(MPI_Parrived(w->s->request, p, &flag));
            if (!flag) continue;
            check_partition(w->s, p);
            seen[p] = 1;
            left--;
        }
    free(seen);
    return NULL;
}

/* Starts the workers, waits for the request on this thread meanwhile, joins them. */
static void with_workers(const struct side *s, void *(*body)(void *), MPI_Status *status)
{
    struct worker workers[THREADS];
    for (int i = 0; i < THREADS; i++) {
        workers[i] = (struct worker){s, i, 0};
        EXPECT(pthread_create(&workers[i].thread, NULL, body, &workers[i]) == 0, "pthread_create");
    }
    MPI_Request request = s->request;
    MPI_OK(MPI_Wait(&request, status));
    for (int i = 0; i < THREADS; i++) pthread_join(workers[i].thread, NULL);
}

enum { READY_SINGLE, READY_RANGE, READY_LIST, READY_THREADS };
static const char *ready_name[4] = {"single", "range", "list", "threads"};
enum { DONE_WAIT, DONE_WAITALL, DONE_TEST };

static void complete(struct side *s, int done, MPI_Status *status)
{
    if (done == DONE_WAIT) {
        MPI_OK(MPI_Wait(&s->request, status));
    } else if (done == DONE_WAITALL) {
        MPI_Request requests[2] = {s->request, MPI_REQUEST_NULL};
        MPI_Status statuses[2];
        MPI_OK(MPI_Ibarrier(MPI_COMM_WORLD, &requests[1]));
        MPI_OK(MPI_Waitall(2, requests, statuses));
        *status = statuses[0];
        CHECK(requests[0] == s->request, "%s: MPI_Waitall changed the partitioned request", s->what);
    } else {
        int flag = 0;
        while (!flag) MPI_OK(MPI_Test(&s->request, &flag, status));
    }
}

static void send_iteration(struct side *s, int ready, int done, unsigned *random)
{
    int P = s->partitions, order[64];
    for (int p = 0; p < P; p++) order[p] = p;
    for (int p = P - 1; p > 0; p--) { /* Fisher-Yates */
        int q = (int)(next_random(random) % (unsigned)(p + 1)), swap = order[p];
        order[p] = order[q];
        order[q] = swap;
    }
    MPI_Status status;
    if (ready == READY_THREADS) {
        with_workers(s, ready_worker, &status);
        return;
    }
    if (ready == READY_SINGLE) {
        for (int i = 0; i < P; i++) {
            prepare_partitions(s, order[i], 1);
            MPI_OK(MPI_Pready(order[i], s->request));
        }
    } else if (ready == READY_RANGE) { /* the upper half first */
        int mid = P / 2;
        prepare_partitions(s, mid, P - mid);
        MPI_OK(MPI_Pready_range(mid, P - 1, s->request));
        if (mid) {
            prepare_partitions(s, 0, mid);
            MPI_OK(MPI_Pready_range(0, mid - 1, s->request));
        }
    } else { /* two lists: the shuffled order's halves (consecutive runs in them happen too) */
        int first = (P + 1) / 2;
        for (int i = 0; i < first; i++) prepare_partitions(s, order[i], 1);
        MPI_OK(MPI_Pready_list(first, order, s->request));
        if (P - first) {
            for (int i = first; i < P; i++) prepare_partitions(s, order[i], 1);
            MPI_OK(MPI_Pready_list(P - first, order + first, s->request));
        }
    }
    complete(s, done, &status);
}

static void receive_iteration(struct side *s, int ready, int done, MPI_Status *status)
{
    int P = s->partitions;
    if (ready == READY_THREADS) {
        with_workers(s, arrival_worker, status);
        return;
    }
    if (done != DONE_WAITALL) { /* DONE_WAIT: every partition in turn; DONE_TEST: the even ones, last first */
        int step = done == DONE_WAIT ? 1 : 2, left = 0;
        char seen[64] = {0};
        for (int p = 0; p < P; p += step) left++;
        while (left)
            for (int i = 0; i < P; i += step) {
                int p = done == DONE_WAIT ? i : (P - 1) / 2 * 2 - i, flag = 0;
                if (p < 0 || seen[p]) continue;
                MPI_OK(MPI_Parrived(s->request, p, &flag));
                if (!flag) continue;
                check_partition(s, p);
                seen[p] = 1;
                left--;
            }
    }
    complete(s, done, status);
}

static void run_case(int c, int t, int P, int C, enum kind send_kind, enum kind recv_kind)
{
    int sends = rank == c % 2, n = P * C, tag = 1000 + c;
    int ready = c % 4, done = c / 4 % 3;
    if (ready == READY_THREADS && !thread_multiple) ready = READY_SINGLE;
    char what[160];
    snprintf(what, sizeof what, "case %d %s %dx%d %s->%s ready=%s done=%d", c, types[t].name, P, C,
             kind_name[send_kind], kind_name[recv_kind], ready_name[ready], done);
    struct side s = {t, P, C, sends ? send_kind : recv_kind, NULL, span(t, n), MPI_REQUEST_NULL, NULL, NULL, NULL, what};
    s.buf = alloc(s.k, s.bytes);
    s.masks = malloc(sizeof *s.masks * (size_t)P);
    for (int p = 0; p < P; p++) s.masks[p] = mask_of(t, p * C, C, s.bytes);
    unsigned char *all = mask_of(t, 0, n, s.bytes);
    long gap = -1;
    for (size_t a = 0; a < s.bytes && gap < 0; a++)
        if (!all[a]) gap = (long)a;
    free(all);

    MPI_Datatype type = types[t].type, absolute = MPI_DATATYPE_NULL;
    void *where = s.buf;
    if (s.k == BOTTOM) {
        MPI_Aint address;
        int one = 1;
        MPI_Get_address(s.buf, &address);
        MPI_Type_create_struct(1, &one, &address, &types[t].type, &absolute);
        MPI_Type_commit(&absolute);
        type = absolute;
        where = MPI_BOTTOM;
    }
    char *junk = pattern(s.bytes, seed ^ 0x5a5au), *sentinel = malloc(s.bytes);
    memset(sentinel, SENTINEL, s.bytes);
    put(s.k, s.buf, junk, s.bytes); /* what a send would carry if its data were taken too early */
    if (sends) MPI_OK(MPI_Psend_init(where, P, C, type, partner, tag, MPI_COMM_WORLD, MPI_INFO_NULL, &s.request));
    else MPI_OK(MPI_Precv_init(where, P, C, type, partner, tag, MPI_COMM_WORLD, MPI_INFO_NULL, &s.request));
    unsigned random = seed * 2654435761u + (unsigned)c;
    for (int it = 0; it < ITERATIONS; it++) {
        unsigned data_seed = seed * 7919u + (unsigned)c * 31u + (unsigned)it;
        char *data = pattern(s.bytes, data_seed), *want = expected(t, n, s.bytes, data_seed, gap);
        s.data = data;
        s.want = want;
        if (!sends) put(s.k, s.buf, sentinel, s.bytes);
        if (it % 2) MPI_OK(MPI_Startall(1, &s.request));
        else MPI_OK(MPI_Start(&s.request));
        if (sends) {
            send_iteration(&s, ready, done, &random);
        } else {
            char gap_value = GAP_VALUE;
            if (gap >= 0) put(s.k, s.buf + gap, &gap_value, 1); /* not the receive's: must survive it */
            MPI_Status status;
            memset(&status, 0, sizeof status);
            receive_iteration(&s, ready, done, &status);
            char *got = malloc(s.bytes);
            get(s.k, got, s.buf, s.bytes);
            size_t bad = s.bytes;
            for (size_t a = 0; a < s.bytes && bad == s.bytes; a++)
                if (got[a] != want[a]) bad = a;
            CHECK(bad == s.bytes, "%s iteration %d: byte %zu of %zu is 0x%02x, expected 0x%02x", what, it, bad, s.bytes,
                  bad < s.bytes ? (unsigned char)got[bad] : 0, bad < s.bytes ? (unsigned char)want[bad] : 0);
            int count = -1;
            MPI_Get_count(&status, type, &count);
            CHECK(count == n && status.MPI_SOURCE == partner && status.MPI_TAG == tag,
                  "%s iteration %d: status count %d (want %d) source %d tag %d", what, it, count, n,
                  status.MPI_SOURCE, status.MPI_TAG);
            free(got);
        }
        free(data);
        free(want);
        iterations++;
    }
    MPI_OK(MPI_Request_free(&s.request));
    CHECK(s.request == MPI_REQUEST_NULL, "%s: MPI_Request_free left the handle", what);
    if (absolute != MPI_DATATYPE_NULL) MPI_Type_free(&absolute);
    for (int p = 0; p < P; p++) free(s.masks[p]);
    free(s.masks);
    free(junk);
    free(sentinel);
    release(s.k, s.buf);
    cases++;
}

static int run(int argc, char **argv)
{
    static const int shapes[][2] = {{1, 5}, {4, 1}, {4, 3}, {8, 2}}; /* partitions x elements */
    static const enum kind host_mixes[][2] = {{HOST, HOST}, {HOST, BOTTOM}, {BOTTOM, HOST}};
    static const enum kind device_mixes[][2] = {{DEVICE, DEVICE}, {DEVICE, HOST}, {HOST, DEVICE}};
    int provided, nranks, have_gpu = 1, ready;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &nranks);
    thread_multiple = provided == MPI_THREAD_MULTIPLE;
    device_mode = argc > 1 && !strcmp(argv[1], "device");
    seed = argc > 2 ? (unsigned)strtoul(argv[2], NULL, 0) : (unsigned)time(NULL) ^ (unsigned)getpid();
    MPI_Bcast(&seed, 1, MPI_UNSIGNED, 0, MPI_COMM_WORLD);
    if (device_mode && (have_gpu = cuda_load(rank, NULL, 0))) cu.cuCtxGetCurrent(&context);
    MPI_Allreduce(&have_gpu, &ready, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    if (!ready || nranks != 2) {
        printf("partitioned: skipped (%s)\n", ready ? "needs 2 ranks" : "no GPU");
        MPI_Finalize();
        return 0;
    }
    partner = 1 - rank;
    make_types();
    int c = 0;
    for (int t = 0; t < NTYPES; t++)
        for (int shape = 0; shape < 4; shape++)
            for (int mix = 0; mix < 3; mix++) {
                int P = shapes[shape][0], C = shapes[shape][1];
                if (P * C > types[t].max_elements) continue;
                const enum kind *kinds = device_mode ? device_mixes[mix] : host_mixes[mix];
                run_case(c++, t, P, C, kinds[0], kinds[1]);
            }
    for (int t = 1; t < NTYPES; t++) MPI_Type_free(&types[t].type);
    long long (*stat)(const char *) = (long long (*)(const char *))dlsym(RTLD_DEFAULT, "commlib_stat");
    printf("partitioned: rank %d seed=%u mode=%s threads=%d cases=%d iterations=%d checks=%d failures=%d "
           "staged_partitions=%lld\n",
           rank, seed, device_mode ? "device" : "host", thread_multiple, cases, iterations, checks, failures,
           stat ? stat("p2p.partitions") : -1);
    fflush(stdout);
    MPI_Finalize();
    return failures ? 1 : 0;
}

#endif

int main(int argc, char **argv)
{
#if MPI_VERSION >= 4
    return run(argc, argv);
#else
    MPI_Init(&argc, &argv);
    int rank;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    if (rank == 0) printf("partitioned: skipped (MPI-%d.%d library: no partitioned calls)\n", MPI_VERSION, MPI_SUBVERSION);
    MPI_Finalize();
    return 0;
#endif
}
