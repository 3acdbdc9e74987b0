/* Point-to-point on every path commlib's staging touches: blocking and nonblocking
 * sends and receives of contiguous, vector, subarray, struct and an irregular (holey)
 * type, Sendrecv, mixed request arrays for every completion call, statuses
 * (MPI_Get_count / MPI_Get_elements, also for short and partial messages), truncation,
 * MPI_Request_free, MPI_Cancel and MPI_Request_get_status.
 *
 * Runs with an even number of ranks; rank r talks to r ^ 1 (and around the ring).  Every
 * received buffer is compared with what the host MPI itself makes of the message
 * (PMPI_Pack + PMPI_Unpack of the sender's data), and each rank prints one line per
 * check ("rank R: NNN what: hash=..."), which must be the same with and without
 * COMMLIB_STAGE_HOST and without the interposer.  "stats:" lines say whether staging ran.
 * Exit status 1 when any check failed. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <mpi.h>
#include <pthread.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAXCOUNT 10 /* every buffer holds this many elements of its type */
#define SENTINEL 0xEE

static int rank, nranks, partner, failures, line_no;
static FILE *log_out; /* stdout, or one file per rank (argv[1] PREFIX: PREFIX.RANK) so lines never interleave */

#define CHECK(cond, ...)                                                 \
    do {                                                                 \
        if (!(cond)) {                                                   \
            fprintf(log_out, "rank %d: FAIL (line %d): ", rank, __LINE__);   \
            fprintf(log_out, __VA_ARGS__);                                   \
            fprintf(log_out, "\n");                                          \
            failures++;                                                  \
        }                                                                \
    } while (0)

static void report(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void report(const char *fmt, ...)
{
    char text[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    fprintf(log_out, "rank %d: %03d %s\n", rank, line_no++, text);
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
    int count;    /* elements sent in the exchanges */
    int elements; /* basic elements per element (MPI_Get_elements) */
    size_t bytes; /* buffer size: MAXCOUNT elements */
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
    /* a zero-length block: commlib leaves this type to the host MPI (the typed path) */
    int lengths[3] = {2, 0, 3}, offsets[3] = {0, 4, 7};
    MPI_Type_indexed(3, lengths, offsets, MPI_INT, &holey);
    struct tcase all[NTYPES] = {
        {"contig", MPI_DOUBLE, 40, 1, 0},       {"vector", vector, 3, 24, 0},
        {"subarray", subarray, 2, 12, 0},       {"struct", item_resized, 5, 4, 0},
        {"holey", holey, 3, 5, 0},
    };
    for (int t = 0; t < NTYPES; t++) {
        if (t != T_CONTIG) MPI_Type_commit(&all[t].type);
        MPI_Aint lb, extent;
        MPI_Type_get_extent(all[t].type, &lb, &extent);
        all[t].bytes = (size_t)((all[t].count > MAXCOUNT ? all[t].count : MAXCOUNT) * extent + 16);
        types[t] = all[t];
    }
}

static void free_types(void)
{
    for (int t = 1; t < NTYPES; t++) MPI_Type_free(&types[t].type);
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
    memset(p, SENTINEL, bytes);
    return p;
}

static unsigned hash(const void *p, size_t n)
{
    unsigned h = 2166136261u;
    for (size_t i = 0; i < n; i++) h = (h ^ ((const unsigned char *)p)[i]) * 16777619u;
    return h;
}

static int seed_of(int sender, int test) { return sender * 101 + test * 7; }

/* What the host MPI puts in a sentinel-filled receive buffer of type rt when `sender`
 * sends `count` elements of type st filled with the pattern of `seed`. */
static char *expected_over(int st, int count, int rt, int seed, int base_seed)
{
    char *src = pattern(types[st].bytes, seed);
    char *out = base_seed < 0 ? sentinel(types[rt].bytes) : pattern(types[rt].bytes, base_seed);
    int size, position = 0, back = 0;
    PMPI_Pack_size(count, types[st].type, MPI_COMM_WORLD, &size);
    char *packed = malloc((size_t)size + 1);
    PMPI_Pack(src, count, types[st].type, packed, size, &position, MPI_COMM_WORLD);
    int rsize;
    PMPI_Type_size(types[rt].type, &rsize);
    PMPI_Unpack(packed, position, &back, out, position / rsize, types[rt].type, MPI_COMM_WORLD);
    free(src);
    free(packed);
    return out;
}

static char *expected(int st, int count, int rt, int seed) { return expected_over(st, count, rt, seed, -1); }

/* Compares a received buffer (and its status, when there is one) with the host MPI's. */
static void verify(const char *what, int rt, const char *got, int st, int count, int seed, const MPI_Status *status,
                   int source, int tag)
{
    char *want = expected(st, count, rt, seed);
    CHECK(!memcmp(got, want, types[rt].bytes), "%s %s: received data differs", what, types[rt].name);
    free(want);
    if (!status) {
        report("%s %s: hash=%08x", what, types[rt].name, hash(got, types[rt].bytes));
        return;
    }
    int n = -1, e = -1, stsize, rtsize;
    MPI_Get_count(status, types[rt].type, &n);
    MPI_Get_elements(status, types[rt].type, &e);
    MPI_Type_size(types[st].type, &stsize);
    MPI_Type_size(types[rt].type, &rtsize);
    CHECK(n == count * stsize / rtsize, "%s %s: MPI_Get_count %d", what, types[rt].name, n);
    CHECK(st != rt || e == count * types[rt].elements, "%s %s: MPI_Get_elements %d", what, types[rt].name, e);
    CHECK(status->MPI_SOURCE == source && status->MPI_TAG == tag, "%s %s: source %d tag %d", what, types[rt].name,
          status->MPI_SOURCE, status->MPI_TAG);
    report("%s %s: hash=%08x count=%d elements=%d", what, types[rt].name, hash(got, types[rt].bytes), n, e);
}

static int sending(int direction) { return (rank % 2) == direction; }

/* Blocking sends of every mode against MPI_Recv (MPI_Irecv + MPI_Wait for ready mode). */
static void test_blocking(void)
{
    static const char *modes[4] = {"send", "ssend", "rsend", "bsend"};
    for (int mode = 0; mode < 4; mode++)
        for (int t = 0; t < NTYPES; t++)
            for (int direction = 0; direction < 2; direction++) {
                int test = 10 + mode * 10 + t, tag = test * 2 + direction;
                if (sending(direction)) {
                    char *buf = pattern(types[t].bytes, seed_of(rank, test));
                    if (mode == 2) MPI_Barrier(MPI_COMM_WORLD);
                    int rc = mode == 0   ? MPI_Send(buf, types[t].count, types[t].type, partner, tag, MPI_COMM_WORLD)
                             : mode == 1 ? MPI_Ssend(buf, types[t].count, types[t].type, partner, tag, MPI_COMM_WORLD)
                             : mode == 2 ? MPI_Rsend(buf, types[t].count, types[t].type, partner, tag, MPI_COMM_WORLD)
                                         : MPI_Bsend(buf, types[t].count, types[t].type, partner, tag, MPI_COMM_WORLD);
                    CHECK(rc == MPI_SUCCESS, "%s rc %d", modes[mode], rc);
                    free(buf);
                } else {
                    char *buf = sentinel(types[t].bytes);
                    MPI_Status status;
                    if (mode == 2) {
                        MPI_Request request;
                        MPI_Irecv(buf, types[t].count, types[t].type, partner, tag, MPI_COMM_WORLD, &request);
                        MPI_Barrier(MPI_COMM_WORLD);
                        MPI_Wait(&request, &status);
                    } else {
                        MPI_Recv(buf, types[t].count, types[t].type, partner, tag, MPI_COMM_WORLD, &status);
                    }
                    verify(modes[mode], t, buf, t, types[t].count, seed_of(partner, test), &status, partner, tag);
                    free(buf);
                }
            }
}

enum method { WAITALL, WAITALL_IGNORE, WAITANY, WAITSOME, TESTALL, TESTANY, TESTSOME, TESTSOME_IGNORE, WAIT_EACH,
              TEST_EACH, NMETHODS };
static const char *method_name[NMETHODS] = {"waitall", "waitall-ignore", "waitany", "waitsome", "testall",
                                            "testany", "testsome", "testsome-ignore", "wait-each", "test-each"};

/* Completes every request in reqs with one method; statuses[i] gets request i's status
 * where the method gives one (have[i] = 1). */
static void complete_all(enum method m, int n, MPI_Request *reqs, MPI_Status *statuses, int *have)
{
    MPI_Status st[32];
    int index, flag = 0, outcount, indices[32], rc = MPI_SUCCESS;
    memset(have, 0, sizeof(int) * (size_t)n);
    switch (m) {
    case WAITALL:
    case WAITALL_IGNORE:
        rc = MPI_Waitall(n, reqs, m == WAITALL ? statuses : MPI_STATUSES_IGNORE);
        for (int i = 0; i < n; i++) have[i] = m == WAITALL;
        break;
    case TESTALL:
        while (!flag && rc == MPI_SUCCESS) rc = MPI_Testall(n, reqs, &flag, statuses);
        for (int i = 0; i < n; i++) have[i] = 1;
        break;
    case WAITANY:
    case TESTANY:
        for (;;) {
            if (m == WAITANY) {
                rc = MPI_Waitany(n, reqs, &index, st);
            } else {
                rc = MPI_Testany(n, reqs, &index, &flag, st);
                if (rc == MPI_SUCCESS && !flag) continue;
            }
            if (rc != MPI_SUCCESS || index == MPI_UNDEFINED) break;
            statuses[index] = st[0];
            have[index] = 1;
        }
        break;
    case WAITSOME:
    case TESTSOME:
    case TESTSOME_IGNORE:
        for (;;) {
            MPI_Status *out = m == TESTSOME_IGNORE ? MPI_STATUSES_IGNORE : st;
            rc = m == WAITSOME ? MPI_Waitsome(n, reqs, &outcount, indices, out)
                               : MPI_Testsome(n, reqs, &outcount, indices, out);
            if (rc != MPI_SUCCESS || outcount == MPI_UNDEFINED) break;
            for (int k = 0; k < outcount && m != TESTSOME_IGNORE; k++) {
                statuses[indices[k]] = st[k];
                have[indices[k]] = 1;
            }
        }
        break;
    case WAIT_EACH:
        for (int i = n - 1; i >= 0; i--) {
            rc |= MPI_Wait(&reqs[i], &statuses[i]);
            have[i] = 1;
        }
        break;
    default:
        for (int left = n; left;) {
            left = 0;
            for (int i = 0; i < n; i++) {
                if (reqs[i] == MPI_REQUEST_NULL) continue;
                rc |= MPI_Test(&reqs[i], &flag, &statuses[i]);
                if (flag) have[i] = 1;
                else left++;
            }
        }
    }
    CHECK(rc == MPI_SUCCESS, "%s returned %d", method_name[m], rc);
    for (int i = 0; i < n; i++) CHECK(reqs[i] == MPI_REQUEST_NULL, "%s left request %d active", method_name[m], i);
}

/* Requests in one array: nulls, an MPI_Ibarrier and zero-count messages (plain host
 * requests commlib never stages), receives and sends of every type. */
static void test_nonblocking(enum method m, int settled)
{
    enum { RECV0 = 2, SEND0 = RECV0 + NTYPES + 1, ZSEND = SEND0 + NTYPES, ZRECV, NREQ };
    MPI_Request reqs[NREQ];
    MPI_Status statuses[NREQ];
    int have[NREQ], test = 100 + 2 * m + settled;
    char *in[NTYPES], *out[NTYPES];
    reqs[0] = reqs[RECV0 + NTYPES] = MPI_REQUEST_NULL;
    MPI_Ibarrier(MPI_COMM_WORLD, &reqs[1]);
    for (int t = 0; t < NTYPES; t++) {
        in[t] = sentinel(types[t].bytes);
        out[t] = pattern(types[t].bytes, seed_of(rank, test * 10 + t));
        MPI_Irecv(in[t], types[t].count, types[t].type, partner, test * 10 + t, MPI_COMM_WORLD, &reqs[RECV0 + t]);
    }
    for (int t = 0; t < NTYPES; t++)
        MPI_Isend(out[t], types[t].count, types[t].type, partner, test * 10 + t, MPI_COMM_WORLD, &reqs[SEND0 + t]);
    MPI_Isend(out[0], 0, MPI_DOUBLE, partner, test * 10 + 9, MPI_COMM_WORLD, &reqs[ZSEND]);
    MPI_Irecv(in[0] + 8, 0, MPI_DOUBLE, partner, test * 10 + 9, MPI_COMM_WORLD, &reqs[ZRECV]);
    /* settled: the messages have arrived, so the some-forms complete several at once */
    if (settled) MPI_Barrier(MPI_COMM_WORLD);
    complete_all(m, NREQ, reqs, statuses, have);
    for (int t = 0; t < NTYPES; t++) {
        verify(method_name[m], t, in[t], t, types[t].count, seed_of(partner, test * 10 + t),
               have[RECV0 + t] ? &statuses[RECV0 + t] : NULL, partner, test * 10 + t);
        free(in[t]);
        free(out[t]);
    }
    if (have[ZRECV]) {
        int n = -1;
        MPI_Get_count(&statuses[ZRECV], MPI_DOUBLE, &n);
        CHECK(n == 0 && statuses[ZRECV].MPI_SOURCE == partner, "%s zero-count status", method_name[m]);
    }
}

/* Fewer elements than posted (blocking and nonblocking), and a message that ends inside
 * an element: MPI_Get_count must say MPI_UNDEFINED and MPI_Get_elements count doubles. */
static void test_short_messages(void)
{
    for (int variant = 0; variant < 2; variant++) {
        int test = 200 + variant, tag = test;
        for (int direction = 0; direction < 2; direction++) {
            if (sending(direction)) {
                char *buf = pattern(types[T_VECTOR].bytes, seed_of(rank, test));
                MPI_Send(buf, 4, types[T_VECTOR].type, partner, tag, MPI_COMM_WORLD);
                free(buf);
                continue;
            }
            char *buf = sentinel(types[T_VECTOR].bytes);
            MPI_Status status;
            if (variant == 0) {
                MPI_Recv(buf, MAXCOUNT, types[T_VECTOR].type, partner, tag, MPI_COMM_WORLD, &status);
            } else {
                MPI_Request request;
                MPI_Irecv(buf, MAXCOUNT, types[T_VECTOR].type, partner, tag, MPI_COMM_WORLD, &request);
                MPI_Wait(&request, &status);
            }
            verify(variant ? "short-irecv" : "short-recv", T_VECTOR, buf, T_VECTOR, 4, seed_of(partner, test), &status,
                   partner, tag);
            free(buf);
        }
    }
    int test = 210, tag = test;
    for (int direction = 0; direction < 2; direction++) {
        if (sending(direction)) {
            char *buf = pattern(types[T_CONTIG].bytes, seed_of(rank, test));
            MPI_Send(buf, 30, MPI_DOUBLE, partner, tag, MPI_COMM_WORLD);
            free(buf);
            continue;
        }
        char *buf = sentinel(types[T_VECTOR].bytes), *want = sentinel(types[T_VECTOR].bytes);
        char *sent = pattern(types[T_CONTIG].bytes, seed_of(partner, test));
        for (int k = 0; k < 30; k++) { /* double k lands in element k / 24, block (k % 24) / 3 */
            int element = k / 24, block = k % 24 / 3, within = k % 3;
            memcpy(want + 8 * (element * 38 + block * 5 + within), sent + 8 * k, 8);
        }
        MPI_Status status;
        MPI_Recv(buf, 2, types[T_VECTOR].type, partner, tag, MPI_COMM_WORLD, &status);
        int n = 0, e = 0;
        MPI_Get_count(&status, types[T_VECTOR].type, &n);
        MPI_Get_elements(&status, types[T_VECTOR].type, &e);
        CHECK(n == MPI_UNDEFINED && e == 30, "partial element: count %d elements %d", n, e);
        CHECK(!memcmp(buf, want, types[T_VECTOR].bytes), "partial element: data differs");
        report("partial-element: hash=%08x count=%s elements=%d", hash(buf, types[T_VECTOR].bytes),
               n == MPI_UNDEFINED ? "undefined" : "defined", e);
        free(buf);
        free(want);
        free(sent);
    }
}

/* A message longer than the posted receive: the host MPI's error class, through
 * MPI_ERRORS_RETURN, for MPI_Recv, MPI_Wait and MPI_Waitall (MPI_ERR_IN_STATUS). */
static void test_truncation(void)
{
#ifdef OPEN_MPI
    /* The standard leaves an MPI's state undefined after an error; Open MPI 4.1 does not
     * always recover from MPI_ERR_TRUNCATE (this test deadlocks at 4 ranks without commlib
     * too), so the error-class comparison runs on the other MPIs only. */
    report("truncate: skipped on Open MPI");
    return;
#endif
    MPI_Comm comm;
    MPI_Comm_dup(MPI_COMM_WORLD, &comm);
    MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN);
    /* some MPIs raise errors of the completion calls on MPI_COMM_WORLD or MPI_COMM_SELF */
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    MPI_Comm_set_errhandler(MPI_COMM_SELF, MPI_ERRORS_RETURN);
    for (int variant = 0; variant < 3; variant++) {
        int test = 300 + variant;
        for (int direction = 0; direction < 2; direction++) {
            int t = variant == 1 ? T_VECTOR : T_CONTIG;
            if (sending(direction)) {
                char *buf = pattern(types[t].bytes, seed_of(rank, test));
                MPI_Send(buf, types[t].count, types[t].type, partner, test, comm);
                if (variant == 2) MPI_Send(buf, 3, types[t].type, partner, test + 50, comm);
                free(buf);
                continue;
            }
            char *buf = sentinel(types[t].bytes), *other = sentinel(types[t].bytes);
            MPI_Status statuses[2];
            int rc, class = -1, count = types[t].count - 1;
            if (variant == 0) {
                rc = MPI_Recv(buf, count, types[t].type, partner, test, comm, &statuses[0]);
            } else {
                MPI_Request reqs[2];
                MPI_Irecv(buf, count, types[t].type, partner, test, comm, &reqs[0]);
                if (variant == 1) {
                    rc = MPI_Wait(&reqs[0], &statuses[0]);
                } else {
                    MPI_Irecv(other, 3, types[t].type, partner, test + 50, comm, &reqs[1]);
                    rc = MPI_Waitall(2, reqs, statuses);
                    CHECK(rc == MPI_ERR_IN_STATUS, "waitall truncation rc %d", rc);
                    /* the MPI may stop at the error and leave the other request pending */
                    if (statuses[1].MPI_ERROR == MPI_ERR_PENDING) MPI_Wait(&reqs[1], &statuses[1]);
                    else CHECK(statuses[1].MPI_ERROR == MPI_SUCCESS, "waitall: second status %d", statuses[1].MPI_ERROR);
                    verify("truncate-waitall-other", t, other, t, 3, seed_of(partner, test), &statuses[1], partner,
                           test + 50);
                    rc = statuses[0].MPI_ERROR;
                }
            }
            MPI_Error_class(rc, &class);
            CHECK(class == MPI_ERR_TRUNCATE, "truncation variant %d: class %d", variant, class);
            report("truncate-%d %s: class=%s hash=%08x", variant, types[t].name, class == MPI_ERR_TRUNCATE ? "truncate" : "other", hash(buf, types[t].bytes));
            free(buf);
            free(other);
        }
    }
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_ARE_FATAL);
    MPI_Comm_set_errhandler(MPI_COMM_SELF, MPI_ERRORS_ARE_FATAL);
    MPI_Comm_free(&comm);
}

/* Sendrecv: vector out, doubles in (a different type of the same signature); a struct
 * around the ring with MPI_ANY_SOURCE; and one side of a pair only (the other side
 * MPI_PROC_NULL). */
static void test_sendrecv(void)
{
    int test = 400;
    char *out = pattern(types[T_VECTOR].bytes, seed_of(rank, test)), *in = sentinel(types[T_CONTIG].bytes);
    MPI_Status status;
    MPI_Sendrecv(out, 1, types[T_VECTOR].type, partner, test, in, 24, MPI_DOUBLE, partner, test, MPI_COMM_WORLD,
                 &status);
    verify("sendrecv", T_CONTIG, in, T_VECTOR, 1, seed_of(partner, test), &status, partner, test);
    free(out);
    free(in);

    test = 401;
    int right = (rank + 1) % nranks, left = (rank + nranks - 1) % nranks;
    out = pattern(types[T_STRUCT].bytes, seed_of(rank, test));
    in = sentinel(types[T_STRUCT].bytes);
    MPI_Sendrecv(out, 5, types[T_STRUCT].type, right, test, in, 5, types[T_STRUCT].type, MPI_ANY_SOURCE, MPI_ANY_TAG,
                 MPI_COMM_WORLD, &status);
    verify("sendrecv-ring", T_STRUCT, in, T_STRUCT, 5, seed_of(left, test), &status, left, test);
    free(out);
    free(in);

    test = 402;
    out = pattern(types[T_SUBARRAY].bytes, seed_of(rank, test));
    in = sentinel(types[T_SUBARRAY].bytes);
    int to = sending(0) ? partner : MPI_PROC_NULL, from = sending(0) ? MPI_PROC_NULL : partner;
    MPI_Sendrecv(out, 2, types[T_SUBARRAY].type, to, test, in, 2, types[T_SUBARRAY].type, from, test, MPI_COMM_WORLD,
                 MPI_STATUS_IGNORE);
    if (from != MPI_PROC_NULL) {
        verify("sendrecv-oneway", T_SUBARRAY, in, T_SUBARRAY, 2, seed_of(partner, test), NULL, 0, 0);
    } else {
        char *untouched = sentinel(types[T_SUBARRAY].bytes);
        CHECK(!memcmp(in, untouched, types[T_SUBARRAY].bytes), "a receive from MPI_PROC_NULL wrote the buffer");
        free(untouched);
    }
    free(out);
    free(in);
}

/* A host path mixed in: MPI_BOTTOM buffers (absolute addresses) are never staged, so a
 * staged send meets a plain receive and the other way round. */
static void test_bottom_mix(void)
{
    int test = 500;
    for (int direction = 0; direction < 2; direction++) {
        int plain = direction == 0; /* first the sender is plain, then the receiver */
        char *buf = sending(direction) ? pattern(types[T_STRUCT].bytes, seed_of(rank, test + direction))
                                       : sentinel(types[T_STRUCT].bytes);
        MPI_Aint address;
        MPI_Get_address(buf, &address);
        int five = 5;
        MPI_Datatype absolute;
        MPI_Type_create_hindexed(1, &five, &address, types[T_STRUCT].type, &absolute);
        MPI_Type_commit(&absolute);
        MPI_Status status;
        if (sending(direction)) {
            if (plain) MPI_Send(MPI_BOTTOM, 1, absolute, partner, test, MPI_COMM_WORLD);
            else MPI_Send(buf, 5, types[T_STRUCT].type, partner, test, MPI_COMM_WORLD);
        } else {
            if (plain) MPI_Recv(buf, 5, types[T_STRUCT].type, partner, test, MPI_COMM_WORLD, &status);
            else MPI_Recv(MPI_BOTTOM, 1, absolute, partner, test, MPI_COMM_WORLD, &status);
            verify(plain ? "bottom-send" : "bottom-recv", T_STRUCT, buf, T_STRUCT, 5, seed_of(partner, test + direction),
                   plain ? &status : NULL, partner, test);
        }
        MPI_Type_free(&absolute);
        free(buf);
    }
}

/* MPI_Request_free on a send, MPI_Cancel of a receive that never matches, and
 * MPI_Request_get_status before MPI_Wait. */
static void test_request_management(void)
{
    int test = 600;
    for (int direction = 0; direction < 2; direction++) {
        if (sending(direction)) {
            char *buf = pattern(types[T_VECTOR].bytes, seed_of(rank, test));
            MPI_Request request;
            MPI_Isend(buf, 3, types[T_VECTOR].type, partner, test, MPI_COMM_WORLD, &request);
            MPI_Request_free(&request);
            CHECK(request == MPI_REQUEST_NULL, "request_free left the handle");
            /* the buffer belongs to the send until the partner confirms */
            MPI_Recv(NULL, 0, MPI_BYTE, partner, test + 1, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
            free(buf);
        } else {
            char *buf = sentinel(types[T_VECTOR].bytes);
            MPI_Status status;
            MPI_Recv(buf, 3, types[T_VECTOR].type, partner, test, MPI_COMM_WORLD, &status);
            verify("request-free-send", T_VECTOR, buf, T_VECTOR, 3, seed_of(partner, test), &status, partner, test);
            MPI_Send(NULL, 0, MPI_BYTE, partner, test + 1, MPI_COMM_WORLD);
            free(buf);
        }
    }

    for (int ignore = 0; ignore < 2; ignore++) {
        char *buf = sentinel(types[T_VECTOR].bytes);
        MPI_Request request;
        MPI_Status status;
        int cancelled = -1;
        MPI_Irecv(buf, 3, types[T_VECTOR].type, partner, 999, MPI_COMM_WORLD, &request);
        MPI_Cancel(&request);
        MPI_Wait(&request, ignore ? MPI_STATUS_IGNORE : &status);
        if (!ignore) MPI_Test_cancelled(&status, &cancelled);
        char *untouched = sentinel(types[T_VECTOR].bytes);
        CHECK(!memcmp(buf, untouched, types[T_VECTOR].bytes), "cancelled receive wrote the buffer");
        CHECK(ignore || cancelled == 1, "MPI_Test_cancelled %d", cancelled);
        report("cancel%s: cancelled=%d untouched=%d", ignore ? "-ignore" : "", cancelled,
               !memcmp(buf, untouched, types[T_VECTOR].bytes));
        free(buf);
        free(untouched);
    }

    test = 610;
    for (int direction = 0; direction < 2; direction++) {
        if (sending(direction)) {
            char *buf = pattern(types[T_SUBARRAY].bytes, seed_of(rank, test));
            MPI_Send(buf, 2, types[T_SUBARRAY].type, partner, test, MPI_COMM_WORLD);
            free(buf);
            continue;
        }
        char *buf = sentinel(types[T_SUBARRAY].bytes);
        MPI_Request request;
        MPI_Status status;
        int flag = 0;
        MPI_Irecv(buf, 2, types[T_SUBARRAY].type, partner, test, MPI_COMM_WORLD, &request);
        while (!flag) MPI_Request_get_status(request, &flag, &status);
        CHECK(request != MPI_REQUEST_NULL, "get_status freed the request");
        verify("get-status", T_SUBARRAY, buf, T_SUBARRAY, 2, seed_of(partner, test), &status, partner, test);
        MPI_Wait(&request, &status);
        verify("get-status-wait", T_SUBARRAY, buf, T_SUBARRAY, 2, seed_of(partner, test), &status, partner, test);
        free(buf);
    }
}

/* The rest of the point-to-point family: MPI_Irsend, MPI_Ibsend, MPI_Sendrecv_replace,
 * MPI_Mprobe + MPI_Mrecv (the count taken from the probe) and MPI_Improbe + MPI_Imrecv. */
static void test_other_calls(void)
{
    for (int variant = 0; variant < 2; variant++)
        for (int direction = 0; direction < 2; direction++) {
            int test = 700 + variant, t = variant ? T_STRUCT : T_VECTOR;
            char *buf = sending(direction) ? pattern(types[t].bytes, seed_of(rank, test)) : sentinel(types[t].bytes);
            MPI_Request request;
            MPI_Status status;
            if (!sending(direction)) MPI_Irecv(buf, types[t].count, types[t].type, partner, test, MPI_COMM_WORLD, &request);
            if (variant == 0) MPI_Barrier(MPI_COMM_WORLD); /* ready mode: the receive is posted */
            if (sending(direction)) {
                if (variant == 0) MPI_Irsend(buf, types[t].count, types[t].type, partner, test, MPI_COMM_WORLD, &request);
                else MPI_Ibsend(buf, types[t].count, types[t].type, partner, test, MPI_COMM_WORLD, &request);
            }
            MPI_Wait(&request, &status);
            if (!sending(direction))
                verify(variant ? "ibsend" : "irsend", t, buf, t, types[t].count, seed_of(partner, test), &status, partner,
                       test);
            free(buf);
        }

    int test = 710;
    char *buf = pattern(types[T_VECTOR].bytes, seed_of(rank, test));
    MPI_Status status;
    MPI_Sendrecv_replace(buf, 3, types[T_VECTOR].type, partner, test, partner, test, MPI_COMM_WORLD, &status);
    char *want = expected_over(T_VECTOR, 3, T_VECTOR, seed_of(partner, test), seed_of(rank, test));
    CHECK(!memcmp(buf, want, types[T_VECTOR].bytes), "sendrecv_replace: data differs");
    report("sendrecv-replace vector: hash=%08x", hash(buf, types[T_VECTOR].bytes));
    free(buf);
    free(want);

    for (int variant = 0; variant < 2; variant++)
        for (int direction = 0; direction < 2; direction++) {
            test = 720 + variant;
            if (sending(direction)) {
                buf = pattern(types[T_STRUCT].bytes, seed_of(rank, test));
                MPI_Send(buf, 4, types[T_STRUCT].type, partner, test, MPI_COMM_WORLD);
                free(buf);
                continue;
            }
            MPI_Message message;
            int n = -1, flag = 0;
            if (variant == 0) MPI_Mprobe(partner, test, MPI_COMM_WORLD, &message, &status);
            else while (!flag) MPI_Improbe(partner, test, MPI_COMM_WORLD, &flag, &message, &status);
            MPI_Get_count(&status, types[T_STRUCT].type, &n);
            CHECK(n == 4, "probe count %d", n);
            buf = sentinel(types[T_STRUCT].bytes);
            if (variant == 0) {
                MPI_Mrecv(buf, n, types[T_STRUCT].type, &message, &status);
            } else {
                MPI_Request request;
                MPI_Imrecv(buf, n, types[T_STRUCT].type, &message, &request);
                MPI_Wait(&request, &status);
            }
            verify(variant ? "improbe-imrecv" : "mprobe-mrecv", T_STRUCT, buf, T_STRUCT, 4, seed_of(partner, test),
                   &status, partner, test);
            free(buf);
        }
}

/* Several threads at once (MPI_THREAD_MULTIPLE), each with its own tag, staging and
 * completing through the shared side table with different completion calls. */
#define THREADS 4
#define ROUNDS 100
static int thread_bad[THREADS];

static void *thread_main(void *arg)
{
    int id = (int)(intptr_t)arg, t = id % 2 ? T_VECTOR : T_STRUCT, tag = 800 + id;
    for (int round = 0; round < ROUNDS; round++) {
        int seed = seed_of(rank, tag * 1000 + round);
        char *out = pattern(types[t].bytes, seed), *in = sentinel(types[t].bytes);
        MPI_Request reqs[2];
        int index, flag = 0;
        MPI_Irecv(in, types[t].count, types[t].type, partner, tag, MPI_COMM_WORLD, &reqs[0]);
        MPI_Isend(out, types[t].count, types[t].type, partner, tag, MPI_COMM_WORLD, &reqs[1]);
        if (id % 3 == 0) {
            MPI_Waitall(2, reqs, MPI_STATUSES_IGNORE);
        } else if (id % 3 == 1) {
            while (MPI_Waitany(2, reqs, &index, MPI_STATUS_IGNORE) == MPI_SUCCESS && index != MPI_UNDEFINED) {}
        } else {
            while (!flag) MPI_Testall(2, reqs, &flag, MPI_STATUSES_IGNORE);
        }
        char *want = expected(t, types[t].count, t, seed_of(partner, tag * 1000 + round));
        thread_bad[id] += memcmp(in, want, types[t].bytes) != 0;
        free(out);
        free(in);
        free(want);
    }
    return NULL;
}

static void test_threads(int provided)
{
    if (provided < MPI_THREAD_MULTIPLE) {
        report("threads: skipped (no MPI_THREAD_MULTIPLE)");
        return;
    }
    pthread_t threads[THREADS];
    for (int i = 0; i < THREADS; i++) pthread_create(&threads[i], NULL, thread_main, (void *)(intptr_t)i);
    int bad = 0;
    for (int i = 0; i < THREADS; i++) {
        pthread_join(threads[i], NULL);
        bad += thread_bad[i];
    }
    CHECK(bad == 0, "threads: %d rounds received wrong data", bad);
    report("threads: %d x %d rounds, bad=%d", THREADS, ROUNDS, bad);
}

int main(int argc, char **argv)
{
    int provided;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &nranks);
    if (nranks % 2) {
        if (rank == 0) fprintf(stderr, "p2p_staged: needs an even number of ranks\n");
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    partner = rank ^ 1;
    log_out = stdout;
    if (argc > 1) {
        char path[4096];
        snprintf(path, sizeof path, "%s.%d", argv[1], rank);
        if (!(log_out = fopen(path, "w"))) MPI_Abort(MPI_COMM_WORLD, 3);
    }
    make_types();
    int attach_size = 1 << 20;
    char *attached = malloc((size_t)attach_size);
    MPI_Buffer_attach(attached, attach_size);

    test_blocking();
    for (int m = 0; m < NMETHODS; m++)
        for (int settled = 0; settled < 2; settled++) test_nonblocking((enum method)m, settled);
    test_short_messages();
    test_truncation();
    test_sendrecv();
    test_bottom_mix();
    test_request_management();
    test_other_calls();
    test_threads(provided);

    MPI_Buffer_detach(&attached, &attach_size);
    free(attached);
    free_types();
    long long (*stat)(const char *) = (long long (*)(const char *))dlsym(RTLD_DEFAULT, "commlib_stat");
    if (stat)
        fprintf(log_out, "stats: rank %d staged_send=%lld staged_recv=%lld staged_typed=%lld\n", rank,
                stat("p2p.staged_send"), stat("p2p.staged_recv"), stat("p2p.staged_typed"));
    else
        fprintf(log_out, "stats: rank %d no-commlib\n", rank);
    fprintf(log_out, "rank %d: done failures=%d\n", rank, failures);
    if (log_out != stdout) fclose(log_out);
    MPI_Finalize();
    return failures ? 1 : 0;
}
