/* Small device messages GPU to GPU (COMMLIB_IPC=1 COMMLIB_IPC_SMALL=1, transfer/ipc.h): a
 * device receive of under 192 bytes is posted for a descriptor's 192, so every message the
 * host MPI hands it - a descriptor, or a plain host send's bytes - must come out as MPI says
 * for the receive the program posted.  Ranks pair up (r, r ^ 1); device buffers come from
 * the CUDA driver (dlopen) and are checked after each section, bytes past the receive too.
 *   sizes      23 messages of 1..23 doubles (8..184 B) by MPI_Isend into MPI_Irecv, one
 *              MPI_Waitall; the double after each receive untouched
 *   order      8 messages of 2 doubles on one tag, device and host sends alternating, into 8
 *              device receives posted first: message i lands in receive i
 *   vector     3 doubles 2 apart (24 B packed), gaps untouched
 *   wildcards  MPI_ANY_SOURCE / MPI_ANY_TAG: status source, tag, MPI_Get_count
 *   truncate   into a receive of 1 double: 2 doubles from a device send (a descriptor), 2
 *              from a host send (16 B, under the posted 192: commlib truncates), 40 from a
 *              host send (320 B: the host MPI truncates at 192) - each MPI_ERR_TRUNCATE, the
 *              first double written, the next untouched, the status counting 8 bytes; by
 *              MPI_Recv, by MPI_Irecv + MPI_Wait and in an MPI_Waitall (MPI_ERR_IN_STATUS; not
 *              under Open MPI 4.1, whose MPI_Waitall hangs there: waitall_truncation_hangs)
 *   get_status MPI_Request_get_status polled on receives of 2 doubles, of 48 (over 192 bytes:
 *              GPU to GPU without the knob too) and of 1 (a device send of 2: truncated),
 *              then MPI_Wait: each reports the program's count and the truncation, the
 *              buffer written when get_status says complete
 *   blocking   MPI_Send into MPI_Recv, MPI_Ssend, MPI_Sendrecv between device buffers
 *   persistent MPI_Recv_init of one double, started 3 times against MPI_Isend
 *   cancel     a cancelled small device receive is cancelled; the next message goes to the next
 *   self       a rank's small message to itself
 * Prints "ipc_small: rank R device-sends=N done failures=F" (N: the MPI_Isend/MPI_Send/... calls on
 * device buffers it made); exit 1 on failure.  Even rank count. */
#define _GNU_SOURCE
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "pairs_start.h"

#define SLOT 64 /* doubles per receive slot: room past every receive for the untouched check */

static int rank, size, failures;

static double value(int stream, int message, int i) { return stream * 1e6 + message * 1e3 + i + 1; }

static double *device_alloc(size_t doubles)
{
    CUdeviceptr p = 0;
    CHECK(cu.cuMemAlloc(&p, doubles * sizeof(double)) == 0, "cuMemAlloc");
    return (double *)(uintptr_t)p;
}

static void put(double *dev, const double *host, int n)
{
    cu.cuMemcpyHtoD((CUdeviceptr)(uintptr_t)dev, host, (size_t)n * sizeof(double));
}

/* dev[0 .. SLOT) set to -2 */
static void clear(double *dev)
{
    double host[SLOT];
    for (int i = 0; i < SLOT; i++) host[i] = -2.0;
    put(dev, host, SLOT);
}

/* A contiguous message of n doubles from (stream, message), in host memory and on the device. */
static void fill(double *host, double *dev, int stream, int message, int n)
{
    for (int i = 0; i < n; i++) host[i] = value(stream, message, i);
    if (dev) put(dev, host, n);
}

/* dev holds `want` doubles from (stream, message) at every `step`-th place, -2 everywhere
 * else in the slot */
static void check_slot(const double *dev, int stream, int message, int want, int step, const char *what)
{
    double host[SLOT];
    cu.cuMemcpyDtoH(host, (CUdeviceptr)(uintptr_t)dev, sizeof host);
    int bad = 0;
    for (int i = 0; i < SLOT; i++) {
        double expect = i % step == 0 && i / step < want ? value(stream, message, i / step) : -2.0;
        bad += host[i] != expect;
    }
    CHECK(!bad, "%s: %d wrong doubles (stream %d message %d, %d wanted)", what, bad, stream, message, want);
}

static int error_class(int rc)
{
    int cls = rc;
    MPI_Error_class(rc, &cls);
    return cls;
}

/* The status of a truncated receive counts the bytes written (MPICH, and commlib where it
 * truncates) or the message's `sent` bytes (Open MPI 4.1 where it truncates). */
static void check_truncated(int rc, const MPI_Status *st, int sent, const char *what)
{
    int bytes = -1;
    MPI_Get_count(st, MPI_BYTE, &bytes);
    CHECK(error_class(rc) == MPI_ERR_TRUNCATE, "%s: error class %d (rc %d), wanted MPI_ERR_TRUNCATE", what,
          error_class(rc), rc);
    CHECK(bytes == 8 || bytes == sent, "%s: the status counts %d bytes, wanted 8 (or %d)", what, bytes, sent);
}

/* Open MPI 4.1's MPI_Waitall never returns when a request of the set completed with an error
 * (MPI_ERR_TRUNCATE) during progress made before the call (seen with 4.1.4: a plain program,
 * no commlib - an MPI_Barrier or an MPI_Request_get_status, as commlib's progress thread
 * makes, between the MPI_Irecv and the MPI_Waitall) */
static int waitall_truncation_hangs(void)
{
    char version[MPI_MAX_LIBRARY_VERSION_STRING];
    int len = 0;
    MPI_Get_library_version(version, &len);
    return strstr(version, "Open MPI v4.") != NULL;
}

int main(int argc, char **argv)
{
    if (!pairs_start(&argc, &argv, "ipc_small", &rank, &size)) return 0;
    int partner = rank ^ 1;
    enum { K = 23 };
    double *recv = device_alloc((size_t)K * SLOT), *send = device_alloc((size_t)K * SLOT);
    double host[SLOT * 2];
    MPI_Request rq[2 * K];
    MPI_Status st;

    /* sizes: 1..23 doubles, a halo's corners and edges of small grids */
    for (int i = 0; i < K; i++) {
        clear(recv + i * SLOT);
        MPI_Irecv(recv + i * SLOT, i + 1, MPI_DOUBLE, partner, 10 + i, MPI_COMM_WORLD, &rq[i]);
    }
    for (int i = 0; i < K; i++) {
        fill(host, send + i * SLOT, rank, i, i + 1);
        MPI_Isend(send + i * SLOT, i + 1, MPI_DOUBLE, partner, 10 + i, MPI_COMM_WORLD, &rq[K + i]);
    }
    CHECK(MPI_Waitall(2 * K, rq, MPI_STATUSES_IGNORE) == MPI_SUCCESS, "sizes: Waitall");
    for (int i = 0; i < K; i++) check_slot(recv + i * SLOT, partner, i, i + 1, 1, "sizes");

    /* order: device and host sends alternate on one tag */
    enum { O = 8 };
    double host_msgs[O][2];
    for (int i = 0; i < O; i++) {
        clear(recv + i * SLOT);
        MPI_Irecv(recv + i * SLOT, 2, MPI_DOUBLE, partner, 5, MPI_COMM_WORLD, &rq[i]);
    }
    MPI_Barrier(MPI_COMM_WORLD);
    for (int i = 0; i < O; i++) {
        fill(host_msgs[i], i % 2 ? NULL : send + i * SLOT, rank, 100 + i, 2);
        MPI_Isend(i % 2 ? (void *)host_msgs[i] : (void *)(send + i * SLOT), 2, MPI_DOUBLE, partner, 5, MPI_COMM_WORLD,
                  &rq[O + i]);
    }
    CHECK(MPI_Waitall(2 * O, rq, MPI_STATUSES_IGNORE) == MPI_SUCCESS, "order: Waitall");
    for (int i = 0; i < O; i++) check_slot(recv + i * SLOT, partner, 100 + i, 2, 1, "order");

    /* vector: 3 doubles 2 apart on both sides */
    MPI_Datatype vec;
    MPI_Type_vector(3, 1, 2, MPI_DOUBLE, &vec);
    MPI_Type_commit(&vec);
    clear(recv);
    MPI_Irecv(recv, 1, vec, partner, 6, MPI_COMM_WORLD, &rq[0]);
    for (int i = 0; i < 6; i++) host[i] = i % 2 ? -5.0 : value(rank, 200, i / 2);
    put(send, host, 6);
    MPI_Isend(send, 1, vec, partner, 6, MPI_COMM_WORLD, &rq[1]);
    CHECK(MPI_Waitall(2, rq, MPI_STATUSES_IGNORE) == MPI_SUCCESS, "vector: Waitall");
    check_slot(recv, partner, 200, 3, 2, "vector");

    /* wildcards */
    clear(recv);
    MPI_Irecv(recv, 1, MPI_DOUBLE, MPI_ANY_SOURCE, MPI_ANY_TAG, MPI_COMM_WORLD, &rq[0]);
    fill(host, send, rank, 300, 1);
    MPI_Send(send, 1, MPI_DOUBLE, partner, 42 + rank, MPI_COMM_WORLD);
    CHECK(MPI_Wait(&rq[0], &st) == MPI_SUCCESS, "wildcards: Wait");
    int count = -1;
    MPI_Get_count(&st, MPI_DOUBLE, &count);
    CHECK(st.MPI_SOURCE == partner && st.MPI_TAG == 42 + partner && count == 1, "wildcards: source %d tag %d count %d",
          st.MPI_SOURCE, st.MPI_TAG, count);
    check_slot(recv, partner, 300, 1, 1, "wildcards");
    MPI_Barrier(MPI_COMM_WORLD);

    /* truncate: into receives of one double; tag 20 a device send of 2, 21 a host send of 2,
     * 22 a host send of 40 (over the 192 bytes posted) */
    static const char *kinds[3] = {"device 16 B", "host 16 B", "host 320 B"};
    int ways = waitall_truncation_hangs() ? 2 : 3;
    for (int how = 0; how < ways; how++) { /* 0 MPI_Recv, 1 MPI_Irecv + MPI_Wait, 2 MPI_Waitall */
        MPI_Request sq[3];
        double big[40]; /* the host sends' buffers stay untouched until their MPI_Waitall below */
        for (int k = 0; k < 3; k++) {
            int n = k == 2 ? 40 : 2;
            double *from = k == 2 ? big : host + k * 2;
            fill(from, NULL, rank, 400 + 10 * how + k, n);
            if (k == 0) put(send + k * SLOT, from, n);
            MPI_Isend(k == 0 ? (void *)(send + k * SLOT) : (void *)from, n, MPI_DOUBLE, partner, 20 + k,
                      MPI_COMM_WORLD, &sq[k]);
        }
        MPI_Status sts[3];
        int rcs[3];
        for (int k = 0; k < 3; k++) clear(recv + k * SLOT);
        if (how == 0) {
            for (int k = 0; k < 3; k++)
                rcs[k] = MPI_Recv(recv + k * SLOT, 1, MPI_DOUBLE, partner, 20 + k, MPI_COMM_WORLD, &sts[k]);
        } else {
            for (int k = 0; k < 3; k++)
                MPI_Irecv(recv + k * SLOT, 1, MPI_DOUBLE, partner, 20 + k, MPI_COMM_WORLD, &rq[k]);
            if (how == 1) {
                for (int k = 0; k < 3; k++) rcs[k] = MPI_Wait(&rq[k], &sts[k]);
            } else {
                int rc = MPI_Waitall(3, rq, sts);
                CHECK(error_class(rc) == MPI_ERR_IN_STATUS, "truncate: Waitall error class %d", error_class(rc));
                /* a request the MPI left incomplete after the first error (MPI_ERR_PENDING)
                   is the program's to wait for again */
                for (int k = 0; k < 3; k++)
                    rcs[k] = error_class(sts[k].MPI_ERROR) == MPI_ERR_PENDING ? MPI_Wait(&rq[k], &sts[k])
                                                                              : sts[k].MPI_ERROR;
            }
        }
        for (int k = 0; k < 3; k++) {
            char what[64];
            snprintf(what, sizeof what, "truncate (%s, way %d)", kinds[k], how);
            check_truncated(rcs[k], &sts[k], k == 2 ? 320 : 16, what);
            check_slot(recv + k * SLOT, partner, 400 + 10 * how + k, 1, 1, what);
        }
        MPI_Waitall(3, sq, MPI_STATUSES_IGNORE);
        MPI_Barrier(MPI_COMM_WORLD);
    }

    /* get_status: MPI_Request_get_status polled until the receive completed, then MPI_Wait;
     * both report the program's count (not a descriptor's 192 bytes) and the truncation */
    {
        static const int sent[3] = {2, 48, 2}, posted[3] = {2, 48, 1};
        for (int k = 0; k < 3; k++) {
            clear(recv + k * SLOT);
            MPI_Irecv(recv + k * SLOT, posted[k], MPI_DOUBLE, partner, 30 + k, MPI_COMM_WORLD, &rq[k]);
        }
        for (int k = 0; k < 3; k++) {
            fill(host, send + k * SLOT, rank, 450 + k, sent[k]);
            MPI_Isend(send + k * SLOT, sent[k], MPI_DOUBLE, partner, 30 + k, MPI_COMM_WORLD, &rq[3 + k]);
        }
        for (int k = 0; k < 3; k++) {
            char what[64];
            int flag = 0, rc = MPI_SUCCESS, bytes = -1;
            for (int spins = 0; !flag && rc == MPI_SUCCESS && spins < 100000000; spins++) {
                st.MPI_ERROR = MPI_SUCCESS;
                rc = MPI_Request_get_status(rq[k], &flag, &st);
            }
            for (int call = 0; call < 2; call++) { /* MPI_Request_get_status, then MPI_Wait */
                snprintf(what, sizeof what, "get_status (%d of %d doubles, %s)", sent[k], posted[k],
                         call ? "MPI_Wait" : "MPI_Request_get_status");
                if (call) {
                    st.MPI_ERROR = MPI_SUCCESS;
                    rc = MPI_Wait(&rq[k], &st);
                } else {
                    CHECK(flag, "%s: never complete", what);
                    if (rc == MPI_SUCCESS) rc = st.MPI_ERROR; /* where Open MPI reports it */
                }
                if (k == 2) {
                    check_truncated(rc, &st, 16, what);
                } else {
                    MPI_Get_count(&st, MPI_BYTE, &bytes);
                    CHECK(rc == MPI_SUCCESS && bytes == 8 * sent[k], "%s: rc %d, %d bytes", what, rc, bytes);
                }
                check_slot(recv + k * SLOT, partner, 450 + k, posted[k], 1, what);
            }
        }
        MPI_Waitall(3, rq + 3, MPI_STATUSES_IGNORE);
        MPI_Barrier(MPI_COMM_WORLD);
    }

    /* blocking: MPI_Send / MPI_Ssend into MPI_Recv, then MPI_Sendrecv */
    for (int k = 0; k < 2; k++) {
        int (*send_fn)(const void *, int, MPI_Datatype, int, int, MPI_Comm) = k ? MPI_Ssend : MPI_Send;
        clear(recv);
        fill(host, send, rank, 500 + k, 3);
        for (int turn = 0; turn < 2; turn++) { /* even ranks send first */
            if (turn == rank % 2)
                CHECK(send_fn(send, 3, MPI_DOUBLE, partner, 7, MPI_COMM_WORLD) == MPI_SUCCESS, "blocking send");
            else
                CHECK(MPI_Recv(recv, 3, MPI_DOUBLE, partner, 7, MPI_COMM_WORLD, &st) == MPI_SUCCESS, "blocking recv");
        }
        check_slot(recv, partner, 500 + k, 3, 1, "blocking");
    }
    clear(recv);
    fill(host, send, rank, 510, 4);
    CHECK(MPI_Sendrecv(send, 4, MPI_DOUBLE, partner, 8, recv, 4, MPI_DOUBLE, partner, 8, MPI_COMM_WORLD, &st) ==
              MPI_SUCCESS,
          "Sendrecv");
    MPI_Get_count(&st, MPI_DOUBLE, &count);
    CHECK(count == 4, "Sendrecv: count %d", count);
    check_slot(recv, partner, 510, 4, 1, "Sendrecv");

    /* persistent: one receive of one double started three times */
    MPI_Request persistent;
    MPI_Recv_init(recv, 1, MPI_DOUBLE, partner, 9, MPI_COMM_WORLD, &persistent);
    for (int k = 0; k < 3; k++) {
        clear(recv);
        MPI_Start(&persistent);
        fill(host, send, rank, 600 + k, 1);
        MPI_Isend(send, 1, MPI_DOUBLE, partner, 9, MPI_COMM_WORLD, &rq[0]);
        CHECK(MPI_Wait(&persistent, &st) == MPI_SUCCESS, "persistent: Wait");
        MPI_Get_count(&st, MPI_BYTE, &count);
        CHECK(count == 8, "persistent: %d bytes", count);
        MPI_Wait(&rq[0], MPI_STATUS_IGNORE);
        check_slot(recv, partner, 600 + k, 1, 1, "persistent");
    }
    MPI_Request_free(&persistent);

    /* cancel: the cancelled receive stays untouched, the message goes to the next one */
    clear(recv);
    clear(recv + SLOT);
    MPI_Irecv(recv, 1, MPI_DOUBLE, partner, 11, MPI_COMM_WORLD, &rq[0]);
    MPI_Cancel(&rq[0]);
    MPI_Wait(&rq[0], &st);
    int cancelled = 0;
    MPI_Test_cancelled(&st, &cancelled);
    CHECK(cancelled, "cancel: not cancelled");
    MPI_Barrier(MPI_COMM_WORLD); /* the partner's message comes after the cancel */
    MPI_Irecv(recv + SLOT, 1, MPI_DOUBLE, partner, 11, MPI_COMM_WORLD, &rq[0]);
    fill(host, send, rank, 700, 1);
    MPI_Send(send, 1, MPI_DOUBLE, partner, 11, MPI_COMM_WORLD);
    MPI_Wait(&rq[0], MPI_STATUS_IGNORE);
    check_slot(recv, partner, 700, 0, 1, "cancel: the cancelled receive");
    check_slot(recv + SLOT, partner, 700, 1, 1, "cancel: the next receive");

    /* self */
    clear(recv);
    MPI_Irecv(recv, 2, MPI_DOUBLE, rank, 12, MPI_COMM_WORLD, &rq[0]);
    fill(host, send, rank, 800, 2);
    MPI_Send(send, 2, MPI_DOUBLE, rank, 12, MPI_COMM_WORLD);
    CHECK(MPI_Wait(&rq[0], MPI_STATUS_IGNORE) == MPI_SUCCESS, "self: Wait");
    check_slot(recv, rank, 800, 2, 1, "self");

    MPI_Type_free(&vec);
    cu.cuMemFree((CUdeviceptr)(uintptr_t)recv);
    cu.cuMemFree((CUdeviceptr)(uintptr_t)send);
    /* sizes, order, vector, wildcards, truncate, get_status, blocking, MPI_Sendrecv, persistent, cancel, self */
    int device_sends = K + O / 2 + 1 + 1 + ways + 3 + 2 + 1 + 3 + 1 + 1;
    printf("ipc_small: rank %d device-sends=%d done failures=%d\n", rank, device_sends, failures);
    MPI_Finalize();
    return failures ? 1 : 0;
}
