/* GPU-to-GPU point-to-point (COMMLIB_IPC=1, transfer/ipc.h) keeps MPI's matching rules.
 * Ranks pair up (r, r ^ 1); with COMMLIB_RANKS_PER_NODE=2 and 4 ranks, rank r also sends
 * to (r + 2) % 4, on another pretended node, which must take the staged path.  Device
 * buffers come from the CUDA driver (dlopen); every received buffer is copied back and
 * checked (elements and the gaps between them).
 *   order      8 messages, one tag, device and host sends alternating, into 8 device
 *              receives posted first: message i lands in receive i
 *   batch      70 messages into 70 receives completed by one MPI_Waitall, half the buffers
 *              at odd addresses (batched unpack launches of at most 31, per word size)
 *   wildcards  MPI_ANY_SOURCE / MPI_ANY_TAG receive: status source, tag, MPI_Get_count
 *   truncate   2 elements into a receive of 1: MPI_ERR_TRUNCATE, the first element written
 *   tiny       200 B into a receive of 48 B, shorter than a descriptor: MPI_ERR_TRUNCATE,
 *              the sender's arena space still acknowledged (also for a direct message)
 *   cancel     a cancelled device receive is cancelled; the next message goes to the next
 *   blocking   MPI_Send / MPI_Ssend into MPI_Recv; a contiguous type
 *   self       a rank's message to itself
 *   recycle    200 messages of 2 MiB, one after another: arena space comes back
 *   full       8 messages of 4 MiB in flight with a 16 MiB arena budget: some staged
 *   burst      26 MPI_Isend, then one rank in MPI_Barrier while its partner takes them
 *              with MPI_Recv (one pack launch for the 26, made by commlib's burst thread
 *              while the program sits in a call commlib does not wrap; transfer/ipc.h)
 *   direct     2 MiB contiguous messages (with COMMLIB_PROGRESS=thread the receiver copies
 *              them from the sender's own buffer): an MPI_Isend is not complete before the
 *              partner posts its receive (checked when IPC_P2P_EXPECT_DIRECT=1), a blocking
 *              MPI_Send, and a buffer freed and allocated again (a real driver may hand out
 *              the same address: the receiver must not read the old mapping); then 70
 *              fresh 1 MiB buffers, more than a receiver keeps mapped (the oldest close);
 *              and a receiver waiting in MPI_Wait for a host message its partner sends
 *              only once its direct message (already received for) completed
 *   strided    every other double, 1 MiB of payload, by MPI_Isend/MPI_Irecv and MPI_Send/MPI_Recv
 *              (with COMMLIB_PROGRESS=thread direct, moved in one pass): elements and gaps
 * Prints "ipc_p2p: rank R ... done failures=F"; exit 1 on failure.  Even rank count. */
#define _GNU_SOURCE
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "pairs_start.h"

#define ELEMENTS 256 /* vector: 256 blocks of 3 doubles, stride 5 (6 KiB packed) */
#define SPAN (ELEMENTS * 5)

static int rank, size, failures;

static double value(int stream, int message, int i) { return stream * 1e7 + message * 1e4 + i; }

static void *device_alloc(size_t bytes)
{
    CUdeviceptr p = 0;
    CHECK(cu.cuMemAlloc(&p, bytes) == 0, "cuMemAlloc(%zu)", bytes);
    return (void *)(uintptr_t)p;
}

/* A vector message's span: elements from value(stream, message, .), gaps -1 (or zeros). */
static void fill(double *host, int stream, int message, int elements)
{
    for (int i = 0; i < elements * 5; i++) host[i] = i % 5 < 3 ? value(stream, message, i) : -1.0;
}

static void put(void *dev, const double *host, int elements)
{
    cu.cuMemcpyHtoD((CUdeviceptr)(uintptr_t)dev, host, (size_t)elements * 5 * sizeof(double));
}

/* `want` elements received from (stream, message); the rest of `elements` untouched (-2). */
static void check_vector(const void *dev, int stream, int message, int want, int elements, const char *what)
{
    double *host = malloc((size_t)elements * 5 * sizeof(double));
    cu.cuMemcpyDtoH(host, (CUdeviceptr)(uintptr_t)dev, (size_t)elements * 5 * sizeof(double));
    int bad = 0;
    for (int i = 0; i < elements * 5; i++) {
        double expect = i % 5 < 3 && i / 5 < want ? value(stream, message, i) : -2.0;
        bad += host[i] != expect;
    }
    CHECK(!bad, "%s: %d wrong doubles (stream %d message %d)", what, bad, stream, message);
    free(host);
}

static void clear(void *dev, int elements)
{
    double *host = malloc((size_t)elements * 5 * sizeof(double));
    for (int i = 0; i < elements * 5; i++) host[i] = -2.0;
    put(dev, host, elements);
    free(host);
}

int main(int argc, char **argv)
{
    if (!pairs_start(&argc, &argv, "ipc_p2p", &rank, &size)) return 0;
    int partner = rank ^ 1, far = size >= 4 ? (rank + 2) % size : -1;
    MPI_Datatype vec, vec2;
    MPI_Type_vector(ELEMENTS, 3, 5, MPI_DOUBLE, &vec);
    MPI_Type_commit(&vec);
    MPI_Type_contiguous(2, vec, &vec2); /* not used to receive: only to size buffers */
    MPI_Type_free(&vec2);
    size_t span = SPAN * sizeof(double);
    double *host = malloc(2 * span);
    enum { K = 8 };
    void *dev[K], *send_dev = device_alloc(2 * span);
    for (int i = 0; i < K; i++) dev[i] = device_alloc(2 * span);

    /* order: device and host sends alternate on one tag */
    MPI_Request rq[K + 1], sq[K];
    for (int i = 0; i < K; i++) {
        clear(dev[i], ELEMENTS);
        MPI_Irecv(dev[i], 1, vec, partner, 5, MPI_COMM_WORLD, &rq[i]);
    }
    MPI_Barrier(MPI_COMM_WORLD);
    double *host_msgs = malloc(K * span);
    void *dev_msgs = device_alloc(K * span);
    for (int i = 0; i < K; i++) {
        double *h = host_msgs + (size_t)i * SPAN;
        fill(h, rank, i, ELEMENTS);
        if (i % 2) {
            MPI_Isend(h, 1, vec, partner, 5, MPI_COMM_WORLD, &sq[i]);
        } else {
            void *d = (char *)dev_msgs + (size_t)i * span;
            put(d, h, ELEMENTS);
            MPI_Isend(d, 1, vec, partner, 5, MPI_COMM_WORLD, &sq[i]);
        }
    }
    CHECK(MPI_Waitall(K, rq, MPI_STATUSES_IGNORE) == MPI_SUCCESS, "order: Waitall receives");
    CHECK(MPI_Waitall(K, sq, MPI_STATUSES_IGNORE) == MPI_SUCCESS, "order: Waitall sends");
    for (int i = 0; i < K; i++) check_vector(dev[i], partner, i, ELEMENTS, ELEMENTS, "order");

    /* batch: 70 receives completed by one MPI_Waitall (unpacked in batched launches of at
     * most 31 each, per word size: buffers at even addresses and at odd ones) */
    {
        enum { B = 70 };
        size_t slot = 2 * span + 64;
        char *rb = device_alloc(B * slot), *sb = device_alloc(B * slot);
        double *h = malloc(span);
        MPI_Request bq[2 * B];
        for (int i = 0; i < B; i++) {
            clear(rb + i * slot + i % 2, ELEMENTS);
            MPI_Irecv(rb + i * slot + i % 2, 1, vec, partner, 6, MPI_COMM_WORLD, &bq[i]);
        }
        for (int i = 0; i < B; i++) {
            fill(h, rank, 300 + i, ELEMENTS);
            put(sb + i * slot + i % 2, h, ELEMENTS);
            MPI_Isend(sb + i * slot + i % 2, 1, vec, partner, 6, MPI_COMM_WORLD, &bq[B + i]);
        }
        CHECK(MPI_Waitall(2 * B, bq, MPI_STATUSES_IGNORE) == MPI_SUCCESS, "batch: Waitall");
        for (int i = 0; i < B; i++) check_vector(rb + i * slot + i % 2, partner, 300 + i, ELEMENTS, ELEMENTS, "batch");
        free(h);
    }

    /* wildcards */
    MPI_Status st;
    clear(dev[0], ELEMENTS);
    MPI_Irecv(dev[0], 1, vec, MPI_ANY_SOURCE, MPI_ANY_TAG, MPI_COMM_WORLD, &rq[0]);
    fill(host, rank, 100, ELEMENTS);
    put(send_dev, host, ELEMENTS);
    MPI_Send(send_dev, 1, vec, partner, 42 + rank, MPI_COMM_WORLD);
    CHECK(MPI_Wait(&rq[0], &st) == MPI_SUCCESS, "wildcards: Wait");
    int count = -1;
    MPI_Get_count(&st, vec, &count);
    CHECK(st.MPI_SOURCE == partner && st.MPI_TAG == 42 + partner && count == 1, "wildcards: source %d tag %d count %d",
          st.MPI_SOURCE, st.MPI_TAG, count);
    check_vector(dev[0], partner, 100, ELEMENTS, ELEMENTS, "wildcards");
    MPI_Barrier(MPI_COMM_WORLD);

    /* truncate: 2 elements sent (a 2-element vector span), a receive of 1 */
    clear(dev[1], 2 * ELEMENTS);
    double *two = malloc(2 * span);
    for (int e = 0; e < 2; e++) fill(two + e * SPAN, rank, 200 + e, ELEMENTS);
    MPI_Datatype big;
    MPI_Type_vector(2 * ELEMENTS, 3, 5, MPI_DOUBLE, &big);
    MPI_Type_commit(&big);
    fill(two, rank, 200, 2 * ELEMENTS);
    put(send_dev, two, 2 * ELEMENTS);
    MPI_Irecv(dev[1], 1, vec, partner, 7, MPI_COMM_WORLD, &rq[0]);
    MPI_Send(send_dev, 1, big, partner, 7, MPI_COMM_WORLD);
    int rc = MPI_Wait(&rq[0], &st), cls = -1;
    MPI_Error_class(rc, &cls);
    CHECK(cls == MPI_ERR_TRUNCATE, "truncate: error class %d (rc %d), wanted MPI_ERR_TRUNCATE", cls, rc);
    check_vector(dev[1], partner, 200, ELEMENTS, 2 * ELEMENTS, "truncate: the part that fits");
    MPI_Type_free(&big);
    free(two);
    MPI_Barrier(MPI_COMM_WORLD);

    /* tiny: 25 doubles (200 B: GPU to GPU) into a receive of 6 (48 B, less than the
     * descriptor): MPI_ERR_TRUNCATE, and the sender's space comes back (the test checks
     * that MPI_Finalize finds nothing unacknowledged).  Through the host MPI (IPC off) the
     * 6 doubles that fit are written; GPU to GPU nothing is. */
    {
        double small[25], got[8];
        for (int i = 0; i < 25; i++) small[i] = value(rank, 250, i);
        for (int i = 0; i < 8; i++) got[i] = -2.0;
        void *ss = device_alloc(sizeof small), *sr = device_alloc(sizeof got);
        cu.cuMemcpyHtoD((CUdeviceptr)(uintptr_t)ss, small, sizeof small);
        cu.cuMemcpyHtoD((CUdeviceptr)(uintptr_t)sr, got, sizeof got);
        MPI_Irecv(sr, 6, MPI_DOUBLE, partner, 8, MPI_COMM_WORLD, &rq[0]);
        MPI_Send(ss, 25, MPI_DOUBLE, partner, 8, MPI_COMM_WORLD);
        rc = MPI_Wait(&rq[0], &st);
        MPI_Error_class(rc, &cls);
        CHECK(cls == MPI_ERR_TRUNCATE, "tiny: error class %d (rc %d), wanted MPI_ERR_TRUNCATE", cls, rc);
        cu.cuMemcpyDtoH(got, (CUdeviceptr)(uintptr_t)sr, sizeof got);
        int untouched = 1, fits = 1;
        for (int i = 0; i < 8; i++) {
            untouched &= got[i] == -2.0;
            fits &= got[i] == (i < 6 ? value(partner, 250, i) : -2.0);
        }
        CHECK(untouched || fits, "tiny: the receive holds neither nothing nor the part that fits");
        MPI_Barrier(MPI_COMM_WORLD);
        cu.cuMemFree((CUdeviceptr)(uintptr_t)ss);
        cu.cuMemFree((CUdeviceptr)(uintptr_t)sr);
    }

    /* cancel */
    clear(dev[2], ELEMENTS);
    clear(dev[3], ELEMENTS);
    MPI_Irecv(dev[2], 1, vec, partner, 99, MPI_COMM_WORLD, &rq[0]);
    MPI_Cancel(&rq[0]);
    MPI_Wait(&rq[0], &st);
    int cancelled = 0;
    MPI_Test_cancelled(&st, &cancelled);
    CHECK(cancelled, "cancel: the receive was not cancelled");
    MPI_Barrier(MPI_COMM_WORLD);
    MPI_Irecv(dev[3], 1, vec, partner, 99, MPI_COMM_WORLD, &rq[0]);
    fill(host, rank, 300, ELEMENTS);
    put(send_dev, host, ELEMENTS);
    MPI_Send(send_dev, 1, vec, partner, 99, MPI_COMM_WORLD);
    MPI_Wait(&rq[0], MPI_STATUS_IGNORE);
    check_vector(dev[3], partner, 300, ELEMENTS, ELEMENTS, "cancel: the next receive");
    check_vector(dev[2], partner, 300, 0, ELEMENTS, "cancel: the cancelled buffer untouched");

    /* blocking, a contiguous type, MPI_Ssend */
    enum { N = 4096 };
    double *ch = malloc(N * sizeof(double));
    void *cd = device_alloc(N * sizeof(double)), *cr = device_alloc(N * sizeof(double));
    for (int i = 0; i < N; i++) ch[i] = value(rank, 400, i);
    cu.cuMemcpyHtoD((CUdeviceptr)(uintptr_t)cd, ch, N * sizeof(double));
    for (int round = 0; round < 2; round++) {
        if (rank % 2 == 0) {
            (round ? MPI_Ssend : MPI_Send)(cd, N, MPI_DOUBLE, partner, 11, MPI_COMM_WORLD);
            MPI_Recv(cr, N, MPI_DOUBLE, partner, 11, MPI_COMM_WORLD, &st);
        } else {
            MPI_Recv(cr, N, MPI_DOUBLE, partner, 11, MPI_COMM_WORLD, &st);
            (round ? MPI_Ssend : MPI_Send)(cd, N, MPI_DOUBLE, partner, 11, MPI_COMM_WORLD);
        }
        MPI_Get_count(&st, MPI_DOUBLE, &count);
        cu.cuMemcpyDtoH(ch, (CUdeviceptr)(uintptr_t)cr, N * sizeof(double));
        int bad = count != N;
        for (int i = 0; i < N; i++) bad += ch[i] != value(partner, 400, i);
        CHECK(!bad, "blocking round %d: count %d, %d wrong", round, count, bad);
    }

    /* to itself: the arena is read in place */
    clear(dev[5], ELEMENTS);
    MPI_Irecv(dev[5], 1, vec, rank, 23, MPI_COMM_WORLD, &rq[0]);
    fill(host, rank, 800, ELEMENTS);
    put(send_dev, host, ELEMENTS);
    MPI_Send(send_dev, 1, vec, rank, 23, MPI_COMM_WORLD);
    MPI_Wait(&rq[0], MPI_STATUS_IGNORE);
    check_vector(dev[5], rank, 800, ELEMENTS, ELEMENTS, "self");

    /* recycle: 200 x 2 MiB through the arenas */
    enum { BIG = 1 << 18 }; /* doubles: 2 MiB */
    void *bs = device_alloc(BIG * sizeof(double)), *br = device_alloc(BIG * sizeof(double));
    double *bh = malloc(BIG * sizeof(double));
    for (int i = 0; i < BIG; i++) bh[i] = value(rank, 500, i);
    cu.cuMemcpyHtoD((CUdeviceptr)(uintptr_t)bs, bh, BIG * sizeof(double));
    for (int m = 0; m < 200; m++) {
        MPI_Request two_req[2];
        MPI_Irecv(br, BIG, MPI_DOUBLE, partner, 13, MPI_COMM_WORLD, &two_req[0]);
        MPI_Isend(bs, BIG, MPI_DOUBLE, partner, 13, MPI_COMM_WORLD, &two_req[1]);
        MPI_Waitall(2, two_req, MPI_STATUSES_IGNORE);
    }
    cu.cuMemcpyDtoH(bh, (CUdeviceptr)(uintptr_t)br, BIG * sizeof(double));
    int bad = 0;
    for (int i = 0; i < BIG; i++) bad += bh[i] != value(partner, 500, i);
    CHECK(!bad, "recycle: %d wrong doubles", bad);

    /* burst: 26 nonblocking sends, then the even rank sits in MPI_Barrier (not wrapped by
     * commlib) while the odd one takes them with blocking receives - their packs wait for
     * one launch, which only the even rank's burst thread can make then (transfer/ipc.h);
     * the odd rank's own burst goes at its first MPI_Recv */
    {
        enum { B = 26 };
        char *bsend = device_alloc(B * span), *brecv = device_alloc(B * span);
        MPI_Request bq[B];
        for (int m = 0; m < B; m++) {
            fill(host, rank, 800 + m, ELEMENTS);
            put(bsend + m * span, host, ELEMENTS);
            clear(brecv + m * span, ELEMENTS);
        }
        for (int m = 0; m < B; m++) MPI_Isend(bsend + m * span, 1, vec, partner, 41, MPI_COMM_WORLD, &bq[m]);
        if (rank % 2 == 0) MPI_Barrier(MPI_COMM_WORLD);
        for (int m = 0; m < B; m++) MPI_Recv(brecv + m * span, 1, vec, partner, 41, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        if (rank % 2) MPI_Barrier(MPI_COMM_WORLD);
        CHECK(MPI_Waitall(B, bq, MPI_STATUSES_IGNORE) == MPI_SUCCESS, "burst: Waitall");
        for (int m = 0; m < B; m++) check_vector(brecv + m * span, partner, 800 + m, ELEMENTS, ELEMENTS, "burst");
        MPI_Barrier(MPI_COMM_WORLD);
        cu.cuMemFree((CUdeviceptr)(uintptr_t)bsend);
        cu.cuMemFree((CUdeviceptr)(uintptr_t)brecv);
    }

    /* direct: the sender's own buffer, kept until the receiver has copied it */
    const char *expect_env = getenv("IPC_P2P_EXPECT_DIRECT");
    int expect_direct = expect_env && !strcmp(expect_env, "1");
    for (int round = 0; round < 3; round++) {
        void *ds = device_alloc(BIG * sizeof(double));
        for (int i = 0; i < BIG; i++) bh[i] = value(rank, 900 + round, i);
        cu.cuMemcpyHtoD((CUdeviceptr)(uintptr_t)ds, bh, BIG * sizeof(double));
        MPI_Request dq[2];
        int done = -1;
        if (round < 2) { /* Isend first; the partner receives only after the barrier */
            MPI_Isend(ds, BIG, MPI_DOUBLE, partner, 31, MPI_COMM_WORLD, &dq[0]);
            MPI_Test(&dq[0], &done, MPI_STATUS_IGNORE);
            MPI_Barrier(MPI_COMM_WORLD);
            MPI_Irecv(br, BIG, MPI_DOUBLE, partner, 31, MPI_COMM_WORLD, &dq[1]);
            CHECK(MPI_Waitall(done ? 1 : 2, done ? dq + 1 : dq, MPI_STATUSES_IGNORE) == MPI_SUCCESS, "direct: Waitall");
            if (expect_direct) CHECK(!done, "direct round %d: the send completed before its receive was posted", round);
        } else { /* blocking, the safe order */
            if (rank % 2 == 0) {
                CHECK(MPI_Send(ds, BIG, MPI_DOUBLE, partner, 32, MPI_COMM_WORLD) == MPI_SUCCESS, "direct: Send");
                MPI_Recv(br, BIG, MPI_DOUBLE, partner, 32, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
            } else {
                MPI_Recv(br, BIG, MPI_DOUBLE, partner, 32, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
                CHECK(MPI_Send(ds, BIG, MPI_DOUBLE, partner, 32, MPI_COMM_WORLD) == MPI_SUCCESS, "direct: Send");
            }
        }
        cu.cuMemcpyDtoH(bh, (CUdeviceptr)(uintptr_t)br, BIG * sizeof(double));
        bad = 0;
        for (int i = 0; i < BIG; i++) bad += bh[i] != value(partner, 900 + round, i);
        CHECK(!bad, "direct round %d: %d wrong doubles", round, bad);
        MPI_Barrier(MPI_COMM_WORLD); /* the partner has read ds: it may go */
        cu.cuMemFree((CUdeviceptr)(uintptr_t)ds);
    }

    /* strided: every other double, 1 MiB of payload over a 2 MiB span (BIG doubles), by
     * MPI_Isend/MPI_Irecv and by MPI_Send/MPI_Recv - with the progress thread read from the
     * sender's buffer straight into the receive's in one pass (device_copy_piece); the gaps
     * keep the receiver's poison */
    {
        MPI_Datatype every_other;
        MPI_Type_vector(BIG / 2, 1, 2, MPI_DOUBLE, &every_other);
        MPI_Type_commit(&every_other);
        void *ss = device_alloc(BIG * sizeof(double));
        for (int round = 0; round < 2; round++) {
            for (int i = 0; i < BIG; i++) bh[i] = value(rank, 960 + round, i);
            cu.cuMemcpyHtoD((CUdeviceptr)(uintptr_t)ss, bh, BIG * sizeof(double));
            for (int i = 0; i < BIG; i++) bh[i] = -3.0;
            cu.cuMemcpyHtoD((CUdeviceptr)(uintptr_t)br, bh, BIG * sizeof(double));
            if (round == 0) {
                MPI_Request sq[2];
                MPI_Irecv(br, 1, every_other, partner, 38, MPI_COMM_WORLD, &sq[0]);
                MPI_Isend(ss, 1, every_other, partner, 38, MPI_COMM_WORLD, &sq[1]);
                CHECK(MPI_Waitall(2, sq, MPI_STATUSES_IGNORE) == MPI_SUCCESS, "strided: Waitall");
            } else if (rank % 2 == 0) {
                CHECK(MPI_Send(ss, 1, every_other, partner, 39, MPI_COMM_WORLD) == MPI_SUCCESS, "strided: Send");
                MPI_Recv(br, 1, every_other, partner, 39, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
            } else {
                MPI_Recv(br, 1, every_other, partner, 39, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
                CHECK(MPI_Send(ss, 1, every_other, partner, 39, MPI_COMM_WORLD) == MPI_SUCCESS, "strided: Send");
            }
            cu.cuMemcpyDtoH(bh, (CUdeviceptr)(uintptr_t)br, BIG * sizeof(double));
            bad = 0;
            for (int i = 0; i < BIG; i++) bad += bh[i] != (i % 2 ? -3.0 : value(partner, 960 + round, i));
            CHECK(!bad, "strided round %d: %d wrong doubles (elements or gaps)", round, bad);
            MPI_Barrier(MPI_COMM_WORLD); /* the partner has read ss: it may be written again */
        }
        cu.cuMemFree((CUdeviceptr)(uintptr_t)ss);
        MPI_Type_free(&every_other);
    }

    /* waiting: the receiver waits for a later host message while a direct message it
     * already posted the receive for is the sender's condition for sending it (legal MPI:
     * the posted receive lets the send complete).  With the progress thread, the receiver's
     * copy and acknowledgement must happen while its program waits inside MPI_Wait. */
    {
        void *ds = device_alloc(BIG * sizeof(double));
        for (int i = 0; i < BIG; i++) bh[i] = value(rank, 950, i);
        cu.cuMemcpyHtoD((CUdeviceptr)(uintptr_t)ds, bh, BIG * sizeof(double));
        MPI_Request wq[2];
        int token = -1;
        if (rank % 2 == 0) {
            MPI_Irecv(br, BIG, MPI_DOUBLE, partner, 36, MPI_COMM_WORLD, &wq[0]);
            MPI_Irecv(&token, 1, MPI_INT, partner, 37, MPI_COMM_WORLD, &wq[1]);
            CHECK(MPI_Wait(&wq[1], MPI_STATUS_IGNORE) == MPI_SUCCESS && token == 950, "waiting: token %d", token);
            CHECK(MPI_Wait(&wq[0], MPI_STATUS_IGNORE) == MPI_SUCCESS, "waiting: Wait");
            cu.cuMemcpyDtoH(bh, (CUdeviceptr)(uintptr_t)br, BIG * sizeof(double));
            bad = 0;
            for (int i = 0; i < BIG; i++) bad += bh[i] != value(partner, 950, i);
            CHECK(!bad, "waiting: %d wrong doubles", bad);
        } else {
            MPI_Isend(ds, BIG, MPI_DOUBLE, partner, 36, MPI_COMM_WORLD, &wq[0]);
            CHECK(MPI_Wait(&wq[0], MPI_STATUS_IGNORE) == MPI_SUCCESS, "waiting: send Wait");
            token = 950;
            MPI_Send(&token, 1, MPI_INT, partner, 37, MPI_COMM_WORLD);
        }
        MPI_Barrier(MPI_COMM_WORLD);
        cu.cuMemFree((CUdeviceptr)(uintptr_t)ds);
    }

    /* a direct message truncated inside its descriptor (a receive of 48 B): the blocking
     * send still completes - the receiver acknowledges what it could not take */
    {
        void *ds = device_alloc(BIG * sizeof(double)), *sr = device_alloc(8 * sizeof(double));
        MPI_Request tq;
        MPI_Irecv(sr, 6, MPI_DOUBLE, partner, 35, MPI_COMM_WORLD, &tq);
        CHECK(MPI_Send(ds, BIG, MPI_DOUBLE, partner, 35, MPI_COMM_WORLD) == MPI_SUCCESS, "tiny direct: Send");
        int trc = MPI_Wait(&tq, &st), tcls = -1;
        MPI_Error_class(trc, &tcls);
        CHECK(tcls == MPI_ERR_TRUNCATE, "tiny direct: error class %d, wanted MPI_ERR_TRUNCATE", tcls);
        MPI_Barrier(MPI_COMM_WORLD);
        cu.cuMemFree((CUdeviceptr)(uintptr_t)ds);
        cu.cuMemFree((CUdeviceptr)(uintptr_t)sr);
    }

    enum { MIB = 1 << 17 }; /* doubles: 1 MiB */
    for (int round = 0; round < 70; round++) {
        void *ds = device_alloc(MIB * sizeof(double));
        for (int i = 0; i < MIB; i += 512) bh[i] = value(rank, 1000 + round, i);
        for (int i = 0; i < MIB; i += 512) cu.cuMemcpyHtoD((CUdeviceptr)(uintptr_t)ds + i * sizeof(double), bh + i, 8);
        MPI_Request dq[2];
        MPI_Irecv(br, MIB, MPI_DOUBLE, partner, 33, MPI_COMM_WORLD, &dq[0]);
        MPI_Isend(ds, MIB, MPI_DOUBLE, partner, 33, MPI_COMM_WORLD, &dq[1]);
        CHECK(MPI_Waitall(2, dq, MPI_STATUSES_IGNORE) == MPI_SUCCESS, "many buffers: Waitall");
        cu.cuMemcpyDtoH(bh, (CUdeviceptr)(uintptr_t)br, MIB * sizeof(double));
        bad = 0;
        for (int i = 0; i < MIB; i += 512) bad += bh[i] != value(partner, 1000 + round, i);
        CHECK(!bad, "many buffers, round %d: %d wrong", round, bad);
        MPI_Barrier(MPI_COMM_WORLD);
        cu.cuMemFree((CUdeviceptr)(uintptr_t)ds);
    }

    /* full: 8 x 4 MiB in flight before the partner receives (the test sets a 16 MiB budget) */
    enum { HUGE = 1 << 19, F = 8 };
    void *fs[F], *fr[F];
    double *fh = malloc(HUGE * sizeof(double));
    for (int m = 0; m < F; m++) {
        fs[m] = device_alloc(HUGE * sizeof(double));
        fr[m] = device_alloc(HUGE * sizeof(double));
        for (int i = 0; i < HUGE; i += 1024) fh[i] = value(rank, 600 + m, i);
        cu.cuMemcpyHtoD((CUdeviceptr)(uintptr_t)fs[m], fh, HUGE * sizeof(double));
    }
    MPI_Request fq[2 * F];
    for (int m = 0; m < F; m++) MPI_Isend(fs[m], HUGE, MPI_DOUBLE, partner, 17, MPI_COMM_WORLD, &fq[m]);
    MPI_Barrier(MPI_COMM_WORLD);
    for (int m = 0; m < F; m++) MPI_Irecv(fr[m], HUGE, MPI_DOUBLE, partner, 17, MPI_COMM_WORLD, &fq[F + m]);
    CHECK(MPI_Waitall(2 * F, fq, MPI_STATUSES_IGNORE) == MPI_SUCCESS, "full: Waitall");
    for (int m = 0; m < F; m++) {
        cu.cuMemcpyDtoH(fh, (CUdeviceptr)(uintptr_t)fr[m], HUGE * sizeof(double));
        bad = 0;
        for (int i = 0; i < HUGE; i += 1024) bad += fh[i] != value(partner, 600 + m, i);
        CHECK(!bad, "full: message %d: %d wrong", m, bad);
    }

    /* another (pretended) node: staged, both ways */
    if (far >= 0) {
        clear(dev[4], ELEMENTS);
        int from = (rank + size - 2) % size;
        MPI_Irecv(dev[4], 1, vec, from, 21, MPI_COMM_WORLD, &rq[0]);
        fill(host, rank, 700, ELEMENTS);
        put(send_dev, host, ELEMENTS);
        MPI_Send(send_dev, 1, vec, far, 21, MPI_COMM_WORLD);
        MPI_Wait(&rq[0], MPI_STATUS_IGNORE);
        check_vector(dev[4], from, 700, ELEMENTS, ELEMENTS, "far");
    }

    MPI_Barrier(MPI_COMM_WORLD);
    printf("ipc_p2p: rank %d done failures=%d\n", rank, failures);
    MPI_Type_free(&vec);
    MPI_Finalize();
    return failures ? 1 : 0;
}
