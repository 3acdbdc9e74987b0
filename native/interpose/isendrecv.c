/* MPI_Isendrecv and MPI_Isendrecv_replace (MPI 4.0) with staged buffers.
 *
 * One program request must complete when both halves did, and commlib never invents
 * request handles.  The design: the halves are posted as a host MPI_Irecv (into the
 * program's buffer or into staging) and a host MPI_Isend of commlib's own; the program
 * gets the receive's host request - the status MPI_Isendrecv reports is the receive's
 * anyway - and the side-table entry of that request carries the send request as its
 * "companion" (progress/requests.h).  The entry's holder tests or waits the companion
 * too: MPI_Wait and MPI_Waitall wait it after the host MPI completed the receive; a
 * test-type call tests it first and, while it is pending, hides the program's request
 * from the host MPI (as MPI_REQUEST_NULL in its array, restored afterwards), so the
 * request reads as still active; MPI_Waitany and MPI_Waitsome over such a request poll
 * their test forms (blocking on the receive and then on the send could hold back another
 * request the call should return first); the progress thread and MPI_Request_get_status
 * finish the entry only when both completed; MPI_Cancel cancels both halves.
 *
 * Rejected: a generalized request (MPI_Grequest_start) as the program's handle.  The host
 * MPI cannot complete it by itself, so every blocking call that might hold one (MPI_Wait,
 * Waitany, ... with any mix of requests) would have to become a polling loop over the
 * test forms, spinning a core without the progress thread; and query_fn would have to
 * rebuild the receive's status (count, cancelled flag) through MPI_Status_set_* .  Here
 * MPI_Wait and MPI_Waitall stay the host MPI's own blocking calls, and only the any/some
 * waits poll, only while a send half is pending.
 *
 * Buffers neither half stages go to PMPI_Isendrecv(_replace) unchanged.  Replace with a
 * staged buffer: the send staging is filled at the call, the receive gets its own
 * staging, unpacked into the same buffer at completion. */
#include <stdlib.h>

#include "../progress/requests.h"
#include "commlib.h"
#include "interpose.h"

#if MPI_VERSION >= 4

static int staging_failed(MPI_Comm comm)
{
    PMPI_Comm_call_errhandler(comm, MPI_ERR_OTHER);
    return MPI_ERR_OTHER;
}

static int isendrecv_any(const void *sendbuf, int sendcount, MPI_Datatype sendtype, int dest, int sendtag,
                         void *recvbuf, int recvcount, MPI_Datatype recvtype, int source, int recvtag, MPI_Comm comm,
                         MPI_Request *request, int replace)
{
    requests_progress();
    staged_transfer *out = NULL, *in = NULL;
    int s = staged_send_prepare(&out, sendbuf, sendcount, sendtype);
    int r = s == STAGED_FAILED ? STAGED_FORWARD : staged_recv_prepare(&in, recvbuf, recvcount, recvtype);
    if (s == STAGED_FAILED || r == STAGED_FAILED || (replace && s != r)) {
        staged_release(out);
        staged_release(in);
        return staging_failed(comm);
    }
    if (!out && !in)
        return replace ? PMPI_Isendrecv_replace(recvbuf, recvcount, recvtype, dest, sendtag, source, recvtag, comm,
                                                request)
                       : PMPI_Isendrecv(sendbuf, sendcount, sendtype, dest, sendtag, recvbuf, recvcount, recvtype,
                                        source, recvtag, comm, request);
    if (!in) { /* the receive goes straight to the program's host buffer; the entry carries the send */
        if (!(in = calloc(1, sizeof *in))) {
            staged_release(out);
            return staging_failed(comm);
        }
        *in = (staged_transfer){.wire_buf = recvbuf, .wire_count = recvcount, .wire_type = recvtype};
    }
    if (out) sendbuf = out->wire_buf, sendcount = out->wire_count, sendtype = out->wire_type;
    int rc = PMPI_Irecv(in->wire_buf, in->wire_count, in->wire_type, source, recvtag, comm, request);
    if (rc != MPI_SUCCESS) {
        staged_release(out);
        staged_release(in);
        return rc;
    }
    MPI_Request send_request;
    rc = PMPI_Isend(sendbuf, sendcount, sendtype, dest, sendtag, comm, &send_request);
    if (rc != MPI_SUCCESS) { /* withdraw the receive: the call failed as a whole */
        PMPI_Cancel(request);
        PMPI_Wait(request, MPI_STATUS_IGNORE);
        staged_release(out);
        staged_release(in);
        return rc;
    }
    in->companion = send_request;
    in->companion_pending = 1;
    in->linked = out;
    requests_add(*request, in);
    return MPI_SUCCESS;
}

COMMLIB_EXPORT int MPI_Isendrecv(const void *sendbuf, int sendcount, MPI_Datatype sendtype, int dest, int sendtag,
                                 void *recvbuf, int recvcount, MPI_Datatype recvtype, int source, int recvtag,
                                 MPI_Comm comm, MPI_Request *request)
{
    FORWARD_IF_DISABLED(PMPI_Isendrecv(sendbuf, sendcount, sendtype, dest, sendtag, recvbuf, recvcount, recvtype,
                                       source, recvtag, comm, request));
    return isendrecv_any(sendbuf, sendcount, sendtype, dest, sendtag, recvbuf, recvcount, recvtype, source, recvtag,
                         comm, request, 0);
}

COMMLIB_EXPORT int MPI_Isendrecv_replace(void *buf, int count, MPI_Datatype type, int dest, int sendtag, int source,
                                         int recvtag, MPI_Comm comm, MPI_Request *request)
{
    FORWARD_IF_DISABLED(PMPI_Isendrecv_replace(buf, count, type, dest, sendtag, source, recvtag, comm, request));
    return isendrecv_any(buf, count, type, dest, sendtag, buf, count, type, source, recvtag, comm, request, 1);
}

#endif
