/* Persistent requests, MPI_Isendrecv(_replace) and nonblocking collectives on buffers
 * commlib stages: device memory (argv[1] = "device": the CUDA driver from dlopen, a real
 * GPU or tests/c/fake_cuda.c) or host memory ("host": staged under COMMLIB_STAGE_HOST=1,
 * or run plainly to check the program itself).
 *
 * - persistent: Send_init / Ssend_init / Bsend_init / Rsend_init and Recv_init of a
 *   contiguous, a vector (packed path) and an irregular type (typed span path) around a
 *   ring, started ROUNDS times with different data each time, together with plain host
 *   persistent requests (MPI_BOTTOM buffers, never staged) in MPI_Startall, completed by
 *   each of the Wait/Test forms in turn; MPI_Request_free of inactive requests and of an
 *   active receive; MPI_Cancel of a started receive that nothing matches;
 * - isendrecv (MPI 4): MPI_Isendrecv with vector types next to a host request, a staged
 *   send with a host receive, MPI_Isendrecv_replace with the vector and the irregular type;
 * - collectives: Ibcast (vector type), Ireduce, Iallgather (and in place), Ialltoall,
 *   Ialltoallv (gaps between the blocks) and Ireduce_scatter_block, all in flight at once.
 * Every received buffer is compared with what the host MPI makes of the message
 * (PMPI_Pack + PMPI_Unpack of host copies) or with values computed here; the bytes the
 * types skip must keep their values.  Prints "rank R: FAIL ..." lines, "rank R: stats
 * ..." and "rank R: done checks=N failures=F"; exit status 1 on failure. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cuda_loader.h"

static int rank, size, left, right, device, checks, failures;
#define ROUNDS 12

#define CHECK(cond, ...)                                               \
    do {                                                               \
        checks++;                                                      \
        if (!(cond)) {                                                 \
            failures++;                                                \
            printf("rank %d: FAIL (line %d): ", rank, __LINE__);       \
            printf(__VA_ARGS__);                                       \
            printf("\n");                                              \
            fflush(stdout);                                            \
        }                                                              \
    } while (0)

static int load_cuda(void) { return cuda_load(rank, NULL, 0); }

/* Buffers of the kind under test; the program touches them only through these. */
static void *alloc(size_t n)
{
    if (!device) return malloc(n);
    CUdeviceptr p = 0;
    CHECK(cu.cuMemAlloc(&p, n) == 0, "cuMemAlloc");
    return (void *)(uintptr_t)p;
}
static void release(void *p)
{
    if (!device) free(p);
    else cu.cuMemFree((CUdeviceptr)(uintptr_t)p);
}
static void put(void *dst, const void *src, size_t n)
{
    if (!device) memcpy(dst, src, n);
    else CHECK(cu.cuMemcpyHtoD((CUdeviceptr)(uintptr_t)dst, src, n) == 0, "cuMemcpyHtoD");
}
static void get(void *dst, const void *src, size_t n)
{
    if (!device) memcpy(dst, src, n);
    else CHECK(cu.cuMemcpyDtoH(dst, (CUdeviceptr)(uintptr_t)src, n) == 0, "cuMemcpyDtoH");
}

static unsigned char *pattern(size_t n, int seed)
{
    unsigned char *p = malloc(n);
    for (size_t i = 0; i < n; i++) p[i] = (unsigned char)(seed * 37 + i * 11 + 1);
    return p;
}

/* A staged buffer holding pattern(seed). */
static void *filled(size_t n, int seed)
{
    unsigned char *host = pattern(n, seed);
    void *p = alloc(n);
    put(p, host, n);
    free(host);
    return p;
}

enum { T_CONTIG, T_VECTOR, T_HOLEY, NTYPES };
static struct { const char *name; MPI_Datatype type; int count; size_t bytes; } types[NTYPES];

static void make_types(void)
{
    MPI_Datatype vector, holey;
    MPI_Type_vector(4, 2, 3, MPI_INT, &vector); /* gaps of one int */
    /* a zero-length block: commlib leaves the type to the host MPI (the typed span path) */
    int lengths[3] = {2, 0, 3}, offsets[3] = {0, 4, 7};
    MPI_Type_indexed(3, lengths, offsets, MPI_INT, &holey);
    MPI_Type_commit(&vector);
    MPI_Type_commit(&holey);
    types[T_CONTIG].name = "contig", types[T_CONTIG].type = MPI_INT, types[T_CONTIG].count = 64;
    types[T_VECTOR].name = "vector", types[T_VECTOR].type = vector, types[T_VECTOR].count = 3;
    types[T_HOLEY].name = "holey", types[T_HOLEY].type = holey, types[T_HOLEY].count = 3;
    for (int t = 0; t < NTYPES; t++) {
        MPI_Aint lb, extent;
        MPI_Type_get_extent(types[t].type, &lb, &extent);
        types[t].bytes = (size_t)(types[t].count * extent + 16);
    }
}

/* What the host MPI leaves in a buffer of type t holding pattern(base_seed) after
 * receiving count elements of t made from pattern(seed). */
static unsigned char *expected(int t, int count, int seed, int base_seed)
{
    unsigned char *src = pattern(types[t].bytes, seed), *out = pattern(types[t].bytes, base_seed);
    int packed_size, position = 0, back = 0;
    PMPI_Pack_size(count, types[t].type, MPI_COMM_WORLD, &packed_size);
    char *packed = malloc((size_t)packed_size + 1);
    PMPI_Pack(src, count, types[t].type, packed, packed_size, &position, MPI_COMM_WORLD);
    PMPI_Unpack(packed, position, &back, out, count, types[t].type, MPI_COMM_WORLD);
    free(src);
    free(packed);
    return out;
}

static void verify(const char *what, int t, const void *buf, int seed, int base_seed)
{
    unsigned char *got = malloc(types[t].bytes), *want = expected(t, types[t].count, seed, base_seed);
    get(got, buf, types[t].bytes);
    CHECK(!memcmp(got, want, types[t].bytes), "%s %s: received data differs", what, types[t].name);
    free(got);
    free(want);
}

/* A host message that commlib never stages: MPI_BOTTOM with the absolute address of ints. */
static MPI_Datatype absolute(int *ints, int n)
{
    MPI_Aint address;
    MPI_Get_address(ints, &address);
    MPI_Datatype type;
    MPI_Type_create_hindexed(1, &n, &address, MPI_INT, &type);
    MPI_Type_commit(&type);
    return type;
}

static int seed_of(int from, int round, int t) { return from * 1000 + round * 7 + t; }

/* Completes the n requests by the completion call of `way`; a persistent request that
 * completed stays non-null, so the test forms loop on the set of those not yet seen. */
static void complete_all(int way, int n, MPI_Request *reqs, MPI_Status *statuses)
{
    int done[8] = {0}, ndone = 0, index, flag, outcount, indices[8];
    MPI_Status st[8];
    switch (way % 7) {
    case 0: MPI_Waitall(n, reqs, statuses); return;
    case 1:
        while (ndone < n) {
            CHECK(MPI_Testany(n, reqs, &index, &flag, &st[0]) == MPI_SUCCESS, "Testany");
            if (!flag) continue;
            if (index == MPI_UNDEFINED) break; /* nothing active left */
            CHECK(!done[index], "Testany returned request %d twice", index);
            done[index] = 1, ndone++;
            statuses[index] = st[0];
        }
        break;
    case 2:
        while (ndone < n) {
            CHECK(MPI_Waitsome(n, reqs, &outcount, indices, st) == MPI_SUCCESS, "Waitsome");
            if (outcount == MPI_UNDEFINED) break;
            for (int k = 0; k < outcount; k++) done[indices[k]] = 1, ndone++, statuses[indices[k]] = st[k];
        }
        break;
    case 3:
        for (flag = 0; !flag;) CHECK(MPI_Testall(n, reqs, &flag, statuses) == MPI_SUCCESS, "Testall");
        return;
    case 4:
        for (int i = n - 1; i >= 0; i--) MPI_Wait(&reqs[i], &statuses[i]);
        return;
    case 5:
        while (ndone < n) {
            CHECK(MPI_Testsome(n, reqs, &outcount, indices, st) == MPI_SUCCESS, "Testsome");
            if (outcount == MPI_UNDEFINED) break;
            for (int k = 0; k < outcount; k++) done[indices[k]] = 1, ndone++, statuses[indices[k]] = st[k];
        }
        break;
    default:
        for (int i = 0; i < n; i++)
            for (flag = 0; !flag;) MPI_Test(&reqs[i], &flag, &statuses[i]);
        return;
    }
    CHECK(ndone == n, "completion way %d saw %d of %d requests", way % 7, ndone, n);
}

static void test_persistent(void)
{
    char *attached = malloc(1 << 20);
    MPI_Buffer_attach(attached, 1 << 20);
    for (int t = 0; t < NTYPES; t++) {
        void *sbuf = alloc(types[t].bytes), *rbuf = alloc(types[t].bytes);
        int hs[4], hr[4];
        MPI_Datatype hs_type = absolute(hs, 4), hr_type = absolute(hr, 4);
        MPI_Request reqs[4];
        int count = types[t].count, tag = 10 + t;
        /* a different send mode per type; the standard-mode one also for the ring's host pair */
        if (t == T_CONTIG) MPI_Send_init(sbuf, count, types[t].type, right, tag, MPI_COMM_WORLD, &reqs[0]);
        else if (t == T_VECTOR) MPI_Ssend_init(sbuf, count, types[t].type, right, tag, MPI_COMM_WORLD, &reqs[0]);
        else MPI_Bsend_init(sbuf, count, types[t].type, right, tag, MPI_COMM_WORLD, &reqs[0]);
        MPI_Recv_init(rbuf, count, types[t].type, left, tag, MPI_COMM_WORLD, &reqs[1]);
        MPI_Send_init(MPI_BOTTOM, 1, hs_type, right, 20 + t, MPI_COMM_WORLD, &reqs[2]);
        MPI_Recv_init(MPI_BOTTOM, 1, hr_type, left, 20 + t, MPI_COMM_WORLD, &reqs[3]);
        for (int round = 0; round < ROUNDS; round++) {
            unsigned char *data = pattern(types[t].bytes, seed_of(rank, round, t));
            put(sbuf, data, types[t].bytes);
            free(data);
            unsigned char *base = pattern(types[t].bytes, 500 + round); /* the receive's gaps */
            put(rbuf, base, types[t].bytes);
            free(base);
            hs[0] = rank, hs[1] = round, hs[2] = t, hs[3] = 42;
            hr[0] = hr[1] = hr[2] = hr[3] = -1;
            if (round % 2) MPI_Startall(4, reqs);
            else for (int i = 3; i >= 0; i--) MPI_Start(&reqs[i]);
            MPI_Status statuses[4];
            complete_all(round + t, 4, reqs, statuses);
            char what[64];
            snprintf(what, sizeof what, "persistent round %d way %d", round, (round + t) % 7);
            verify(what, t, rbuf, seed_of(left, round, t), 500 + round);
            CHECK(hr[0] == left && hr[1] == round && hr[2] == t && hr[3] == 42, "%s: host request data", what);
            int n = -1;
            MPI_Get_count(&statuses[1], types[t].type, &n);
            CHECK(statuses[1].MPI_SOURCE == left && statuses[1].MPI_TAG == tag && n == count,
                  "%s: status source %d tag %d count %d", what, statuses[1].MPI_SOURCE, statuses[1].MPI_TAG, n);
            for (int i = 0; i < 4; i++) CHECK(reqs[i] != MPI_REQUEST_NULL, "%s: persistent request %d freed", what, i);
        }
        for (int i = 0; i < 4; i++) { /* inactive: freed at once */
            CHECK(MPI_Request_free(&reqs[i]) == MPI_SUCCESS && reqs[i] == MPI_REQUEST_NULL, "Request_free %d", i);
        }
        MPI_Type_free(&hs_type);
        MPI_Type_free(&hr_type);
        release(sbuf);
        release(rbuf);
    }
    int bytes;
    MPI_Buffer_detach(&attached, &bytes);
    free(attached);

    /* The program may free a type once its persistent requests exist. */
    {
        MPI_Datatype dup;
        MPI_Type_dup(types[T_VECTOR].type, &dup);
        void *sb = alloc(types[T_VECTOR].bytes), *rb = alloc(types[T_VECTOR].bytes);
        MPI_Request pair[2];
        MPI_Recv_init(rb, types[T_VECTOR].count, dup, left, 31, MPI_COMM_WORLD, &pair[0]);
        MPI_Send_init(sb, types[T_VECTOR].count, dup, right, 31, MPI_COMM_WORLD, &pair[1]);
        MPI_Type_free(&dup);
        for (int round = 0; round < 3; round++) {
            unsigned char *data = pattern(types[T_VECTOR].bytes, seed_of(rank, round, 31));
            put(sb, data, types[T_VECTOR].bytes);
            free(data);
            unsigned char *base = pattern(types[T_VECTOR].bytes, 31);
            put(rb, base, types[T_VECTOR].bytes);
            free(base);
            MPI_Startall(2, pair);
            MPI_Waitall(2, pair, MPI_STATUSES_IGNORE);
            verify("persistent with its type freed", T_VECTOR, rb, seed_of(left, round, 31), 31);
        }
        MPI_Request_free(&pair[0]);
        MPI_Request_free(&pair[1]);
        release(sb);
        release(rb);
    }

    /* Ready mode: the receive is started before the barrier, the ready send after it. */
    void *sbuf = alloc(types[T_CONTIG].bytes), *rbuf = alloc(types[T_CONTIG].bytes);
    MPI_Request reqs[2];
    MPI_Rsend_init(sbuf, types[T_CONTIG].count, MPI_INT, right, 30, MPI_COMM_WORLD, &reqs[0]);
    MPI_Recv_init(rbuf, types[T_CONTIG].count, MPI_INT, left, 30, MPI_COMM_WORLD, &reqs[1]);
    for (int round = 0; round < 3; round++) {
        unsigned char *data = pattern(types[T_CONTIG].bytes, seed_of(rank, round, 9));
        put(sbuf, data, types[T_CONTIG].bytes);
        free(data);
        unsigned char *base = pattern(types[T_CONTIG].bytes, 700 + round);
        put(rbuf, base, types[T_CONTIG].bytes);
        free(base);
        MPI_Start(&reqs[1]);
        MPI_Barrier(MPI_COMM_WORLD);
        MPI_Start(&reqs[0]);
        MPI_Waitall(2, reqs, MPI_STATUSES_IGNORE);
        verify("persistent ready send", T_CONTIG, rbuf, seed_of(left, round, 9), 700 + round);
    }
    MPI_Request_free(&reqs[0]);
    MPI_Request_free(&reqs[1]);

    /* MPI_Cancel of a started receive nothing matches: cancelled, buffer untouched, and
     * the request starts again afterwards. */
    MPI_Request cancelled;
    unsigned char *base = pattern(types[T_VECTOR].bytes, 77);
    void *cbuf = alloc(types[T_VECTOR].bytes);
    put(cbuf, base, types[T_VECTOR].bytes);
    MPI_Recv_init(cbuf, types[T_VECTOR].count, types[T_VECTOR].type, left, 98, MPI_COMM_WORLD, &cancelled);
    MPI_Start(&cancelled);
    MPI_Cancel(&cancelled);
    MPI_Status status;
    MPI_Wait(&cancelled, &status);
    int was_cancelled = 0;
    MPI_Test_cancelled(&status, &was_cancelled);
    CHECK(was_cancelled, "persistent receive not cancelled");
    verify("cancelled persistent receive leaves the buffer", T_VECTOR, cbuf, 77, 77);
    free(base);

    /* MPI_Request_free of an active receive: the message still lands in the buffer. */
    MPI_Request freed, send;
    unsigned char *data = pattern(types[T_VECTOR].bytes, seed_of(rank, 99, 1));
    put(sbuf, data, types[T_VECTOR].bytes);
    free(data);
    MPI_Start(&cancelled); /* reused after the cancel: matches the send below */
    MPI_Recv_init(rbuf, types[T_VECTOR].count, types[T_VECTOR].type, left, 97, MPI_COMM_WORLD, &freed);
    MPI_Start(&freed);
    MPI_Request_free(&freed);
    CHECK(freed == MPI_REQUEST_NULL, "Request_free of an active persistent request");
    MPI_Barrier(MPI_COMM_WORLD);
    MPI_Send_init(sbuf, types[T_VECTOR].count, types[T_VECTOR].type, right, 97, MPI_COMM_WORLD, &send);
    MPI_Start(&send);
    MPI_Wait(&send, MPI_STATUS_IGNORE);
    MPI_Request_free(&send);
    MPI_Send(sbuf, types[T_VECTOR].count, types[T_VECTOR].type, right, 98, MPI_COMM_WORLD);
    MPI_Wait(&cancelled, MPI_STATUS_IGNORE);
    MPI_Request_free(&cancelled);
    verify("persistent receive restarted after a cancel", T_VECTOR, cbuf, seed_of(left, 99, 1), 77);
    /* rbuf last held the ready-mode rounds' message over pattern 702 */
    unsigned char *want = expected(T_CONTIG, types[T_CONTIG].count, seed_of(left, 2, 9), 702), *over = want;
    want = malloc(types[T_VECTOR].bytes);
    {
        unsigned char *src = pattern(types[T_VECTOR].bytes, seed_of(left, 99, 1));
        int packed_size, position = 0, back = 0;
        PMPI_Pack_size(types[T_VECTOR].count, types[T_VECTOR].type, MPI_COMM_WORLD, &packed_size);
        char *packed = malloc((size_t)packed_size);
        PMPI_Pack(src, types[T_VECTOR].count, types[T_VECTOR].type, packed, packed_size, &position, MPI_COMM_WORLD);
        PMPI_Unpack(packed, position, &back, over, types[T_VECTOR].count, types[T_VECTOR].type, MPI_COMM_WORLD);
        memcpy(want, over, types[T_VECTOR].bytes);
        free(src), free(packed), free(over);
    }
    unsigned char *got = malloc(types[T_VECTOR].bytes);
    int arrived = 0;
    for (time_t end = time(NULL) + 20; !arrived && time(NULL) < end;) {
        MPI_Request none = MPI_REQUEST_NULL;
        int flag;
        MPI_Test(&none, &flag, MPI_STATUS_IGNORE); /* any MPI call moves the freed receive along */
        get(got, rbuf, types[T_VECTOR].bytes);
        arrived = !memcmp(got, want, types[T_VECTOR].bytes);
    }
    CHECK(arrived, "the freed active persistent receive never reached the buffer");
    free(want);
    free(got);
    MPI_Barrier(MPI_COMM_WORLD);
    release(sbuf);
    release(rbuf);
    release(cbuf);
}

#if MPI_VERSION >= 4
/* The status of an Isendrecv is its receive's.  Checked only where commlib staged the
 * call, and so is the data of Isendrecv_replace with a non-contiguous type: MPICH 5.0's
 * own MPI_Isendrecv leaves the status unset, and its MPI_Isendrecv_replace of a
 * vector(2, 1, 2) of ints {10, 1, 12, 3} receiving {0, 11, 2, 13} leaves {10, 1, 0, 3}. */
static int status_checked;

static void test_isendrecv(void)
{
    status_checked = device || (dlsym(RTLD_DEFAULT, "commlib_stat") && getenv("COMMLIB_STAGE_HOST") &&
                                !strcmp(getenv("COMMLIB_STAGE_HOST"), "1"));
    int t = T_VECTOR, count = types[t].count;
    void *sbuf = alloc(types[t].bytes), *rbuf = alloc(types[t].bytes);
    for (int round = 0; round < 7; round++) {
        unsigned char *data = pattern(types[t].bytes, seed_of(rank, round, 40));
        put(sbuf, data, types[t].bytes);
        free(data);
        unsigned char *base = pattern(types[t].bytes, 600 + round);
        put(rbuf, base, types[t].bytes);
        free(base);
        int hs = rank * 10 + round, hr = -1;
        MPI_Request reqs[3];
        MPI_Status statuses[3];
        /* the program's Isendrecv among plain host requests */
        MPI_Datatype hs_type = absolute(&hs, 1), hr_type = absolute(&hr, 1);
        MPI_Irecv(MPI_BOTTOM, 1, hr_type, left, 41, MPI_COMM_WORLD, &reqs[0]);
        MPI_Isendrecv(sbuf, count, types[t].type, right, 40, rbuf, count, types[t].type, left, 40, MPI_COMM_WORLD,
                      &reqs[1]);
        MPI_Isend(MPI_BOTTOM, 1, hs_type, right, 41, MPI_COMM_WORLD, &reqs[2]);
        complete_all(round, 3, reqs, statuses);
        MPI_Type_free(&hs_type);
        MPI_Type_free(&hr_type);
        char what[64];
        snprintf(what, sizeof what, "isendrecv round %d way %d", round, round % 7);
        verify(what, t, rbuf, seed_of(left, round, 40), 600 + round);
        CHECK(hr == left * 10 + round, "%s: host receive %d", what, hr);
        for (int i = 0; i < 3; i++) CHECK(reqs[i] == MPI_REQUEST_NULL, "%s: request %d not freed", what, i);
        int n = -1;
        MPI_Get_count(&statuses[1], types[t].type, &n);
        CHECK(!status_checked || (statuses[1].MPI_SOURCE == left && statuses[1].MPI_TAG == 40 && n == count),
              "%s: status source %d tag %d count %d", what, statuses[1].MPI_SOURCE, statuses[1].MPI_TAG, n);
    }
    /* staged send, host receive (MPI_BOTTOM): the entry only carries the send half */
    int got[4] = {-1, -1, -1, -1};
    MPI_Datatype got_type = absolute(got, 4);
    int mine[4] = {rank, 7, 8, 9};
    void *small = alloc(sizeof mine);
    put(small, mine, sizeof mine);
    MPI_Request request;
    MPI_Isendrecv(small, 4, MPI_INT, right, 42, MPI_BOTTOM, 1, got_type, left, 42, MPI_COMM_WORLD, &request);
    int flag = 0;
    while (!flag) MPI_Test(&request, &flag, MPI_STATUS_IGNORE);
    CHECK(got[0] == left && got[1] == 7 && got[3] == 9, "isendrecv into a host buffer: %d %d", got[0], got[3]);
    MPI_Type_free(&got_type);
    release(small);
    /* replace, through the packed and the typed path */
    for (t = T_VECTOR; t <= T_HOLEY; t++) {
        void *buf = filled(types[t].bytes, seed_of(rank, 50, t));
        MPI_Status status;
        MPI_Isendrecv_replace(buf, types[t].count, types[t].type, right, 50, left, 50, MPI_COMM_WORLD, &request);
        if (t == T_HOLEY) { /* finished by MPI_Request_get_status, freed by MPI_Wait */
            for (flag = 0; !flag;) MPI_Request_get_status(request, &flag, &status);
            MPI_Wait(&request, MPI_STATUS_IGNORE);
        } else {
            for (flag = 0; !flag;) MPI_Test(&request, &flag, &status);
        }
        if (status_checked) verify("isendrecv_replace", t, buf, seed_of(left, 50, t), seed_of(rank, 50, t));
        CHECK(!status_checked || status.MPI_SOURCE == left, "isendrecv_replace status source %d", status.MPI_SOURCE);
        release(buf);
    }
    release(sbuf);
    release(rbuf);
}

/* An Isendrecv whose receive completes long before its send (4 MiB: not buffered by the
 * MPI, so the send completes only once rank 1 receives it, after 300 ms) must not read
 * as complete before: rank 0 tests it through MPI_Testany next to a null request, then
 * waits in MPI_Waitany next to a request whose completion rank 1 needs to hear of. */
static void test_isendrecv_waits_for_its_send(void)
{
    int n = 1 << 19;
    size_t bytes = sizeof(double) * (size_t)n;
    if (rank <= 1 && size > 1) {
        double *host = malloc(bytes);
        int small[4] = {11, 12, 13, 14}, got[4] = {0};
        void *big = alloc(bytes), *four = alloc(sizeof small);
        if (rank == 0) {
            for (int i = 0; i < n; i++) host[i] = i * 0.5;
            put(big, host, bytes);
            MPI_Request reqs[2] = {MPI_REQUEST_NULL, MPI_REQUEST_NULL};
            MPI_Status status;
            double start = MPI_Wtime();
            MPI_Isendrecv(big, n, MPI_DOUBLE, 1, 60, four, 4, MPI_INT, 1, 61, MPI_COMM_WORLD, &reqs[1]);
            int index = -1, flag = 0, early = 0;
            while (!flag) {
                MPI_Testany(2, reqs, &index, &flag, &status);
                early += flag && index != 1;
            }
            double elapsed = MPI_Wtime() - start;
            CHECK(!early && index == 1, "Testany of a pending Isendrecv: index %d early %d", index, early);
            CHECK(elapsed > 0.25, "the Isendrecv completed after %.3f s, before its send could", elapsed);
            get(got, four, sizeof got);
            CHECK(got[0] == 11 && got[3] == 14, "Isendrecv receive %d %d", got[0], got[3]);
            CHECK(!status_checked || (status.MPI_SOURCE == 1 && status.MPI_TAG == 61), "status %d %d",
                  status.MPI_SOURCE, status.MPI_TAG);
            /* MPI_Waitany must return the other request first: rank 1 receives the big
             * message only after rank 0 answers the host message. */
            int note = -1, go = 1;
            MPI_Datatype note_type = absolute(&note, 1), go_type = absolute(&go, 1);
            MPI_Irecv(MPI_BOTTOM, 1, note_type, 1, 62, MPI_COMM_WORLD, &reqs[0]);
            MPI_Isendrecv(big, n, MPI_DOUBLE, 1, 60, four, 4, MPI_INT, 1, 61, MPI_COMM_WORLD, &reqs[1]);
            MPI_Waitany(2, reqs, &index, &status);
            CHECK(index == 0 && note == 62, "Waitany returned %d (note %d) before the other request", index, note);
            MPI_Send(MPI_BOTTOM, 1, go_type, 1, 63, MPI_COMM_WORLD);
            MPI_Waitany(2, reqs, &index, &status);
            CHECK(index == 1, "second Waitany returned %d", index);
            MPI_Type_free(&note_type);
            MPI_Type_free(&go_type);
        } else {
            put(four, small, sizeof small);
            for (int phase = 0; phase < 2; phase++) {
                /* synchronous: the pause starts only once rank 0 posted its Isendrecv */
                MPI_Ssend(four, 4, MPI_INT, 0, 61, MPI_COMM_WORLD);
                if (phase == 0) {
                    struct timespec pause = {0, 300 * 1000 * 1000};
                    nanosleep(&pause, NULL);
                } else {
                    int note = 62, go = 0;
                    MPI_Datatype note_type = absolute(&note, 1), go_type = absolute(&go, 1);
                    MPI_Send(MPI_BOTTOM, 1, note_type, 0, 62, MPI_COMM_WORLD);
                    MPI_Recv(MPI_BOTTOM, 1, go_type, 0, 63, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
                    MPI_Type_free(&note_type);
                    MPI_Type_free(&go_type);
                }
                MPI_Recv(big, n, MPI_DOUBLE, 0, 60, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
                get(host, big, bytes);
                CHECK(host[1] == 0.5 && host[n - 1] == (n - 1) * 0.5, "the Isendrecv's send half (%d)", phase);
            }
        }
        release(big);
        release(four);
        free(host);
    }
    MPI_Barrier(MPI_COMM_WORLD);
}
#endif

static int *ints_of(const void *buf, int n)
{
    int *h = malloc(sizeof(int) * (size_t)n);
    get(h, buf, sizeof(int) * (size_t)n);
    return h;
}

static void *ints_filled(int n, int (*value)(int), int *scratch)
{
    for (int i = 0; i < n; i++) scratch[i] = value(i);
    void *p = alloc(sizeof(int) * (size_t)n);
    put(p, scratch, sizeof(int) * (size_t)n);
    return p;
}

static int minus_one(int i) { (void)i; return -1; }
static int mine(int i) { return rank * 100 + i; }

static void test_collectives(void)
{
    int n = 16, *scratch = malloc(sizeof(int) * (size_t)(64 * size + 64)), root = size - 1;
    MPI_Request reqs[7];
    /* Ibcast of a vector type from the last rank: the gaps keep each rank's own bytes */
    void *bc = filled(types[T_VECTOR].bytes, rank == root ? 900 : 800 + rank);
    MPI_Ibcast(bc, types[T_VECTOR].count, types[T_VECTOR].type, root, MPI_COMM_WORLD, &reqs[0]);
    /* Ireduce (sum) to rank 0; the others' receive buffers stay as they were */
    void *rsend = ints_filled(n, mine, scratch), *rrecv = ints_filled(n, minus_one, scratch);
    MPI_Ireduce(rsend, rrecv, n, MPI_INT, MPI_SUM, 0, MPI_COMM_WORLD, &reqs[1]);
    /* Iallgather, and in place */
    void *gsend = ints_filled(3, mine, scratch), *grecv = ints_filled(3 * size, minus_one, scratch);
    MPI_Iallgather(gsend, 3, MPI_INT, grecv, 3, MPI_INT, MPI_COMM_WORLD, &reqs[2]);
    for (int i = 0; i < 3 * size; i++) scratch[i] = i / 3 == rank ? rank * 100 + i % 3 : -1;
    void *gplace = alloc(sizeof(int) * (size_t)(3 * size));
    put(gplace, scratch, sizeof(int) * (size_t)(3 * size));
    MPI_Iallgather(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, gplace, 3, MPI_INT, MPI_COMM_WORLD, &reqs[3]);
    /* Ialltoall: two ints to every rank */
    void *asend = ints_filled(2 * size, mine, scratch), *arecv = ints_filled(2 * size, minus_one, scratch);
    MPI_Ialltoall(asend, 2, MPI_INT, arecv, 2, MPI_INT, MPI_COMM_WORLD, &reqs[4]);
    /* Ialltoallv: rank r sends r+1 ints to everyone, received with a gap of one after each block */
    int *sc = malloc(sizeof(int) * (size_t)size), *sd = malloc(sizeof(int) * (size_t)size);
    int *rc = malloc(sizeof(int) * (size_t)size), *rd = malloc(sizeof(int) * (size_t)size), total = 0;
    for (int r = 0; r < size; r++) sc[r] = rank + 1, sd[r] = 0, rc[r] = r + 1, rd[r] = total, total += r + 2;
    void *vsend = ints_filled(rank + 1, mine, scratch), *vrecv = ints_filled(total, minus_one, scratch);
    MPI_Ialltoallv(vsend, sc, sd, MPI_INT, vrecv, rc, rd, MPI_INT, MPI_COMM_WORLD, &reqs[5]);
    /* Ireduce_scatter_block: 2 * size ints in, the sum of one block of 2 out */
    void *ssend = ints_filled(2 * size, mine, scratch), *srecv = ints_filled(2, minus_one, scratch);
    MPI_Ireduce_scatter_block(ssend, srecv, 2, MPI_INT, MPI_SUM, MPI_COMM_WORLD, &reqs[6]);
    MPI_Waitall(3, reqs, MPI_STATUSES_IGNORE);
    for (int flag = 0; !flag;) MPI_Testall(4, reqs + 3, &flag, MPI_STATUSES_IGNORE);
    /* in place: Ireduce at the root, Ireduce_scatter_block (input: 2 * size ints of recvbuf) */
    void *rplace = ints_filled(n, mine, scratch), *splace = ints_filled(2 * size, mine, scratch);
    if (rank == 0) MPI_Ireduce(MPI_IN_PLACE, rplace, n, MPI_INT, MPI_SUM, 0, MPI_COMM_WORLD, &reqs[0]);
    else MPI_Ireduce(rplace, NULL, n, MPI_INT, MPI_SUM, 0, MPI_COMM_WORLD, &reqs[0]);
    MPI_Ireduce_scatter_block(MPI_IN_PLACE, splace, 2, MPI_INT, MPI_SUM, MPI_COMM_WORLD, &reqs[1]);
    MPI_Waitall(2, reqs, MPI_STATUSES_IGNORE);

    verify("ibcast", T_VECTOR, bc, 900, rank == root ? 900 : 800 + rank);
    int *h = ints_of(rrecv, n), ok = 1, tri = size * (size - 1) / 2;
    for (int i = 0; i < n; i++) ok &= h[i] == (rank == 0 ? 100 * tri + size * i : -1);
    CHECK(ok, "ireduce");
    free(h);
    h = ints_of(grecv, 3 * size), ok = 1;
    for (int i = 0; i < 3 * size; i++) ok &= h[i] == (i / 3) * 100 + i % 3;
    CHECK(ok, "iallgather");
    free(h);
    h = ints_of(gplace, 3 * size), ok = 1;
    for (int i = 0; i < 3 * size; i++) ok &= h[i] == (i / 3) * 100 + i % 3;
    CHECK(ok, "iallgather in place");
    free(h);
    h = ints_of(arecv, 2 * size), ok = 1;
    for (int r = 0; r < size; r++) ok &= h[2 * r] == r * 100 + 2 * rank && h[2 * r + 1] == r * 100 + 2 * rank + 1;
    CHECK(ok, "ialltoall");
    free(h);
    h = ints_of(vrecv, total), ok = 1;
    for (int r = 0; r < size; r++) {
        for (int i = 0; i <= r; i++) ok &= h[rd[r] + i] == r * 100 + i;
        ok &= h[rd[r] + r + 1] == -1; /* the gap */
    }
    CHECK(ok, "ialltoallv");
    free(h);
    h = ints_of(srecv, 2);
    CHECK(h[0] == 100 * tri + size * 2 * rank && h[1] == 100 * tri + size * (2 * rank + 1), "ireduce_scatter_block");
    free(h);
    h = ints_of(rplace, n), ok = 1;
    for (int i = 0; i < n; i++) ok &= h[i] == (rank == 0 ? 100 * tri + size * i : rank * 100 + i);
    CHECK(ok, "ireduce in place");
    free(h);
    h = ints_of(splace, 2 * size);
    CHECK(h[0] == 100 * tri + size * 2 * rank && h[1] == 100 * tri + size * (2 * rank + 1),
          "ireduce_scatter_block in place");
    free(h);
    void *all[] = {bc, rsend, rrecv, gsend, grecv, gplace, asend, arecv, vsend, vrecv, ssend, srecv, rplace, splace};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) release(all[i]);
    free(sc), free(sd), free(rc), free(rd), free(scratch);
}

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    left = (rank + size - 1) % size, right = (rank + 1) % size;
    device = argc > 1 && !strcmp(argv[1], "device");
    if (device && !load_cuda()) {
        if (rank == 0) printf("requests_staged: skipped (no CUDA device)\n");
        MPI_Finalize();
        return 0;
    }
    make_types();
    test_persistent();
#if MPI_VERSION >= 4
    test_isendrecv();
    test_isendrecv_waits_for_its_send();
#else
    if (rank == 0) printf("requests_staged: isendrecv skipped (MPI %d)\n", MPI_VERSION);
#endif
    test_collectives();
    long long (*stat)(const char *) = (long long (*)(const char *))dlsym(RTLD_DEFAULT, "commlib_stat");
    if (stat)
        printf("rank %d: stats staged_send=%lld staged_recv=%lld staged_typed=%lld collective=%lld\n", rank,
               stat("p2p.staged_send"), stat("p2p.staged_recv"), stat("p2p.staged_typed"), stat("collective.staged"));
    MPI_Type_free(&types[T_VECTOR].type);
    MPI_Type_free(&types[T_HOLEY].type);
    printf("rank %d: done checks=%d failures=%d\n", rank, checks, failures);
    MPI_Finalize();
    return failures ? 1 : 0;
}
