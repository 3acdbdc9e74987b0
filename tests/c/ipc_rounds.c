/* MPI_Waitall over large device receives, finished in rounds as the messages arrive
 * (COMMLIB_EARLY_LAUNCH_BYTES, interpose/request.c), keeps MPI_Waitall's results.  Pairs
 * (r, r ^ 1):
 *   rounds     the even rank sends 9 messages one at a time, GAP_US apart, while the odd
 *              rank sits in one MPI_Waitall over 10 requests: six device receives of 1 MiB
 *              (every other double, and contiguous), a host receive, MPI_REQUEST_NULL, a
 *              persistent device receive, and a device receive posted for half of its
 *              message.  Wanted: MPI_ERR_IN_STATUS, that receive's status
 *              MPI_ERR_TRUNCATE and the others MPI_SUCCESS, every status's source, tag and
 *              byte count where it belongs (the null request's empty), every buffer's
 *              elements and gaps.
 *   both ways  each rank posts 4 device receives, sends 4 messages, and completes all 8
 *              in one MPI_Waitall (MPI_STATUSES_IGNORE): a halo's pattern, with direct
 *              sends in the call.
 * Prints the receiving rank's rounds and early launches in that MPI_Waitall (COMMLIB_STATS
 * counters), and "ipc_rounds: rank R done failures=F"; exit 1 on failure.  Even rank count. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "pairs_start.h"

#define DOUBLES (1 << 17) /* 1 MiB of payload */
#define GAP_US 20000
enum { DEVICE = 6, HOST = 6, NUL = 7, PERSISTENT = 8, CUT = 9, N = 10, BOTH = 4 };

static int rank, size, failures;

static double value(int from, int message, int64_t i) { return from * 1e8 + message * 1e6 + (double)i; }

/* commlib's counter `name` (-1: commlib not preloaded) */
static long long stat_of(const char *name)
{
    long long (*get)(const char *) = (long long (*)(const char *))dlsym(RTLD_DEFAULT, "commlib_stat");
    return get ? get(name) : -1;
}

static void *device_alloc(size_t bytes)
{
    CUdeviceptr p = 0;
    CHECK(cu.cuMemAlloc(&p, bytes) == 0, "cuMemAlloc(%zu)", bytes);
    return (void *)(uintptr_t)p;
}

/* A message's span on the device: every other double (strided) or DOUBLES in a row. */
static size_t span_doubles(int strided) { return strided ? 2 * (size_t)DOUBLES : DOUBLES; }

static void *message(int from, int m, int strided)
{
    size_t n = span_doubles(strided);
    double *h = malloc(n * sizeof *h);
    for (size_t i = 0; i < n; i++) h[i] = strided && i % 2 ? -1.0 : value(from, m, strided ? (int64_t)i / 2 : (int64_t)i);
    void *d = device_alloc(n * sizeof *h);
    cu.cuMemcpyHtoD((CUdeviceptr)(uintptr_t)d, h, n * sizeof *h);
    free(h);
    return d;
}

static void *cleared(size_t doubles)
{
    double *h = malloc(doubles * sizeof *h);
    for (size_t i = 0; i < doubles; i++) h[i] = -2.0;
    void *d = device_alloc(doubles * sizeof *h);
    cu.cuMemcpyHtoD((CUdeviceptr)(uintptr_t)d, h, doubles * sizeof *h);
    free(h);
    return d;
}

/* The first `got` elements of message (from, m) landed; the gaps and the rest are untouched. */
static void check(void *d, int from, int m, int strided, size_t got, size_t span, const char *what)
{
    double *h = malloc(span * sizeof *h);
    cu.cuMemcpyDtoH(h, (CUdeviceptr)(uintptr_t)d, span * sizeof *h);
    size_t bad = 0;
    for (size_t i = 0; i < span; i++) {
        size_t element = strided ? i / 2 : i;
        int data = (!strided || i % 2 == 0) && element < got;
        bad += h[i] != (data ? value(from, m, (int64_t)element) : -2.0);
    }
    CHECK(!bad, "%s: message %d, %zu wrong doubles of %zu", what, m, bad, span);
    free(h);
}

int main(int argc, char **argv)
{
    if (!pairs_start(&argc, &argv, "ipc_rounds", &rank, &size)) return 0;
    int partner = rank ^ 1, sender = rank % 2 == 0;
    MPI_Datatype every_other;
    MPI_Type_vector(DOUBLES, 1, 2, MPI_DOUBLE, &every_other);
    MPI_Type_commit(&every_other);

    /* rounds */
    void *buf[N] = {0};
    double host_in[16], host_out[16];
    MPI_Request rq[N];
    MPI_Status st[N];
    MPI_Request persistent = MPI_REQUEST_NULL;
    /* everything filled and posted before the barrier: after it the receiver is in MPI_Waitall
     * before the first message comes (so each message is a round of its own) */
    if (sender) {
        for (int m = 0; m < N; m++)
            if (m != HOST && m != NUL) buf[m] = message(rank, m, m < DEVICE && m % 2 == 0);
        for (int i = 0; i < 16; i++) host_out[i] = value(rank, HOST, i);
    } else {
        for (int m = 0; m < DEVICE; m++) {
            int strided = m % 2 == 0;
            buf[m] = cleared(span_doubles(strided));
            if (strided) MPI_Irecv(buf[m], 1, every_other, partner, m, MPI_COMM_WORLD, &rq[m]);
            else MPI_Irecv(buf[m], DOUBLES, MPI_DOUBLE, partner, m, MPI_COMM_WORLD, &rq[m]);
        }
        for (int i = 0; i < 16; i++) host_in[i] = -2.0;
        MPI_Irecv(host_in, 16, MPI_DOUBLE, partner, HOST, MPI_COMM_WORLD, &rq[HOST]);
        rq[NUL] = MPI_REQUEST_NULL;
        buf[PERSISTENT] = cleared(DOUBLES);
        MPI_Recv_init(buf[PERSISTENT], DOUBLES, MPI_DOUBLE, partner, PERSISTENT, MPI_COMM_WORLD, &rq[PERSISTENT]);
        MPI_Start(&rq[PERSISTENT]);
        persistent = rq[PERSISTENT];
        buf[CUT] = cleared(DOUBLES); /* posted for half the message: the rest must stay */
        MPI_Irecv(buf[CUT], DOUBLES / 2, MPI_DOUBLE, partner, CUT, MPI_COMM_WORLD, &rq[CUT]);
    }
    MPI_Barrier(MPI_COMM_WORLD);
    if (sender) {
        int order[] = {0, 1, HOST, 2, 3, PERSISTENT, 4, CUT, 5};
        MPI_Request sq[9];
        for (int k = 0; k < 9; k++) {
            int m = order[k], strided = m < DEVICE && m % 2 == 0;
            if (m == HOST) {
                MPI_Isend(host_out, 16, MPI_DOUBLE, partner, m, MPI_COMM_WORLD, &sq[k]);
            } else {
                if (strided) MPI_Isend(buf[m], 1, every_other, partner, m, MPI_COMM_WORLD, &sq[k]);
                else MPI_Isend(buf[m], DOUBLES, MPI_DOUBLE, partner, m, MPI_COMM_WORLD, &sq[k]);
            }
            usleep(GAP_US); /* the receiver's MPI_Waitall sees this message before the next */
        }
        CHECK(MPI_Waitall(9, sq, MPI_STATUSES_IGNORE) == MPI_SUCCESS, "rounds: the sends' Waitall");
    } else {
        long long rounds = stat_of("waitall.rounds"), early = stat_of("waitall.early_launches");
        int rc = MPI_Waitall(N, rq, st);
        printf("ipc_rounds: rank %d waitall rounds=%lld early launches=%lld\n", rank,
               stat_of("waitall.rounds") - rounds, stat_of("waitall.early_launches") - early);
        CHECK(rc == MPI_ERR_IN_STATUS, "rounds: Waitall returned %d, wanted MPI_ERR_IN_STATUS", rc);
        for (int m = 0; m < N; m++) {
            int cls = -1, bytes = -1;
            MPI_Error_class(st[m].MPI_ERROR, &cls);
            MPI_Get_count(&st[m], MPI_BYTE, &bytes);
            int want_bytes = m == HOST ? 16 * 8 : m == NUL ? 0 : m == CUT ? DOUBLES / 2 * 8 : DOUBLES * 8;
            CHECK(cls == (m == CUT ? MPI_ERR_TRUNCATE : MPI_SUCCESS), "rounds: status %d error class %d", m, cls);
            CHECK(bytes == want_bytes, "rounds: status %d counts %d bytes, wanted %d", m, bytes, want_bytes);
            if (m == NUL)
                CHECK(st[m].MPI_SOURCE == MPI_ANY_SOURCE && st[m].MPI_TAG == MPI_ANY_TAG,
                      "rounds: the null request's status is not empty (source %d tag %d)", st[m].MPI_SOURCE,
                      st[m].MPI_TAG);
            else
                CHECK(st[m].MPI_SOURCE == partner && st[m].MPI_TAG == m, "rounds: status %d from %d tag %d", m,
                      st[m].MPI_SOURCE, st[m].MPI_TAG);
        }
        for (int m = 0; m < DEVICE; m++) check(buf[m], partner, m, m % 2 == 0, DOUBLES, span_doubles(m % 2 == 0), "rounds");
        for (int i = 0; i < 16; i++) CHECK(host_in[i] == value(partner, HOST, i), "rounds: host double %d", i);
        check(buf[PERSISTENT], partner, PERSISTENT, 0, DOUBLES, DOUBLES, "rounds: persistent");
        check(buf[CUT], partner, CUT, 0, DOUBLES / 2, DOUBLES, "rounds: truncated");
        CHECK(rq[PERSISTENT] == persistent, "rounds: the persistent request was freed");
        MPI_Request_free(&rq[PERSISTENT]);
    }
    MPI_Barrier(MPI_COMM_WORLD);
    for (int m = 0; m < N; m++)
        if (buf[m]) cu.cuMemFree((CUdeviceptr)(uintptr_t)buf[m]);

    /* both ways */
    void *in[BOTH], *out[BOTH];
    MPI_Request both[2 * BOTH];
    for (int m = 0; m < BOTH; m++) {
        int strided = m % 2 == 0;
        in[m] = cleared(span_doubles(strided));
        out[m] = message(rank, 20 + m, strided);
        if (strided) MPI_Irecv(in[m], 1, every_other, partner, 20 + m, MPI_COMM_WORLD, &both[m]);
        else MPI_Irecv(in[m], DOUBLES, MPI_DOUBLE, partner, 20 + m, MPI_COMM_WORLD, &both[m]);
    }
    for (int m = 0; m < BOTH; m++) {
        if (m % 2 == 0) MPI_Isend(out[m], 1, every_other, partner, 20 + m, MPI_COMM_WORLD, &both[BOTH + m]);
        else MPI_Isend(out[m], DOUBLES, MPI_DOUBLE, partner, 20 + m, MPI_COMM_WORLD, &both[BOTH + m]);
    }
    CHECK(MPI_Waitall(2 * BOTH, both, MPI_STATUSES_IGNORE) == MPI_SUCCESS, "both ways: Waitall");
    for (int m = 0; m < BOTH; m++) {
        check(in[m], partner, 20 + m, m % 2 == 0, DOUBLES, span_doubles(m % 2 == 0), "both ways");
        cu.cuMemFree((CUdeviceptr)(uintptr_t)in[m]);
        cu.cuMemFree((CUdeviceptr)(uintptr_t)out[m]);
    }
    MPI_Type_free(&every_other);
    int all = 0;
    MPI_Allreduce(&failures, &all, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    printf("ipc_rounds: rank %d done failures=%d\n", rank, failures);
    MPI_Finalize();
    return all ? 1 : 0;
}
