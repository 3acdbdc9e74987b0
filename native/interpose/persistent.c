/* Persistent point-to-point with buffers the host MPI may not read (device memory, or any
 * with COMMLIB_STAGE_HOST=1): MPI_Send_init, Bsend_init, Ssend_init, Rsend_init,
 * Recv_init, MPI_Start and MPI_Startall.
 *
 * At init commlib stages the buffer as a nonblocking call would (transfer/staged.h: the
 * packed bytes as MPI_PACKED, or the span with the program's own type) and creates the
 * host MPI's own persistent request over the staging; the program gets that request, and
 * commlib parks an entry for it (progress/requests.h).  Each MPI_Start packs (or copies
 * the span) afresh for sends and copies a typed receive's span in, then starts the host
 * request and moves the entry into the side table, where the completion calls, or the
 * progress thread, find it like any staged operation; finishing a persistent entry
 * unpacks a receive and parks the entry again, staging kept.  MPI_Request_free releases
 * the staging (request.c).  Host buffers, zero counts and types only the host MPI can
 * judge are forwarded: their requests are plain host requests, and MPI_Startall passes
 * any mix of both kinds to the host MPI in one call. */
#include <stdlib.h>

#include "../progress/requests.h"
#include "commlib.h"
#include "interpose.h"

typedef int (*init_fn)(const void *, int, MPI_Datatype, int, int, MPI_Comm, MPI_Request *);

static int staging_failed(MPI_Comm comm)
{
    PMPI_Comm_call_errhandler(comm, MPI_ERR_OTHER);
    return MPI_ERR_OTHER;
}

static int init_any(init_fn init, const void *buf, int count, MPI_Datatype type, int peer, int tag, MPI_Comm comm,
                    MPI_Request *request, int receiving)
{
    requests_progress();
    staged_transfer *t;
    int s = staged_persistent_prepare(&t, buf, count, type, receiving);
    if (s == STAGED_FORWARD) return init(buf, count, type, peer, tag, comm, request);
    if (s == STAGED_FAILED) return staging_failed(comm);
    int rc = init(t->wire_buf, t->wire_count, t->wire_type, peer, tag, comm, request);
    if (rc == MPI_SUCCESS) requests_park(*request, t);
    else staged_release(t);
    return rc;
}

/* PMPI_Recv_init takes a non-const buffer; the staged path hands it commlib's staging. */
static int recv_init(const void *buf, int count, MPI_Datatype type, int source, int tag, MPI_Comm comm,
                     MPI_Request *request)
{
    return PMPI_Recv_init((void *)buf, count, type, source, tag, comm, request);
}

#define INIT_ENTRY(name, fn)                                                                                   \
    COMMLIB_EXPORT int name(const void *buf, int count, MPI_Datatype type, int dest, int tag, MPI_Comm comm, \
                            MPI_Request *request)                                                              \
    {                                                                                                          \
        FORWARD_IF_DISABLED(fn(buf, count, type, dest, tag, comm, request));                                   \
        return init_any(fn, buf, count, type, dest, tag, comm, request, 0);                                    \
    }
INIT_ENTRY(MPI_Send_init, PMPI_Send_init)
INIT_ENTRY(MPI_Bsend_init, PMPI_Bsend_init) /* each start copies the packed bytes into the attached buffer */
INIT_ENTRY(MPI_Ssend_init, PMPI_Ssend_init)
INIT_ENTRY(MPI_Rsend_init, PMPI_Rsend_init)

COMMLIB_EXPORT int MPI_Recv_init(void *buf, int count, MPI_Datatype type, int source, int tag, MPI_Comm comm,
                                 MPI_Request *request)
{
    FORWARD_IF_DISABLED(PMPI_Recv_init(buf, count, type, source, tag, comm, request));
    return init_any(recv_init, buf, count, type, source, tag, comm, request, 1);
}

/* A persistent request no longer names its communicator (the program may have freed
 * it), so a failed refill is reported on MPI_COMM_WORLD, as for MPI_Mrecv. */
COMMLIB_EXPORT int MPI_Start(MPI_Request *request)
{
    FORWARD_IF_DISABLED(PMPI_Start(request));
    requests_progress();
    staged_transfer *t = requests_any_parked() && request && *request != MPI_REQUEST_NULL
                             ? requests_unpark(*request) : NULL;
    if (!t) return PMPI_Start(request);
    if (!staged_start(t)) {
        requests_park(*request, t);
        return staging_failed(MPI_COMM_WORLD);
    }
    int rc = PMPI_Start(request);
    if (rc == MPI_SUCCESS) requests_add(*request, t);
    else requests_park(*request, t);
    return rc;
}

/* The staged requests among the array are refilled first, then the host MPI starts the
 * whole array at once.  Should it fail, every entry is parked again (the standard leaves
 * which requests started undefined then). */
COMMLIB_EXPORT int MPI_Startall(int count, MPI_Request requests[])
{
    FORWARD_IF_DISABLED(PMPI_Startall(count, requests));
    requests_progress();
    if (!requests_any_parked() || count <= 0 || !requests) return PMPI_Startall(count, requests);
    staged_transfer *local[16], **entries = count <= 16 ? local : malloc(sizeof *entries * (size_t)count);
    if (!entries) return staging_failed(MPI_COMM_WORLD);
    int staged = 0, ok = 1;
    for (int i = 0; i < count; i++) {
        entries[i] = requests[i] != MPI_REQUEST_NULL ? requests_unpark(requests[i]) : NULL;
        staged += entries[i] != NULL;
    }
    for (int i = 0; i < count && ok; i++) ok = !entries[i] || staged_start(entries[i]);
    int rc = !staged ? PMPI_Startall(count, requests) : ok ? PMPI_Startall(count, requests) : MPI_ERR_OTHER;
    for (int i = 0; i < count; i++) {
        if (!entries[i]) continue;
        if (rc == MPI_SUCCESS) requests_add(requests[i], entries[i]);
        else requests_park(requests[i], entries[i]);
    }
    if (entries != local) free(entries);
    if (!ok) return staging_failed(MPI_COMM_WORLD);
    return rc;
}
