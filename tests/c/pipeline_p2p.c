/* Pipelined staging (COMMLIB_PIPELINE=1, transfer/pipeline.h) keeps MPI's matching rules
 * and delivers every byte.  Ranks pair up (r, r ^ 1).  Device buffers come from the CUDA
 * driver (dlopen); every received buffer is copied back and checked, the gaps of vector
 * types included.  Messages of 1 MiB and more from device memory are pipelined:
 *   order      6 messages on one tag - pipelined, host, small device, alternating - into
 *              6 device receives posted first: message i lands in receive i
 *   wildcards  MPI_ANY_SOURCE / MPI_ANY_TAG: status source, tag, MPI_Get_count
 *   truncate   2 MiB-class message into a receive of half: MPI_ERR_TRUNCATE, the part that
 *              fits written, the rest of the buffer untouched; the next message still right
 *   cancel     a cancelled device receive; the next message goes to the next receive
 *   blocking   MPI_Send, MPI_Ssend, MPI_Rsend of a contiguous type of odd length into MPI_Recv
 *   exchange   40 messages each way at once (sizes 1-3 MiB, contiguous and vector), one
 *              MPI_Waitall over sends and receives together
 *   testing    MPI_Isend/MPI_Irecv completed by MPI_Test loops only
 *   cancelsend MPI_Cancel of a pipelined MPI_Isend (3 MiB): not cancelled, delivered
 *   reply      an even rank's pipelined MPI_Isend, answered by its partner only once received,
 *              the answer waited for in MPI_Recv, then in an MPI_Waitall with the send
 *   persistent MPI_Recv_init + MPI_Start, twice, of pipelined messages; MPI_Send_init (staged)
 *   bsend      MPI_Bsend of a device buffer: staged whole, delivered
 *   reversed   a pipelined message on a communicator whose ranks run backwards
 * Prints "pipeline_p2p: rank R done failures=F"; exit 1 on failure.  Even rank count. */
#define _GNU_SOURCE
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "pairs_start.h"

#define ELEMENTS 65536 /* vector: blocks of 3 doubles, stride 5 (1.5 MiB packed, 2.5 MiB span) */
#define SMALL 1000     /* the same vector, short: 24 KB packed, staged whole */

static int rank, size, failures;

static double value(int stream, int message, int i) { return stream * 1e8 + message * 1e6 + i; }

static void *device_alloc(size_t bytes)
{
    CUdeviceptr p = 0;
    CHECK(cu.cuMemAlloc(&p, bytes) == 0, "cuMemAlloc(%zu)", bytes);
    return (void *)(uintptr_t)p;
}

/* `doubles` of a span into device memory: vector elements (i % 5 < 3) from value(), gaps -1;
 * contiguous (gaps = 0): every double a value. */
static void put_span(void *dev, int stream, int message, size_t doubles, int gaps)
{
    double *h = malloc(doubles * sizeof(double));
    for (size_t i = 0; i < doubles; i++) h[i] = !gaps || i % 5 < 3 ? value(stream, message, (int)i) : -1.0;
    cu.cuMemcpyHtoD((CUdeviceptr)(uintptr_t)dev, h, doubles * sizeof(double));
    free(h);
}

static void clear(void *dev, size_t doubles)
{
    double *h = malloc(doubles * sizeof(double));
    for (size_t i = 0; i < doubles; i++) h[i] = -2.0;
    cu.cuMemcpyHtoD((CUdeviceptr)(uintptr_t)dev, h, doubles * sizeof(double));
    free(h);
}

/* The first `want` doubles of the span hold (stream, message) - vector elements only where
 * gaps - and every other double of `doubles` is untouched (-2). */
static void check_span(const void *dev, int stream, int message, size_t want, size_t doubles, int gaps,
                       const char *what)
{
    double *h = malloc(doubles * sizeof(double));
    cu.cuMemcpyDtoH(h, (CUdeviceptr)(uintptr_t)dev, doubles * sizeof(double));
    size_t bad = 0, first = 0;
    for (size_t i = 0; i < doubles; i++) {
        double expect = i < want && (!gaps || i % 5 < 3) ? value(stream, message, (int)i) : -2.0;
        if (h[i] != expect && !bad++) first = i;
    }
    CHECK(!bad, "%s: %zu wrong doubles, first at %zu (stream %d message %d)", what, bad, first, stream, message);
    free(h);
}

int main(int argc, char **argv)
{
    if (!pairs_start(&argc, &argv, "pipeline_p2p", &rank, &size)) return 0;
    int partner = rank ^ 1;
    MPI_Datatype vec, small, two;
    MPI_Type_vector(ELEMENTS, 3, 5, MPI_DOUBLE, &vec);
    MPI_Type_vector(SMALL, 3, 5, MPI_DOUBLE, &small);
    MPI_Type_vector(2 * ELEMENTS, 3, 5, MPI_DOUBLE, &two);
    MPI_Type_commit(&vec);
    MPI_Type_commit(&small);
    MPI_Type_commit(&two);
    const size_t span = (size_t)ELEMENTS * 5; /* doubles */
    enum { K = 6 };
    void *rd[K], *sd[K];
    for (int i = 0; i < K; i++) rd[i] = device_alloc(2 * span * sizeof(double)), sd[i] = device_alloc(span * sizeof(double));
    double *host = malloc(span * sizeof(double));
    MPI_Status st;
    int count, rc, cls;

    /* order */
    MPI_Request rq[K], sq[K];
    for (int i = 0; i < K; i++) {
        clear(rd[i], span);
        MPI_Irecv(rd[i], 1, vec, partner, 5, MPI_COMM_WORLD, &rq[i]);
    }
    MPI_Barrier(MPI_COMM_WORLD);
    for (int i = 0; i < K; i++) {
        put_span(sd[i], rank, i, span, 1);
        if (i % 3 == 1) {
            cu.cuMemcpyDtoH(host, (CUdeviceptr)(uintptr_t)sd[i], span * sizeof(double));
            MPI_Isend(host, 1, vec, partner, 5, MPI_COMM_WORLD, &sq[i]);
            MPI_Wait(&sq[i], MPI_STATUS_IGNORE); /* host is reused below */
        } else {
            MPI_Isend(sd[i], 1, i % 3 ? small : vec, partner, 5, MPI_COMM_WORLD, &sq[i]);
        }
    }
    CHECK(MPI_Waitall(K, rq, MPI_STATUSES_IGNORE) == MPI_SUCCESS, "order: Waitall receives");
    CHECK(MPI_Waitall(K, sq, MPI_STATUSES_IGNORE) == MPI_SUCCESS, "order: Waitall sends");
    for (int i = 0; i < K; i++)
        check_span(rd[i], partner, i, i % 3 == 2 ? (size_t)SMALL * 5 : span, span, 1, "order");

    /* wildcards */
    clear(rd[0], span);
    MPI_Irecv(rd[0], 1, vec, MPI_ANY_SOURCE, MPI_ANY_TAG, MPI_COMM_WORLD, &rq[0]);
    put_span(sd[0], rank, 10, span, 1);
    MPI_Send(sd[0], 1, vec, partner, 42 + rank, MPI_COMM_WORLD);
    CHECK(MPI_Wait(&rq[0], &st) == MPI_SUCCESS, "wildcards: Wait");
    count = -1;
    MPI_Get_count(&st, vec, &count);
    CHECK(st.MPI_SOURCE == partner && st.MPI_TAG == 42 + partner && count == 1, "wildcards: source %d tag %d count %d",
          st.MPI_SOURCE, st.MPI_TAG, count);
    check_span(rd[0], partner, 10, span, span, 1, "wildcards");
    MPI_Barrier(MPI_COMM_WORLD);

    /* truncate: two vector spans' worth into a receive of one */
    void *big = device_alloc(2 * span * sizeof(double));
    clear(rd[1], 2 * span);
    put_span(big, rank, 20, 2 * span, 1);
    MPI_Irecv(rd[1], 1, vec, partner, 7, MPI_COMM_WORLD, &rq[0]);
    MPI_Send(big, 1, two, partner, 7, MPI_COMM_WORLD);
    rc = MPI_Wait(&rq[0], &st);
    cls = -1;
    MPI_Error_class(rc, &cls);
    CHECK(cls == MPI_ERR_TRUNCATE, "truncate: error class %d (rc %d), wanted MPI_ERR_TRUNCATE", cls, rc);
    check_span(rd[1], partner, 20, span, 2 * span, 1, "truncate: the part that fits");
    clear(rd[1], span);
    MPI_Irecv(rd[1], 1, vec, partner, 7, MPI_COMM_WORLD, &rq[0]);
    put_span(sd[1], rank, 21, span, 1);
    MPI_Send(sd[1], 1, vec, partner, 7, MPI_COMM_WORLD);
    CHECK(MPI_Wait(&rq[0], MPI_STATUS_IGNORE) == MPI_SUCCESS, "truncate: the next message");
    check_span(rd[1], partner, 21, span, span, 1, "truncate: the next message");
    MPI_Barrier(MPI_COMM_WORLD);

    /* cancel a receive */
    clear(rd[2], span);
    clear(rd[3], span);
    MPI_Irecv(rd[2], 1, vec, partner, 99, MPI_COMM_WORLD, &rq[0]);
    MPI_Cancel(&rq[0]);
    MPI_Wait(&rq[0], &st);
    int cancelled = 0;
    MPI_Test_cancelled(&st, &cancelled);
    CHECK(cancelled, "cancel: the receive was not cancelled");
    MPI_Barrier(MPI_COMM_WORLD);
    MPI_Irecv(rd[3], 1, vec, partner, 99, MPI_COMM_WORLD, &rq[0]);
    put_span(sd[2], rank, 30, span, 1);
    MPI_Send(sd[2], 1, vec, partner, 99, MPI_COMM_WORLD);
    MPI_Wait(&rq[0], MPI_STATUS_IGNORE);
    check_span(rd[3], partner, 30, span, span, 1, "cancel: the next receive");
    check_span(rd[2], partner, 30, 0, span, 1, "cancel: the cancelled buffer untouched");

    /* blocking: a contiguous message of odd length (dense: copied onto the device chunk by chunk) */
    const int n = (3 << 17) + 7;
    for (int round = 0; round < 3; round++) {
        put_span(big, rank, 40 + round, (size_t)n, 0);
        clear(rd[0], (size_t)n + 8);
        if (round == 2) { /* MPI_Rsend: the receive is posted first */
            MPI_Irecv(rd[0], n, MPI_DOUBLE, partner, 11, MPI_COMM_WORLD, &rq[0]);
            MPI_Barrier(MPI_COMM_WORLD);
            CHECK(MPI_Rsend(big, n, MPI_DOUBLE, partner, 11, MPI_COMM_WORLD) == MPI_SUCCESS, "Rsend");
            MPI_Wait(&rq[0], &st);
        } else if (rank % 2 == 0) {
            CHECK((round ? MPI_Ssend : MPI_Send)(big, n, MPI_DOUBLE, partner, 11, MPI_COMM_WORLD) == MPI_SUCCESS, "send");
            MPI_Recv(rd[0], n, MPI_DOUBLE, partner, 11, MPI_COMM_WORLD, &st);
        } else {
            MPI_Recv(rd[0], n, MPI_DOUBLE, partner, 11, MPI_COMM_WORLD, &st);
            CHECK((round ? MPI_Ssend : MPI_Send)(big, n, MPI_DOUBLE, partner, 11, MPI_COMM_WORLD) == MPI_SUCCESS, "send");
        }
        count = -1;
        MPI_Get_count(&st, MPI_DOUBLE, &count);
        CHECK(count == n, "blocking round %d: count %d", round, count);
        check_span(rd[0], partner, 40 + round, (size_t)n, (size_t)n + 8, 0, "blocking");
    }

    /* exchange: 40 each way at once, one Waitall over all */
    enum { M = 40 };
    void *er[M], *es[M];
    MPI_Request all_rq[2 * M];
    size_t doubles[M];
    for (int j = 0; j < M; j++) {
        doubles[j] = j % 2 ? span : (size_t)(1 << 17) + (size_t)j * 7919; /* vector, or 1-3 MiB contiguous */
        er[j] = device_alloc((doubles[j] + 8) * sizeof(double));
        es[j] = device_alloc(doubles[j] * sizeof(double));
        clear(er[j], doubles[j] + 8);
        put_span(es[j], rank, 100 + j, doubles[j], j % 2);
    }
    for (int j = 0; j < M; j++)
        if (j % 2) MPI_Irecv(er[j], 1, vec, partner, 300 + j, MPI_COMM_WORLD, &all_rq[j]);
        else MPI_Irecv(er[j], (int)doubles[j], MPI_DOUBLE, partner, 300 + j, MPI_COMM_WORLD, &all_rq[j]);
    for (int j = 0; j < M; j++)
        if (j % 2) MPI_Isend(es[j], 1, vec, partner, 300 + j, MPI_COMM_WORLD, &all_rq[M + j]);
        else MPI_Isend(es[j], (int)doubles[j], MPI_DOUBLE, partner, 300 + j, MPI_COMM_WORLD, &all_rq[M + j]);
    CHECK(MPI_Waitall(2 * M, all_rq, MPI_STATUSES_IGNORE) == MPI_SUCCESS, "exchange: Waitall");
    for (int j = 0; j < M; j++) {
        check_span(er[j], partner, 100 + j, doubles[j], doubles[j] + 8, j % 2, "exchange");
        cu.cuMemFree((CUdeviceptr)(uintptr_t)er[j]);
        cu.cuMemFree((CUdeviceptr)(uintptr_t)es[j]);
    }

    /* testing: completion by MPI_Test only */
    clear(rd[4], span);
    put_span(sd[4], rank, 50, span, 1);
    MPI_Irecv(rd[4], 1, vec, partner, 12, MPI_COMM_WORLD, &rq[0]);
    MPI_Isend(sd[4], 1, vec, partner, 12, MPI_COMM_WORLD, &rq[1]);
    int done[2] = {0, 0};
    while (!done[0] || !done[1])
        for (int k = 0; k < 2; k++)
            if (!done[k]) CHECK(MPI_Test(&rq[k], &done[k], k ? MPI_STATUS_IGNORE : &st) == MPI_SUCCESS, "testing: Test");
    count = -1;
    MPI_Get_count(&st, vec, &count);
    CHECK(count == 1, "testing: count %d", count);
    check_span(rd[4], partner, 50, span, span, 1, "testing");

    /* cancelsend: a pipelined send is not cancelled (3 MiB: pipelined whatever the model's chunk) */
    clear(rd[1], 2 * span);
    put_span(big, rank, 60, 2 * span, 1);
    MPI_Isend(big, 1, two, partner, 13, MPI_COMM_WORLD, &rq[1]);
    /* only through the pipeline: MPICH's UCX device crashes cancelling a plain send */
    const char *on = getenv("COMMLIB_PIPELINE");
    if (on && atoi(on) == 1) CHECK(MPI_Cancel(&rq[1]) == MPI_SUCCESS, "cancelsend: Cancel");
    MPI_Barrier(MPI_COMM_WORLD);
    MPI_Recv(rd[1], 1, two, partner, 13, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
    CHECK(MPI_Wait(&rq[1], &st) == MPI_SUCCESS, "cancelsend: Wait");
    cancelled = 1;
    MPI_Test_cancelled(&st, &cancelled);
    CHECK(!cancelled, "cancelsend: reported cancelled, but the partner received it");
    check_span(rd[1], partner, 60, 2 * span, 2 * span, 1, "cancelsend");

    /* reply: the partner answers only once it has the whole pipelined message, while this
     * rank waits for the answer - in a plain MPI_Recv, then in one MPI_Waitall with the send
     * (the chunks must get to the host MPI meanwhile) */
    for (int round = 0; round < 2; round++) {
        double answer = 0;
        if (rank % 2 == 0) {
            put_span(big, rank, 110 + round, 2 * span, 1);
            MPI_Isend(big, 1, two, partner, 17, MPI_COMM_WORLD, &rq[1]);
            if (round == 0) {
                MPI_Recv(&answer, 1, MPI_DOUBLE, partner, 18, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
                MPI_Wait(&rq[1], MPI_STATUS_IGNORE);
            } else {
                MPI_Irecv(&answer, 1, MPI_DOUBLE, partner, 18, MPI_COMM_WORLD, &rq[0]);
                MPI_Request both[2] = {rq[0], rq[1]};
                CHECK(MPI_Waitall(2, both, MPI_STATUSES_IGNORE) == MPI_SUCCESS, "reply: Waitall");
            }
            CHECK(answer == 110 + round, "reply round %d: answer %g", round, answer);
        } else {
            clear(rd[1], 2 * span);
            MPI_Recv(rd[1], 1, two, partner, 17, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
            check_span(rd[1], partner, 110 + round, 2 * span, 2 * span, 1, "reply");
            answer = 110 + round;
            MPI_Send(&answer, 1, MPI_DOUBLE, partner, 18, MPI_COMM_WORLD);
        }
    }

    /* persistent: a persistent device receive takes pipelined messages, start after start;
     * a persistent send is staged whole */
    MPI_Request persistent_recv, persistent_send;
    MPI_Recv_init(rd[2], 1, vec, partner, 15, MPI_COMM_WORLD, &persistent_recv);
    MPI_Send_init(sd[2], 1, vec, partner, 16, MPI_COMM_WORLD, &persistent_send);
    for (int round = 0; round < 2; round++) {
        clear(rd[2], span);
        clear(rd[3], span);
        MPI_Start(&persistent_recv);
        MPI_Irecv(rd[3], 1, vec, partner, 16, MPI_COMM_WORLD, &rq[0]);
        put_span(sd[1], rank, 80 + round, span, 1);
        put_span(sd[2], rank, 90 + round, span, 1);
        MPI_Send(sd[1], 1, vec, partner, 15, MPI_COMM_WORLD);
        MPI_Start(&persistent_send);
        CHECK(MPI_Wait(&persistent_recv, &st) == MPI_SUCCESS, "persistent: Wait");
        count = -1;
        MPI_Get_count(&st, vec, &count);
        CHECK(count == 1, "persistent round %d: count %d", round, count);
        MPI_Wait(&persistent_send, MPI_STATUS_IGNORE);
        MPI_Wait(&rq[0], MPI_STATUS_IGNORE);
        check_span(rd[2], partner, 80 + round, span, span, 1, "persistent receive");
        check_span(rd[3], partner, 90 + round, span, span, 1, "persistent send");
    }
    MPI_Request_free(&persistent_recv);
    MPI_Request_free(&persistent_send);

    /* bsend: staged whole (a buffered send completes without its receiver) */
    int packed = 0;
    MPI_Pack_size(1, vec, MPI_COMM_WORLD, &packed);
    int bytes = packed + MPI_BSEND_OVERHEAD + 1024;
    void *attached = malloc((size_t)bytes);
    MPI_Buffer_attach(attached, bytes);
    clear(rd[0], span);
    put_span(sd[0], rank, 70, span, 1);
    CHECK(MPI_Bsend(sd[0], 1, vec, partner, 14, MPI_COMM_WORLD) == MPI_SUCCESS, "bsend: Bsend");
    MPI_Recv(rd[0], 1, vec, partner, 14, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
    MPI_Buffer_detach(&attached, &bytes);
    free(attached);
    check_span(rd[0], partner, 70, span, span, 1, "bsend");

    /* reversed: a communicator whose ranks run backwards - chunks go to the partner's world
     * rank, not to its rank in the program's communicator (they would land on the wrong
     * rank, or nowhere, with 4 ranks) */
    MPI_Comm reversed;
    MPI_Comm_split(MPI_COMM_WORLD, 0, size - rank, &reversed);
    int mirrored = size - 1 - partner; /* the partner's rank there */
    const int m = 3 << 17;            /* 3 MiB contiguous: pipelined whatever the model's chunk */
    put_span(big, rank, 80, (size_t)m, 0);
    clear(rd[0], (size_t)m + 8);
    MPI_Irecv(rd[0], m, MPI_DOUBLE, mirrored, 15, reversed, &rq[0]);
    CHECK(MPI_Send(big, m, MPI_DOUBLE, mirrored, 15, reversed) == MPI_SUCCESS, "reversed: Send");
    MPI_Wait(&rq[0], &st);
    count = -1;
    MPI_Get_count(&st, MPI_DOUBLE, &count);
    CHECK(count == m && st.MPI_SOURCE == mirrored, "reversed: count %d source %d", count, st.MPI_SOURCE);
    check_span(rd[0], partner, 80, (size_t)m, (size_t)m + 8, 0, "reversed");
    MPI_Comm_free(&reversed);

    MPI_Type_free(&vec);
    MPI_Type_free(&small);
    MPI_Type_free(&two);
    printf("pipeline_p2p: rank %d done failures=%d\n", rank, failures);
    fflush(stdout);
    MPI_Finalize();
    return failures ? 1 : 0;
}
