/* The MPI-4 large-count forms (MPI_Send_c, MPI_Allreduce_c, ...) of the calls commlib
 * stages.  Bindings such as mpi4py call these whenever the MPI has them, so without
 * them a device buffer would reach the host MPI untouched.  A count that fits an int is
 * handed to the int entry point of commlib (which stages or forwards); a larger count
 * goes to the host MPI's _c function unchanged (device buffers of more than 2^31
 * elements are not staged). */
#include <limits.h>
#include <stdlib.h>

#include "commlib.h"
#include "interpose.h"

#if MPI_VERSION >= 4

#define FITS(c) ((c) >= 0 && (c) <= INT_MAX)

#define SEND_C(name)                                                                                           \
    COMMLIB_EXPORT int name##_c(const void *buf, MPI_Count count, MPI_Datatype type, int dest, int tag,      \
                                MPI_Comm comm)                                                                 \
    {                                                                                                          \
        if (FITS(count)) return name(buf, (int)count, type, dest, tag, comm);                                  \
        return P##name##_c(buf, count, type, dest, tag, comm);                                                 \
    }
SEND_C(MPI_Send)
SEND_C(MPI_Ssend)
SEND_C(MPI_Rsend)
SEND_C(MPI_Bsend)

#define ISEND_C(name)                                                                                          \
    COMMLIB_EXPORT int name##_c(const void *buf, MPI_Count count, MPI_Datatype type, int dest, int tag,      \
                                MPI_Comm comm, MPI_Request *request)                                           \
    {                                                                                                          \
        if (FITS(count)) return name(buf, (int)count, type, dest, tag, comm, request);                         \
        return P##name##_c(buf, count, type, dest, tag, comm, request);                                        \
    }
ISEND_C(MPI_Isend)
ISEND_C(MPI_Issend)
ISEND_C(MPI_Irsend)
ISEND_C(MPI_Ibsend)

COMMLIB_EXPORT int MPI_Recv_c(void *buf, MPI_Count count, MPI_Datatype type, int source, int tag, MPI_Comm comm,
                              MPI_Status *status)
{
    if (FITS(count)) return MPI_Recv(buf, (int)count, type, source, tag, comm, status);
    return PMPI_Recv_c(buf, count, type, source, tag, comm, status);
}

COMMLIB_EXPORT int MPI_Irecv_c(void *buf, MPI_Count count, MPI_Datatype type, int source, int tag, MPI_Comm comm,
                               MPI_Request *request)
{
    if (FITS(count)) return MPI_Irecv(buf, (int)count, type, source, tag, comm, request);
    return PMPI_Irecv_c(buf, count, type, source, tag, comm, request);
}

COMMLIB_EXPORT int MPI_Sendrecv_c(const void *sendbuf, MPI_Count sendcount, MPI_Datatype sendtype, int dest,
                                  int sendtag, void *recvbuf, MPI_Count recvcount, MPI_Datatype recvtype, int source,
                                  int recvtag, MPI_Comm comm, MPI_Status *status)
{
    if (FITS(sendcount) && FITS(recvcount))
        return MPI_Sendrecv(sendbuf, (int)sendcount, sendtype, dest, sendtag, recvbuf, (int)recvcount, recvtype,
                            source, recvtag, comm, status);
    return PMPI_Sendrecv_c(sendbuf, sendcount, sendtype, dest, sendtag, recvbuf, recvcount, recvtype, source, recvtag,
                           comm, status);
}

COMMLIB_EXPORT int MPI_Sendrecv_replace_c(void *buf, MPI_Count count, MPI_Datatype type, int dest, int sendtag,
                                          int source, int recvtag, MPI_Comm comm, MPI_Status *status)
{
    if (FITS(count)) return MPI_Sendrecv_replace(buf, (int)count, type, dest, sendtag, source, recvtag, comm, status);
    return PMPI_Sendrecv_replace_c(buf, count, type, dest, sendtag, source, recvtag, comm, status);
}

COMMLIB_EXPORT int MPI_Mrecv_c(void *buf, MPI_Count count, MPI_Datatype type, MPI_Message *message,
                               MPI_Status *status)
{
    if (FITS(count)) return MPI_Mrecv(buf, (int)count, type, message, status);
    return PMPI_Mrecv_c(buf, count, type, message, status);
}

COMMLIB_EXPORT int MPI_Imrecv_c(void *buf, MPI_Count count, MPI_Datatype type, MPI_Message *message,
                                MPI_Request *request)
{
    if (FITS(count)) return MPI_Imrecv(buf, (int)count, type, message, request);
    return PMPI_Imrecv_c(buf, count, type, message, request);
}

COMMLIB_EXPORT int MPI_Allreduce_c(const void *sendbuf, void *recvbuf, MPI_Count count, MPI_Datatype type, MPI_Op op,
                                   MPI_Comm comm)
{
    if (FITS(count)) return MPI_Allreduce(sendbuf, recvbuf, (int)count, type, op, comm);
    return PMPI_Allreduce_c(sendbuf, recvbuf, count, type, op, comm);
}

COMMLIB_EXPORT int MPI_Iallreduce_c(const void *sendbuf, void *recvbuf, MPI_Count count, MPI_Datatype type,
                                    MPI_Op op, MPI_Comm comm, MPI_Request *request)
{
    if (FITS(count)) return MPI_Iallreduce(sendbuf, recvbuf, (int)count, type, op, comm, request);
    return PMPI_Iallreduce_c(sendbuf, recvbuf, count, type, op, comm, request);
}

COMMLIB_EXPORT int MPI_Reduce_c(const void *sendbuf, void *recvbuf, MPI_Count count, MPI_Datatype type, MPI_Op op,
                                int root, MPI_Comm comm)
{
    if (FITS(count)) return MPI_Reduce(sendbuf, recvbuf, (int)count, type, op, root, comm);
    return PMPI_Reduce_c(sendbuf, recvbuf, count, type, op, root, comm);
}

COMMLIB_EXPORT int MPI_Bcast_c(void *buffer, MPI_Count count, MPI_Datatype type, int root, MPI_Comm comm)
{
    if (FITS(count)) return MPI_Bcast(buffer, (int)count, type, root, comm);
    return PMPI_Bcast_c(buffer, count, type, root, comm);
}

COMMLIB_EXPORT int MPI_Allgather_c(const void *sendbuf, MPI_Count sendcount, MPI_Datatype sendtype, void *recvbuf,
                                   MPI_Count recvcount, MPI_Datatype recvtype, MPI_Comm comm)
{
    if (FITS(sendcount) && FITS(recvcount))
        return MPI_Allgather(sendbuf, (int)sendcount, sendtype, recvbuf, (int)recvcount, recvtype, comm);
    return PMPI_Allgather_c(sendbuf, sendcount, sendtype, recvbuf, recvcount, recvtype, comm);
}

COMMLIB_EXPORT int MPI_Alltoall_c(const void *sendbuf, MPI_Count sendcount, MPI_Datatype sendtype, void *recvbuf,
                                  MPI_Count recvcount, MPI_Datatype recvtype, MPI_Comm comm)
{
    if (FITS(sendcount) && FITS(recvcount))
        return MPI_Alltoall(sendbuf, (int)sendcount, sendtype, recvbuf, (int)recvcount, recvtype, comm);
    return PMPI_Alltoall_c(sendbuf, sendcount, sendtype, recvbuf, recvcount, recvtype, comm);
}


/* Persistent point-to-point (interpose/persistent.c). */
#define INIT_C(name)                                                                                           \
    COMMLIB_EXPORT int name##_c(const void *buf, MPI_Count count, MPI_Datatype type, int dest, int tag,      \
                                MPI_Comm comm, MPI_Request *request)                                           \
    {                                                                                                          \
        if (FITS(count)) return name(buf, (int)count, type, dest, tag, comm, request);                         \
        return P##name##_c(buf, count, type, dest, tag, comm, request);                                        \
    }
INIT_C(MPI_Send_init)
INIT_C(MPI_Bsend_init)
INIT_C(MPI_Ssend_init)
INIT_C(MPI_Rsend_init)

COMMLIB_EXPORT int MPI_Recv_init_c(void *buf, MPI_Count count, MPI_Datatype type, int source, int tag, MPI_Comm comm,
                                   MPI_Request *request)
{
    if (FITS(count)) return MPI_Recv_init(buf, (int)count, type, source, tag, comm, request);
    return PMPI_Recv_init_c(buf, count, type, source, tag, comm, request);
}

COMMLIB_EXPORT int MPI_Isendrecv_c(const void *sendbuf, MPI_Count sendcount, MPI_Datatype sendtype, int dest,
                                   int sendtag, void *recvbuf, MPI_Count recvcount, MPI_Datatype recvtype, int source,
                                   int recvtag, MPI_Comm comm, MPI_Request *request)
{
    if (FITS(sendcount) && FITS(recvcount))
        return MPI_Isendrecv(sendbuf, (int)sendcount, sendtype, dest, sendtag, recvbuf, (int)recvcount, recvtype,
                             source, recvtag, comm, request);
    return PMPI_Isendrecv_c(sendbuf, sendcount, sendtype, dest, sendtag, recvbuf, recvcount, recvtype, source,
                            recvtag, comm, request);
}

COMMLIB_EXPORT int MPI_Isendrecv_replace_c(void *buf, MPI_Count count, MPI_Datatype type, int dest, int sendtag,
                                           int source, int recvtag, MPI_Comm comm, MPI_Request *request)
{
    if (FITS(count))
        return MPI_Isendrecv_replace(buf, (int)count, type, dest, sendtag, source, recvtag, comm, request);
    return PMPI_Isendrecv_replace_c(buf, count, type, dest, sendtag, source, recvtag, comm, request);
}

/* Nonblocking collectives (interpose/nonblocking_collectives.c). */
COMMLIB_EXPORT int MPI_Ibcast_c(void *buffer, MPI_Count count, MPI_Datatype type, int root, MPI_Comm comm,
                                MPI_Request *request)
{
    if (FITS(count)) return MPI_Ibcast(buffer, (int)count, type, root, comm, request);
    return PMPI_Ibcast_c(buffer, count, type, root, comm, request);
}

COMMLIB_EXPORT int MPI_Ireduce_c(const void *sendbuf, void *recvbuf, MPI_Count count, MPI_Datatype type, MPI_Op op,
                                 int root, MPI_Comm comm, MPI_Request *request)
{
    if (FITS(count)) return MPI_Ireduce(sendbuf, recvbuf, (int)count, type, op, root, comm, request);
    return PMPI_Ireduce_c(sendbuf, recvbuf, count, type, op, root, comm, request);
}

COMMLIB_EXPORT int MPI_Iallgather_c(const void *sendbuf, MPI_Count sendcount, MPI_Datatype sendtype, void *recvbuf,
                                    MPI_Count recvcount, MPI_Datatype recvtype, MPI_Comm comm, MPI_Request *request)
{
    if (FITS(sendcount) && FITS(recvcount))
        return MPI_Iallgather(sendbuf, (int)sendcount, sendtype, recvbuf, (int)recvcount, recvtype, comm, request);
    return PMPI_Iallgather_c(sendbuf, sendcount, sendtype, recvbuf, recvcount, recvtype, comm, request);
}

COMMLIB_EXPORT int MPI_Ialltoall_c(const void *sendbuf, MPI_Count sendcount, MPI_Datatype sendtype, void *recvbuf,
                                   MPI_Count recvcount, MPI_Datatype recvtype, MPI_Comm comm, MPI_Request *request)
{
    if (FITS(sendcount) && FITS(recvcount))
        return MPI_Ialltoall(sendbuf, (int)sendcount, sendtype, recvbuf, (int)recvcount, recvtype, comm, request);
    return PMPI_Ialltoall_c(sendbuf, sendcount, sendtype, recvbuf, recvcount, recvtype, comm, request);
}

COMMLIB_EXPORT int MPI_Ireduce_scatter_block_c(const void *sendbuf, void *recvbuf, MPI_Count recvcount,
                                               MPI_Datatype type, MPI_Op op, MPI_Comm comm, MPI_Request *request)
{
    if (FITS(recvcount)) return MPI_Ireduce_scatter_block(sendbuf, recvbuf, (int)recvcount, type, op, comm, request);
    return PMPI_Ireduce_scatter_block_c(sendbuf, recvbuf, recvcount, type, op, comm, request);
}


/* int copies of n counts and displacements; NULL when one does not fit (or n < 0). */
static int *ints_of(int n, const MPI_Count *counts, const MPI_Aint *displs, int **displs_out)
{
    int *c = n >= 0 ? malloc(sizeof(int) * (size_t)(2 * n + 1)) : NULL;
    if (!c) return NULL;
    for (int i = 0; i < n; i++) {
        if (!FITS(counts[i]) || !FITS(displs[i])) {
            free(c);
            return NULL;
        }
        c[i] = (int)counts[i];
        c[n + i] = (int)displs[i];
    }
    *displs_out = c + n;
    return c;
}

static int comm_size(MPI_Comm comm)
{
    int size = 0;
    PMPI_Comm_size(comm, &size);
    return size;
}

COMMLIB_EXPORT int MPI_Alltoallv_c(const void *sendbuf, const MPI_Count sendcounts[], const MPI_Aint sdispls[],
                                   MPI_Datatype sendtype, void *recvbuf, const MPI_Count recvcounts[],
                                   const MPI_Aint rdispls[], MPI_Datatype recvtype, MPI_Comm comm)
{
    int n = comm_size(comm), *sd = NULL, *rd = NULL;
    int *sc = sendbuf == MPI_IN_PLACE ? NULL : ints_of(n, sendcounts, sdispls, &sd);
    int *rc = ints_of(n, recvcounts, rdispls, &rd);
    int result;
    if (rc && (sc || sendbuf == MPI_IN_PLACE))
        result = MPI_Alltoallv(sendbuf, sc, sd, sendtype, recvbuf, rc, rd, recvtype, comm);
    else
        result = PMPI_Alltoallv_c(sendbuf, sendcounts, sdispls, sendtype, recvbuf, recvcounts, rdispls, recvtype, comm);
    free(sc);
    free(rc);
    return result;
}

static void degrees(MPI_Comm comm, int *indegree, int *outdegree)
{
    int kind = MPI_UNDEFINED, weighted, ndims = 0, rank = 0, n = 0;
    *indegree = *outdegree = -1;
    PMPI_Topo_test(comm, &kind);
    if (kind == MPI_DIST_GRAPH) PMPI_Dist_graph_neighbors_count(comm, indegree, outdegree, &weighted);
    else if (kind == MPI_CART && PMPI_Cartdim_get(comm, &ndims) == MPI_SUCCESS) *indegree = *outdegree = 2 * ndims;
    else if (kind == MPI_GRAPH && PMPI_Comm_rank(comm, &rank) == MPI_SUCCESS &&
             PMPI_Graph_neighbors_count(comm, rank, &n) == MPI_SUCCESS)
        *indegree = *outdegree = n;
}

COMMLIB_EXPORT int MPI_Neighbor_alltoallv_c(const void *sendbuf, const MPI_Count sendcounts[],
                                            const MPI_Aint sdispls[], MPI_Datatype sendtype, void *recvbuf,
                                            const MPI_Count recvcounts[], const MPI_Aint rdispls[],
                                            MPI_Datatype recvtype, MPI_Comm comm)
{
    int in, out, *sd = NULL, *rd = NULL;
    degrees(comm, &in, &out);
    int *sc = ints_of(out, sendcounts, sdispls, &sd), *rc = ints_of(in, recvcounts, rdispls, &rd);
    int result = sc && rc ? MPI_Neighbor_alltoallv(sendbuf, sc, sd, sendtype, recvbuf, rc, rd, recvtype, comm)
                          : PMPI_Neighbor_alltoallv_c(sendbuf, sendcounts, sdispls, sendtype, recvbuf, recvcounts,
                                                      rdispls, recvtype, comm);
    free(sc);
    free(rc);
    return result;
}

/* alltoallw keeps byte displacements (MPI_Aint) in both forms: only counts convert. */
static int *counts_of(int n, const MPI_Count *counts)
{
    int *c = n >= 0 ? malloc(sizeof(int) * (size_t)(n + 1)) : NULL;
    for (int i = 0; c && i < n; i++) {
        if (!FITS(counts[i])) {
            free(c);
            return NULL;
        }
        c[i] = (int)counts[i];
    }
    return c;
}

COMMLIB_EXPORT int MPI_Neighbor_alltoallw_c(const void *sendbuf, const MPI_Count sendcounts[],
                                            const MPI_Aint sdispls[], const MPI_Datatype sendtypes[], void *recvbuf,
                                            const MPI_Count recvcounts[], const MPI_Aint rdispls[],
                                            const MPI_Datatype recvtypes[], MPI_Comm comm)
{
    int in, out;
    degrees(comm, &in, &out);
    int *sc = counts_of(out, sendcounts), *rc = counts_of(in, recvcounts);
    int result = sc && rc ? MPI_Neighbor_alltoallw(sendbuf, sc, sdispls, sendtypes, recvbuf, rc, rdispls, recvtypes,
                                                   comm)
                          : PMPI_Neighbor_alltoallw_c(sendbuf, sendcounts, sdispls, sendtypes, recvbuf, recvcounts,
                                                      rdispls, recvtypes, comm);
    free(sc);
    free(rc);
    return result;
}

#endif
