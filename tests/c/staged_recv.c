/* Staged receives touch only what a receive into the program's own buffer would touch.
 *
 *   staged_recv [device]
 *
 * Two ranks: rank 0 sends, rank 1 receives.  For every case - a receive type, a count,
 * and a message of so many packed bytes (whole elements, or ending inside one) - rank 1
 * receives the same message twice: through the interposed call under test (staged when
 * COMMLIB_STAGE_HOST=1, or with `device`, where the buffer is device memory) into a
 * buffer that ends exactly at the last byte the message fills (host memory: a PROT_NONE
 * page follows it; device memory: an allocation of exactly that size, which the stand-in
 * driver of CI checks every copy against), and through PMPI_* into plain host memory: the
 * host MPI's own answer.  After posting a receive and before its message is sent, the
 * program writes into a gap of the type map.  Afterwards both buffers must hold the same
 * bytes (the program's gap write included), and the statuses must answer MPI_Get_count,
 * MPI_Get_elements, MPI_Get_elements_x, MPI_Test_cancelled, source and tag alike.  Each
 * receive call is tried: MPI_Recv, Irecv, Recv_init + Start, Mrecv, Imrecv,
 * Sendrecv, Isendrecv (MPI-4 libraries); then the receive side of Bcast, Ibcast and Alltoallv, and a cancelled Irecv.
 *
 * Which bytes a message fills is asked of the host MPI itself: a self-message of the same
 * length, every byte 0xff, received with the same type into a cleared buffer.
 * Lines "FAIL ..." say what differs; "checked N cases" ends a good run; exit 1 on failure. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "cuda_loader.h"

#define SENTINEL 0xa5
#define GAP_VALUE 42
enum { TAG_GO = 100, TAG_STAGED = 101, TAG_REFERENCE = 102, TAG_BACK = 103, TAG_NEVER = 104 };

static int rank, failures, checks, device_mode;
static MPI_Comm self; /* for asking the MPI which bytes a message fills */

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

/* ---- the types ---- */

struct tcase {
    const char *name;
    MPI_Datatype type;
    int count;
    int whole;       /* packed bytes of one element */
    int bytes[4];    /* message lengths tried (0 ends the list) */
};

static uint64_t rng_state = 12345;
static int rng(int bound)
{
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    return (int)((rng_state >> 33) % (uint64_t)bound);
}

static MPI_Datatype many_blocks(void) /* 1024 irregular blocks of ints: more pieces than commlib keeps */
{
    enum { N = 1024 };
    int lengths[N], displs[N], at = 0;
    for (int i = 0; i < N; i++) {
        lengths[i] = 1 + rng(3);
        displs[i] = at;
        at += lengths[i] + 1 + rng(3);
    }
    MPI_Datatype t;
    PMPI_Type_indexed(N, lengths, displs, MPI_INT, &t);
    return t;
}

static MPI_Datatype empty_block(void) /* {1, 0, 1} ints at {0, 1, 2}: the empty block */
{
    int lengths[3] = {1, 0, 1}, displs[3] = {0, 1, 2};
    MPI_Datatype t;
    PMPI_Type_indexed(3, lengths, displs, MPI_INT, &t);
    return t;
}

static MPI_Datatype gappy_struct(void) /* int at 0, double at 8, char at 16; extent 24 */
{
    int lengths[3] = {1, 1, 1};
    MPI_Aint displs[3] = {0, 8, 16};
    MPI_Datatype types[3] = {MPI_INT, MPI_DOUBLE, MPI_CHAR}, s, t;
    PMPI_Type_create_struct(3, lengths, displs, types, &s);
    PMPI_Type_create_resized(s, 0, 24, &t);
    PMPI_Type_free(&s);
    return t;
}

static MPI_Datatype sparse_vector(void) /* 3 blocks of 2 ints 4000 bytes apart, extent 1 MiB */
{
    MPI_Datatype v, t;
    PMPI_Type_vector(3, 2, 1000, MPI_INT, &v);
    PMPI_Type_create_resized(v, 0, 1 << 20, &t);
    PMPI_Type_free(&v);
    return t;
}

static MPI_Datatype long_double_struct(void) /* a long double and an int: left to the host MPI */
{
    int lengths[2] = {1, 1};
    MPI_Aint displs[2] = {0, 16};
    MPI_Datatype types[2] = {MPI_LONG_DOUBLE, MPI_INT}, t;
    PMPI_Type_create_struct(2, lengths, displs, types, &t);
    return t;
}

/* ---- buffers: host with a guard page after the end, or device of exactly that size ---- */

struct buffer {
    char *p;        /* what MPI calls get */
    size_t bytes;
    void *mapping;  /* host: the mmap */
    size_t mapped;
};

static struct buffer buffer_new(size_t bytes)
{
    struct buffer b = {.bytes = bytes};
    if (device_mode) {
        CUdeviceptr d = 0;
        if (cu.cuMemAlloc(&d, bytes ? bytes : 1)) {
            printf("FAIL: cuMemAlloc(%zu)\n", bytes);
            exit(1);
        }
        b.p = (char *)(uintptr_t)d;
        return b;
    }
    size_t page = (size_t)sysconf(_SC_PAGESIZE), body = (bytes + page - 1) / page * page;
    b.mapped = body + page;
    b.mapping = mmap(NULL, b.mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (b.mapping == MAP_FAILED || mprotect((char *)b.mapping + body, page, PROT_NONE)) {
        printf("FAIL: mmap\n");
        exit(1);
    }
    b.p = (char *)b.mapping + body - bytes;
    return b;
}

static void buffer_free(struct buffer *b)
{
    if (device_mode) cu.cuMemFree((CUdeviceptr)(uintptr_t)b->p);
    else munmap(b->mapping, b->mapped);
}

static void buffer_write(struct buffer *b, size_t at, const void *src, size_t n)
{
    if (device_mode) cu.cuMemcpyHtoD((CUdeviceptr)(uintptr_t)(b->p + at), src, n);
    else memcpy(b->p + at, src, n);
}

static void buffer_read(struct buffer *b, void *dst)
{
    if (device_mode) cu.cuMemcpyDtoH(dst, (CUdeviceptr)(uintptr_t)b->p, b->bytes);
    else memcpy(dst, b->p, b->bytes);
}

/* ---- which bytes a message of `bytes` packed bytes fills, by the host MPI ---- */

/* mask[i] != 0 for the bytes written (relative to the buffer pointer, from 0); returns the
 * reach (last written byte + 1).  Types here have true_lb 0. */
static size_t filled_bytes(MPI_Datatype type, int count, int bytes, unsigned char *mask, size_t span)
{
    unsigned char *ones = malloc((size_t)bytes + 1);
    memset(ones, 0xff, (size_t)bytes);
    memset(mask, 0, span);
    PMPI_Sendrecv(ones, bytes, MPI_PACKED, 0, 7, mask, count, type, 0, 7, self, MPI_STATUS_IGNORE);
    free(ones);
    size_t reach = 0;
    for (size_t i = 0; i < span; i++)
        if (mask[i]) reach = i + 1;
    return reach;
}

static size_t span_of(MPI_Datatype type, int count)
{
    MPI_Aint lb, extent, tlb, text;
    PMPI_Type_get_extent(type, &lb, &extent);
    PMPI_Type_get_true_extent(type, &tlb, &text);
    return (size_t)(tlb + text + (count - 1) * extent);
}

/* ---- comparing statuses ---- */

/* tags: 0 where the host MPI's own tag is not to be trusted (MPICH 5's MPI_Isendrecv
 * reports an internal tag, not the message's) */
static void compare_status(const char *what, MPI_Datatype type, MPI_Status *staged, MPI_Status *reference, int tags)
{
    int c1, c2, e1, e2, x1 = -1, x2 = -2;
    MPI_Count ex1, ex2;
    MPI_Get_count(staged, type, &c1);
    MPI_Get_count(reference, type, &c2);
    MPI_Get_elements(staged, type, &e1);
    MPI_Get_elements(reference, type, &e2);
    MPI_Get_elements_x(staged, type, &ex1);
    MPI_Get_elements_x(reference, type, &ex2);
    MPI_Test_cancelled(staged, &x1);
    MPI_Test_cancelled(reference, &x2);
    CHECK(c1 == c2, "%s: MPI_Get_count %d, the host MPI's %d", what, c1, c2);
    CHECK(e1 == e2, "%s: MPI_Get_elements %d, the host MPI's %d", what, e1, e2);
    CHECK(ex1 == ex2, "%s: MPI_Get_elements_x %lld, the host MPI's %lld", what, (long long)ex1, (long long)ex2);
    CHECK(x1 == x2, "%s: MPI_Test_cancelled %d, the host MPI's %d", what, x1, x2);
    CHECK(staged->MPI_SOURCE == reference->MPI_SOURCE &&
              (!tags || staged->MPI_TAG - TAG_STAGED == reference->MPI_TAG - TAG_REFERENCE),
          "%s: source/tag %d/%d, the host MPI's %d/%d", what, staged->MPI_SOURCE, staged->MPI_TAG,
          reference->MPI_SOURCE, reference->MPI_TAG);
}

/* ---- point-to-point ---- */

enum variant { V_RECV, V_IRECV, V_PERSISTENT, V_MRECV, V_IMRECV, V_SENDRECV, V_ISENDRECV, NVARIANTS };
static const char *const variant_name[] = {"MPI_Recv", "MPI_Irecv", "MPI_Recv_init", "MPI_Mrecv", "MPI_Imrecv",
                                           "MPI_Sendrecv", "MPI_Isendrecv"};
#if MPI_VERSION >= 4
#define HAVE_ISENDRECV 1
#else
#define HAVE_ISENDRECV 0 /* an MPI-3 library (Open MPI 4) */
#endif

/* Rank 0: the sender's side of one receive (the message, after the receiver says go). */
static void send_message(const char *packed, int bytes, int tag, enum variant v)
{
    int go;
    PMPI_Recv(&go, 1, MPI_INT, 1, TAG_GO, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
    PMPI_Send(packed, bytes, MPI_PACKED, 1, tag, MPI_COMM_WORLD);
    if (v == V_ISENDRECV || (v == V_SENDRECV && tag == TAG_STAGED)) PMPI_Recv(&go, 1, MPI_INT, 1, TAG_BACK, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
}

static void say_go(void)
{
    int go = 1;
    PMPI_Send(&go, 1, MPI_INT, 0, TAG_GO, MPI_COMM_WORLD);
}

/* Rank 1: one receive through the interposed call `v` into b, the gap written while it is
 * pending (or before a blocking call). */
static void receive_staged(enum variant v, struct buffer *b, MPI_Datatype type, int count, long gap, MPI_Status *st)
{
    const unsigned char value = GAP_VALUE;
    MPI_Request r;
    MPI_Message m;
    int one = 1;
    switch (v) {
    case V_RECV:
    case V_MRECV:
    case V_SENDRECV:
        if (gap >= 0) buffer_write(b, (size_t)gap, &value, 1);
        say_go();
        if (v == V_RECV) {
            MPI_Recv(b->p, count, type, 0, TAG_STAGED, MPI_COMM_WORLD, st);
        } else if (v == V_MRECV) {
            MPI_Mprobe(0, TAG_STAGED, MPI_COMM_WORLD, &m, MPI_STATUS_IGNORE);
            MPI_Mrecv(b->p, count, type, &m, st);
        } else {
            MPI_Sendrecv(&one, 1, MPI_INT, 0, TAG_BACK, b->p, count, type, 0, TAG_STAGED, MPI_COMM_WORLD, st);
        }
        break;
    case V_IRECV:
        MPI_Irecv(b->p, count, type, 0, TAG_STAGED, MPI_COMM_WORLD, &r);
        if (gap >= 0) buffer_write(b, (size_t)gap, &value, 1);
        say_go();
        MPI_Wait(&r, st);
        break;
    case V_PERSISTENT:
        MPI_Recv_init(b->p, count, type, 0, TAG_STAGED, MPI_COMM_WORLD, &r);
        MPI_Start(&r);
        if (gap >= 0) buffer_write(b, (size_t)gap, &value, 1);
        say_go();
        MPI_Wait(&r, st);
        MPI_Request_free(&r);
        break;
#if HAVE_ISENDRECV
    case V_ISENDRECV:
        MPI_Isendrecv(&one, 1, MPI_INT, 0, TAG_BACK, b->p, count, type, 0, TAG_STAGED, MPI_COMM_WORLD, &r);
        if (gap >= 0) buffer_write(b, (size_t)gap, &value, 1);
        say_go();
        MPI_Wait(&r, st);
        break;
#endif
    case V_IMRECV:
        say_go();
        MPI_Mprobe(0, TAG_STAGED, MPI_COMM_WORLD, &m, MPI_STATUS_IGNORE);
        MPI_Imrecv(b->p, count, type, &m, &r);
        if (gap >= 0) buffer_write(b, (size_t)gap, &value, 1);
        MPI_Wait(&r, st);
        break;
    default:
        break;
    }
}

/* The host MPI's own receive (by the same call where the call's status rules may differ). */
static void receive_reference(enum variant v, unsigned char *ref, MPI_Datatype type, int count, long gap,
                              MPI_Status *st)
{
    MPI_Request r;
#if HAVE_ISENDRECV
    int one = 1;
    if (v == V_ISENDRECV)
        PMPI_Isendrecv(&one, 1, MPI_INT, 0, TAG_BACK, ref, count, type, 0, TAG_REFERENCE, MPI_COMM_WORLD, &r);
    else
#endif
        PMPI_Irecv(ref, count, type, 0, TAG_REFERENCE, MPI_COMM_WORLD, &r);
    (void)v;
    if (gap >= 0) ref[gap] = GAP_VALUE;
    say_go();
    PMPI_Wait(&r, st);
}

static int cases_run;

/* One case, every variant. */
static void p2p_case(const struct tcase *c, int bytes)
{
    size_t span = span_of(c->type, c->count);
    unsigned char *mask = malloc(span + 1), *ref = malloc(span + 1), *got = malloc(span + 1);
    size_t reach = filled_bytes(c->type, c->count, bytes, mask, span);
    long gap = -1; /* a byte of the buffer before the reach that the message does not fill */
    for (size_t i = 0; i < reach && gap < 0; i++)
        if (!mask[i]) gap = (long)i;
    int packed_size = 0, position = 0;
    PMPI_Pack_size(c->count, c->type, MPI_COMM_WORLD, &packed_size);
    char *packed = malloc((size_t)packed_size + 1);
    for (int v = 0; v < NVARIANTS; v++) {
        if (v == V_ISENDRECV && !HAVE_ISENDRECV) continue;
        char what[160];
        snprintf(what, sizeof what, "%s count %d, %d of %d bytes, %s", c->name, c->count, bytes, c->count * c->whole,
                 variant_name[v]);
        if (rank == 0) {
            /* the elements' bytes, all different from the sentinel, packed by the host MPI */
            char *src = malloc(span + 1);
            for (size_t i = 0; i < span; i++) src[i] = (char)(1 + (i * 7 + (size_t)v) % 200);
            position = 0;
            PMPI_Pack(src, c->count, c->type, packed, packed_size, &position, MPI_COMM_WORLD);
            send_message(packed, bytes, TAG_STAGED, (enum variant)v);
            send_message(packed, bytes, TAG_REFERENCE, (enum variant)v);
            free(src);
            continue;
        }
        struct buffer b = buffer_new(reach);
        memset(got, SENTINEL, span);
        buffer_write(&b, 0, got, reach);
        MPI_Status staged, reference;
        memset(&staged, 0, sizeof staged);
        memset(&reference, 0, sizeof reference);
        receive_staged((enum variant)v, &b, c->type, c->count, gap, &staged);
        memset(ref, SENTINEL, span);
        receive_reference((enum variant)v, ref, c->type, c->count, gap, &reference);
        buffer_read(&b, got);
        size_t first = reach;
        for (size_t i = 0; i < reach && first == reach; i++)
            if (got[i] != ref[i]) first = i;
        CHECK(first == reach, "%s: byte %zu is %d, the host MPI's %d (gap written at %ld)", what, first,
              first < reach ? got[first] : -1, first < reach ? ref[first] : -1, gap);
        if (gap >= 0) CHECK(got[gap] == GAP_VALUE, "%s: the program's write into the gap at %ld was lost", what, gap);
        compare_status(what, c->type, &staged, &reference, v != V_ISENDRECV);
        buffer_free(&b);
        cases_run++;
    }
    free(packed);
    free(mask);
    free(ref);
    free(got);
}

/* ---- collectives: the receive side ---- */

static void bcast_case(const struct tcase *c, int nonblocking)
{
    size_t span = span_of(c->type, c->count);
    unsigned char *mask = malloc(span + 1), *ref = malloc(span + 1), *got = malloc(span + 1);
    size_t reach = filled_bytes(c->type, c->count, c->count * c->whole, mask, span);
    long gap = -1;
    for (size_t i = 0; i < reach && gap < 0; i++)
        if (!mask[i]) gap = (long)i;
    const unsigned char value = GAP_VALUE;
    char what[160];
    snprintf(what, sizeof what, "%s count %d, %s", c->name, c->count, nonblocking ? "MPI_Ibcast" : "MPI_Bcast");
    if (rank == 0) {
        for (size_t i = 0; i < span; i++) got[i] = (unsigned char)(1 + i % 200);
        if (nonblocking) {
            MPI_Request r;
            PMPI_Ibcast(got, c->count, c->type, 0, MPI_COMM_WORLD, &r);
            PMPI_Wait(&r, MPI_STATUS_IGNORE);
        } else {
            PMPI_Bcast(got, c->count, c->type, 0, MPI_COMM_WORLD);
        }
        PMPI_Bcast(got, c->count, c->type, 0, MPI_COMM_WORLD); /* the reference */
    } else {
        struct buffer b = buffer_new(reach);
        memset(got, SENTINEL, span);
        buffer_write(&b, 0, got, reach);
        if (nonblocking) {
            MPI_Request r;
            MPI_Ibcast(b.p, c->count, c->type, 0, MPI_COMM_WORLD, &r);
            if (gap >= 0) buffer_write(&b, (size_t)gap, &value, 1);
            MPI_Wait(&r, MPI_STATUS_IGNORE);
        } else {
            if (gap >= 0) buffer_write(&b, (size_t)gap, &value, 1);
            MPI_Bcast(b.p, c->count, c->type, 0, MPI_COMM_WORLD);
        }
        memset(ref, SENTINEL, span);
        if (gap >= 0) ref[gap] = GAP_VALUE;
        PMPI_Bcast(ref, c->count, c->type, 0, MPI_COMM_WORLD);
        buffer_read(&b, got);
        CHECK(!memcmp(got, ref, reach), "%s: the buffer differs from the host MPI's", what);
        if (gap >= 0) CHECK(got[gap] == GAP_VALUE, "%s: the program's write into the gap at %ld was lost", what, gap);
        buffer_free(&b);
        cases_run++;
    }
    free(mask);
    free(ref);
    free(got);
}

/* Alltoallv of ints: each rank's block lands with a hole before it; the hole keeps what
 * the program wrote there. */
static void alltoallv_case(void)
{
    enum { N = 5, HOLE = 3 };
    int sendbuf[2 * N], counts[2] = {N, N}, sdispls[2] = {0, N}, rdispls[2] = {HOLE, 2 * HOLE + N};
    for (int i = 0; i < 2 * N; i++) sendbuf[i] = 1000 * rank + i;
    size_t bytes = (size_t)(2 * HOLE + 2 * N) * sizeof(int);
    struct buffer b = buffer_new(bytes);
    int *got = malloc(bytes), *ref = malloc(bytes);
    for (size_t i = 0; i < bytes / sizeof(int); i++) got[i] = ref[i] = -7 - (int)i; /* the holes: the program's */
    buffer_write(&b, 0, got, bytes);
    MPI_Alltoallv(sendbuf, counts, sdispls, MPI_INT, b.p, counts, rdispls, MPI_INT, MPI_COMM_WORLD);
    PMPI_Alltoallv(sendbuf, counts, sdispls, MPI_INT, ref, counts, rdispls, MPI_INT, MPI_COMM_WORLD);
    buffer_read(&b, got);
    CHECK(!memcmp(got, ref, bytes), "MPI_Alltoallv: the buffer (holes between the blocks) differs from the host MPI's");
    buffer_free(&b);
    free(got);
    free(ref);
    cases_run++;
}

/* A cancelled receive: nothing written, MPI_Test_cancelled as the host MPI says. */
static void cancel_case(const struct tcase *c)
{
    if (rank != 1) return;
    size_t span = span_of(c->type, c->count);
    struct buffer b = buffer_new(span);
    unsigned char *got = malloc(span), *ref = malloc(span);
    memset(got, SENTINEL, span);
    buffer_write(&b, 0, got, span);
    MPI_Request r, rr;
    MPI_Status staged, reference;
    MPI_Irecv(b.p, c->count, c->type, 0, TAG_NEVER, MPI_COMM_WORLD, &r);
    MPI_Cancel(&r);
    MPI_Wait(&r, &staged);
    memset(ref, SENTINEL, span);
    PMPI_Irecv(ref, c->count, c->type, 0, TAG_NEVER, MPI_COMM_WORLD, &rr);
    PMPI_Cancel(&rr);
    PMPI_Wait(&rr, &reference);
    int x1 = -1, x2 = -2;
    MPI_Test_cancelled(&staged, &x1);
    MPI_Test_cancelled(&reference, &x2);
    CHECK(x1 == x2 && x1, "%s: MPI_Test_cancelled %d, the host MPI's %d", c->name, x1, x2);
    buffer_read(&b, got);
    CHECK(!memcmp(got, ref, span), "%s: a cancelled receive wrote into the buffer", c->name);
    buffer_free(&b);
    free(got);
    free(ref);
    cases_run++;
}

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    int size;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    if (size != 2) {
        if (rank == 0) printf("FAIL: run on 2 ranks\n");
        MPI_Finalize();
        return 1;
    }
    device_mode = argc > 1 && !strcmp(argv[1], "device");
    if (device_mode && !cuda_load(rank, NULL, 0)) {
        printf("FAIL: device mode without a CUDA driver\n");
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    PMPI_Comm_dup(MPI_COMM_SELF, &self);
    struct tcase cases[] = {
        {"1024 irregular blocks", many_blocks(), 1, 0, {16, 400, 0}},
        {"indexed {1,0,1}", empty_block(), 1, 0, {8, 4, 0}},
        {"indexed {1,0,1}", empty_block(), 3, 0, {24, 20, 0}},
        {"struct int/double/char", gappy_struct(), 4, 0, {52, 38, 30, 0}},
        {"sparse vector, 1 MiB extent", sparse_vector(), 2, 0, {48, 32, 28, 0}},
        {"long double + int", long_double_struct(), 2, 0, {0}},
    };
    int ncases = (int)(sizeof cases / sizeof *cases);
    for (int i = 0; i < ncases; i++) {
        MPI_Type_commit(&cases[i].type);
        int s;
        PMPI_Type_size(cases[i].type, &s);
        cases[i].whole = s;
        if (!cases[i].bytes[0]) { /* whole elements and one basic element short */
            cases[i].bytes[0] = cases[i].count * s;
            cases[i].bytes[1] = s + (int)sizeof(long double);
        }
    }
    for (int i = 0; i < ncases; i++)
        for (int j = 0; j < 4 && cases[i].bytes[j]; j++) p2p_case(&cases[i], cases[i].bytes[j]);
    for (int i = 0; i < ncases; i++) {
        bcast_case(&cases[i], 0);
        bcast_case(&cases[i], 1);
    }
    alltoallv_case();
    cancel_case(&cases[0]);
    cancel_case(&cases[3]);

    long long (*stat)(const char *) = (long long (*)(const char *))dlsym(RTLD_DEFAULT, "commlib_stat");
    if (rank == 1)
        printf("stats: staged_recv=%lld staged_typed=%lld collective_staged=%lld\n",
               stat ? stat("p2p.staged_recv") : -1, stat ? stat("p2p.staged_typed") : -1,
               stat ? stat("collective.staged") : -1);
    int total = 0;
    MPI_Allreduce(&failures, &total, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    if (rank == 1) printf("checked %d cases (%d checks), failures=%d\n", cases_run, checks, total);
    for (int i = 0; i < ncases; i++) MPI_Type_free(&cases[i].type);
    PMPI_Comm_free(&self);
    MPI_Finalize();
    return total ? 1 : 0;
}
