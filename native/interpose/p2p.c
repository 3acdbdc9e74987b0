/* Point-to-point calls with buffers the host MPI may not read: device (or managed)
 * memory, and with COMMLIB_STAGE_HOST=1 host memory too.  Such a buffer goes through
 * host staging (transfer/staged.h); every other call, and every call with COMMLIB_DISABLE,
 * reaches the host MPI unchanged.  Nonblocking calls return the host MPI's own request
 * and leave what remains to do in the side table (progress/requests.h). */
#include "../progress/requests.h"
#include "../cuda/device.h"
#include "../transfer/ipc.h"
#include "../transfer/pipeline.h"
#include "commlib.h"
#include "interpose.h"

typedef int (*send_fn)(const void *, int, MPI_Datatype, int, int, MPI_Comm);
typedef int (*isend_fn)(const void *, int, MPI_Datatype, int, int, MPI_Comm, MPI_Request *);

/* Device memory that could not be staged cannot go to the host MPI either: report it
 * the way the MPI reports errors, through the communicator's error handler. */
static int staging_failed(MPI_Comm comm)
{
    PMPI_Comm_call_errhandler(comm, MPI_ERR_OTHER);
    return MPI_ERR_OTHER;
}

static int send_any(send_fn send, const void *buf, int count, MPI_Datatype type, int dest, int tag, MPI_Comm comm)
{
    ipc_flush_pending(); /* about to block: a burst of sends before it goes now (transfer/ipc.h) */
    requests_progress();
    staged_transfer *t;
    /* a buffered send completes without the receiver: never direct (transfer/ipc.h) */
    int s = ipc_send_prepare(&t, buf, count, type, dest, comm, send != PMPI_Bsend ? IPC_DIRECT_BLOCKING : 0);
    /* a buffered send completes locally: never pipelined either (transfer/pipeline.h) */
    if (s != STAGED_YES && send != PMPI_Bsend) s = pipeline_send_prepare(&t, buf, count, type, dest, comm);
    if (s != STAGED_YES) s = staged_send_prepare(&t, buf, count, type);
    if (s == STAGED_FORWARD) return KEPT_OUT(send(buf, count, type, dest, tag, comm));
    if (s == STAGED_FAILED) return staging_failed(comm);
    /* blocking (and buffered) sends are done with the buffer when they return */
    int rc = KEPT_OUT(send(t->wire_buf, t->wire_count, t->wire_type, dest, tag, comm));
    if (t->ipc_unsynced && !ipc_send_settle(t, 0) && rc == MPI_SUCCESS) rc = MPI_ERR_OTHER; /* the pack ran */
    if (t->pipe && rc == MPI_SUCCESS) rc = pipeline_send_chunks(t); /* the descriptor first, then the chunks */
    if (t->companion_pending) { /* direct: the receiver has copied the buffer */
        int acked = rc == MPI_SUCCESS ? PMPI_Wait(&t->companion, MPI_STATUS_IGNORE) : PMPI_Cancel(&t->companion);
        if (rc != MPI_SUCCESS) PMPI_Request_free(&t->companion);
        else rc = acked;
        t->companion_pending = 0;
    }
    staged_release(t);
    return rc;
}

static int isend_any(isend_fn isend, const void *buf, int count, MPI_Datatype type, int dest, int tag, MPI_Comm comm,
                     MPI_Request *request)
{
    requests_progress();
    staged_transfer *t;
    int s = ipc_send_prepare(&t, buf, count, type, dest, comm, isend != PMPI_Ibsend ? IPC_DIRECT_NONBLOCKING : 0);
    if (s != STAGED_YES && isend != PMPI_Ibsend) s = pipeline_send_prepare(&t, buf, count, type, dest, comm);
    if (s != STAGED_YES) s = staged_send_prepare(&t, buf, count, type);
    if (s == STAGED_FORWARD) return isend(buf, count, type, dest, tag, comm, request);
    if (s == STAGED_FAILED) return staging_failed(comm);
    int rc = isend(t->wire_buf, t->wire_count, t->wire_type, dest, tag, comm, request);
    if (rc == MPI_SUCCESS) {
        /* the descriptor is posted: the chunks follow as their copies off the GPU end, posted
         * by whatever polls next (a failure is reported here; the request stays the program's) */
        if (t->pipe) rc = pipeline_send_start(t);
        requests_add(*request, t);
    } else {
        if (t->companion_pending) {
            PMPI_Cancel(&t->companion);
            PMPI_Request_free(&t->companion);
        }
        staged_release(t);
    }
    return rc;
}

#define SEND_ENTRY(name, fn)                                                                                   \
    COMMLIB_EXPORT int name(const void *buf, int count, MPI_Datatype type, int dest, int tag, MPI_Comm comm) \
    {                                                                                                          \
        FORWARD_IF_DISABLED(fn(buf, count, type, dest, tag, comm));                                            \
        return send_any(fn, buf, count, type, dest, tag, comm);                                                \
    }
SEND_ENTRY(MPI_Send, PMPI_Send)
SEND_ENTRY(MPI_Ssend, PMPI_Ssend)
SEND_ENTRY(MPI_Rsend, PMPI_Rsend)
SEND_ENTRY(MPI_Bsend, PMPI_Bsend) /* the MPI copies the packed bytes into the attached buffer */

#define ISEND_ENTRY(name, fn)                                                                                  \
    COMMLIB_EXPORT int name(const void *buf, int count, MPI_Datatype type, int dest, int tag, MPI_Comm comm, \
                            MPI_Request *request)                                                              \
    {                                                                                                          \
        FORWARD_IF_DISABLED(fn(buf, count, type, dest, tag, comm, request));                                   \
        return isend_any(fn, buf, count, type, dest, tag, comm, request);                                      \
    }
ISEND_ENTRY(MPI_Isend, PMPI_Isend)
ISEND_ENTRY(MPI_Issend, PMPI_Issend)
ISEND_ENTRY(MPI_Irsend, PMPI_Irsend)
ISEND_ENTRY(MPI_Ibsend, PMPI_Ibsend)

COMMLIB_EXPORT int MPI_Recv(void *buf, int count, MPI_Datatype type, int source, int tag, MPI_Comm comm,
                            MPI_Status *status)
{
    FORWARD_IF_DISABLED(PMPI_Recv(buf, count, type, source, tag, comm, status));
    ipc_flush_pending();
    requests_progress();
    staged_transfer *t;
    int s = staged_recv_prepare(&t, buf, count, type);
    if (s == STAGED_FORWARD) return KEPT_OUT(PMPI_Recv(buf, count, type, source, tag, comm, status));
    if (s == STAGED_FAILED) return staging_failed(comm);
    MPI_Status local, *st = status == MPI_STATUS_IGNORE ? &local : status;
    int rc = KEPT_OUT(PMPI_Recv(t->wire_buf, t->wire_count, t->wire_type, source, tag, comm, st));
    int finished = staged_complete(t, st, rc);
    return rc != MPI_SUCCESS ? rc : finished;
}

COMMLIB_EXPORT int MPI_Irecv(void *buf, int count, MPI_Datatype type, int source, int tag, MPI_Comm comm,
                             MPI_Request *request)
{
    FORWARD_IF_DISABLED(PMPI_Irecv(buf, count, type, source, tag, comm, request));
    requests_progress();
    staged_transfer *t;
    int s = staged_recv_prepare(&t, buf, count, type);
    if (s == STAGED_FORWARD) return PMPI_Irecv(buf, count, type, source, tag, comm, request);
    if (s == STAGED_FAILED) return staging_failed(comm);
    int rc = PMPI_Irecv(t->wire_buf, t->wire_count, t->wire_type, source, tag, comm, request);
    if (rc == MPI_SUCCESS) requests_add(*request, t);
    else staged_release(t);
    return rc;
}

/* Either side may be staged on its own: device send with host receive and so on.  With
 * replace, both sides are the same buffer; staged, they get separate staging buffers. */
static int sendrecv_any(const void *sendbuf, int sendcount, MPI_Datatype sendtype, int dest, int sendtag, void *recvbuf,
                        int recvcount, MPI_Datatype recvtype, int source, int recvtag, MPI_Comm comm,
                        MPI_Status *status, int replace)
{
    ipc_flush_pending();
    requests_progress();
    staged_transfer *out, *in = NULL;
    int s = staged_send_prepare(&out, sendbuf, sendcount, sendtype);
    int r = s == STAGED_FAILED ? STAGED_FORWARD : staged_recv_prepare(&in, recvbuf, recvcount, recvtype);
    if (s == STAGED_FAILED || r == STAGED_FAILED) {
        staged_release(out);
        staged_release(in);
        return staging_failed(comm);
    }
    /* with replace, one side may be staged and the other handed to a CUDA-aware MPI as it
     * is: PMPI_Sendrecv then reads the buffer while the reply lands in staging */
    if (replace && !out && !in)
        return KEPT_OUT(
            PMPI_Sendrecv_replace(recvbuf, recvcount, recvtype, dest, sendtag, source, recvtag, comm, status));
    if (out) sendbuf = out->wire_buf, sendcount = out->wire_count, sendtype = out->wire_type;
    if (in) recvbuf = in->wire_buf, recvcount = in->wire_count, recvtype = in->wire_type;
    MPI_Status local, *st = in && status == MPI_STATUS_IGNORE ? &local : status;
    int rc = KEPT_OUT(PMPI_Sendrecv(sendbuf, sendcount, sendtype, dest, sendtag, recvbuf, recvcount, recvtype,
                                    source, recvtag, comm, st));
    staged_release(out);
    int finished = in ? staged_complete(in, st, rc) : MPI_SUCCESS;
    return rc != MPI_SUCCESS ? rc : finished;
}

COMMLIB_EXPORT int MPI_Sendrecv(const void *sendbuf, int sendcount, MPI_Datatype sendtype, int dest, int sendtag,
                                void *recvbuf, int recvcount, MPI_Datatype recvtype, int source, int recvtag,
                                MPI_Comm comm, MPI_Status *status)
{
    FORWARD_IF_DISABLED(PMPI_Sendrecv(sendbuf, sendcount, sendtype, dest, sendtag, recvbuf, recvcount, recvtype,
                                      source, recvtag, comm, status));
    return sendrecv_any(sendbuf, sendcount, sendtype, dest, sendtag, recvbuf, recvcount, recvtype, source, recvtag,
                        comm, status, 0);
}

COMMLIB_EXPORT int MPI_Sendrecv_replace(void *buf, int count, MPI_Datatype type, int dest, int sendtag, int source,
                                        int recvtag, MPI_Comm comm, MPI_Status *status)
{
    FORWARD_IF_DISABLED(PMPI_Sendrecv_replace(buf, count, type, dest, sendtag, source, recvtag, comm, status));
    return sendrecv_any(buf, count, type, dest, sendtag, buf, count, type, source, recvtag, comm, status, 1);
}

/* Matched receives (after MPI_Mprobe / MPI_Improbe): the message handle carries no
 * communicator, so a staging failure is reported on MPI_COMM_WORLD. */
COMMLIB_EXPORT int MPI_Mrecv(void *buf, int count, MPI_Datatype type, MPI_Message *message, MPI_Status *status)
{
    FORWARD_IF_DISABLED(PMPI_Mrecv(buf, count, type, message, status));
    ipc_flush_pending();
    requests_progress();
    staged_transfer *t;
    int s = staged_recv_prepare(&t, buf, count, type);
    if (s == STAGED_FORWARD) return KEPT_OUT(PMPI_Mrecv(buf, count, type, message, status));
    if (s == STAGED_FAILED) return staging_failed(MPI_COMM_WORLD);
    MPI_Status local, *st = status == MPI_STATUS_IGNORE ? &local : status;
    int rc = KEPT_OUT(PMPI_Mrecv(t->wire_buf, t->wire_count, t->wire_type, message, st));
    int finished = staged_complete(t, st, rc);
    return rc != MPI_SUCCESS ? rc : finished;
}

COMMLIB_EXPORT int MPI_Imrecv(void *buf, int count, MPI_Datatype type, MPI_Message *message, MPI_Request *request)
{
    FORWARD_IF_DISABLED(PMPI_Imrecv(buf, count, type, message, request));
    requests_progress();
    staged_transfer *t;
    int s = staged_recv_prepare(&t, buf, count, type);
    if (s == STAGED_FORWARD) return PMPI_Imrecv(buf, count, type, message, request);
    if (s == STAGED_FAILED) return staging_failed(MPI_COMM_WORLD);
    int rc = PMPI_Imrecv(t->wire_buf, t->wire_count, t->wire_type, message, request);
    if (rc == MPI_SUCCESS) requests_add(*request, t);
    else staged_release(t);
    return rc;
}
