/* Collectives with device buffers over an MPI that cannot read them: every device
 * buffer is staged as a host copy of its span, the host MPI runs the collective on the
 * copies with the program's own datatypes and ops, and what the MPI wrote into a receive
 * copy goes back - the bytes of the receive type map only, never the gaps between them
 * (transfer/typemap.h); a receive buffer is read first only where the MPI reads it
 * (MPI_IN_PLACE), and then only its type map.  Host buffers, and processes without CUDA,
 * go straight to PMPI_*.  Intercommunicators are forwarded unchanged (their root
 * conventions differ). */
#include <stdlib.h>

#include "../transfer/span.h"
#include "commlib.h"
#include "interpose.h"

/* Up to two staged buffers per call; the send one is never copied back. */
struct staged_call {
    struct span_stage send, recv;
    int send_staged, recv_staged;
};

/* COMMLIB_STAGE_HOST stages host buffers too, so that CI exercises these paths. */
static int cuda_in_process(void) { return commlib_config.stage_host || (commlib_config.gpu && cuda_driver() != NULL); }

static int is_intercomm(MPI_Comm comm)
{
    int inter = 0;
    return comm != MPI_COMM_NULL && PMPI_Comm_test_inter(comm, &inter) == MPI_SUCCESS && inter;
}

static int comm_size(MPI_Comm comm)
{
    int size = 1;
    PMPI_Comm_size(comm, &size);
    return size;
}

/* Stages a buffer the MPI only reads; returns the pointer the host MPI gets. -1 in
 * *failed on error. */
static void *stage(struct span_stage *s, int *staged, const void *buf, int64_t count, MPI_Datatype type, int *failed)
{
    *staged = 0;
    if (buf == MPI_IN_PLACE || buf == NULL || count <= 0 || type == MPI_DATATYPE_NULL) return (void *)buf;
    int rc = span_stage_begin(s, buf, count, type, 0);
    if (rc < 0) *failed = 1;
    *staged = rc == 1;
    return *staged ? span_host_base(s) : (void *)buf;
}

/* Stages a buffer the MPI writes (read_first: and reads, in place). */
static void *stage_recv(struct span_stage *s, int *staged, void *buf, int64_t count, MPI_Datatype type, int read_first,
                        int *failed)
{
    *staged = 0;
    if (buf == MPI_IN_PLACE || buf == NULL || count <= 0 || type == MPI_DATATYPE_NULL) return buf;
    int rc = span_stage_receive_typed(s, buf, count, type, read_first);
    if (rc < 0) *failed = 1;
    *staged = rc == 1;
    return *staged ? span_host_base(s) : buf;
}

/* Copies the receive span back (when the call succeeded) and frees both copies. */
static int finish(struct staged_call *c, int rc)
{
    if (c->send_staged) span_stage_end(&c->send, 0);
    if (c->recv_staged && !span_stage_end(&c->recv, rc == MPI_SUCCESS) && rc == MPI_SUCCESS) rc = MPI_ERR_OTHER;
    if (c->send_staged || c->recv_staged) stat_add(STAT_COLLECTIVE_STAGED, 1);
    return rc;
}

#define STAGE_OR_FORWARD(forward)                                   \
    do {                                                            \
        if (failed) {                                               \
            finish(&c, MPI_ERR_OTHER);                              \
            return MPI_ERR_OTHER;                                   \
        }                                                           \
        if (!c.send_staged && !c.recv_staged) return KEPT_OUT(forward);  \
    } while (0)

COMMLIB_EXPORT int MPI_Allreduce(const void *sendbuf, void *recvbuf, int count, MPI_Datatype type, MPI_Op op,
                                 MPI_Comm comm)
{
    FORWARD_IF_DISABLED(PMPI_Allreduce(sendbuf, recvbuf, count, type, op, comm));
    if (!cuda_in_process() || is_intercomm(comm))
        return KEPT_OUT(PMPI_Allreduce(sendbuf, recvbuf, count, type, op, comm));
    struct staged_call c;
    int failed = 0;
    const void *s = stage(&c.send, &c.send_staged, sendbuf, count, type, &failed);
    void *r = stage_recv(&c.recv, &c.recv_staged, recvbuf, count, type, sendbuf == MPI_IN_PLACE, &failed);
    STAGE_OR_FORWARD(PMPI_Allreduce(sendbuf, recvbuf, count, type, op, comm));
    return finish(&c, PMPI_Allreduce(s, r, count, type, op, comm));
}

COMMLIB_EXPORT int MPI_Reduce(const void *sendbuf, void *recvbuf, int count, MPI_Datatype type, MPI_Op op, int root,
                              MPI_Comm comm)
{
    FORWARD_IF_DISABLED(PMPI_Reduce(sendbuf, recvbuf, count, type, op, root, comm));
    if (!cuda_in_process() || is_intercomm(comm))
        return KEPT_OUT(PMPI_Reduce(sendbuf, recvbuf, count, type, op, root, comm));
    int rank = 0;
    PMPI_Comm_rank(comm, &rank);
    struct staged_call c;
    int failed = 0;
    const void *s = stage(&c.send, &c.send_staged, sendbuf, count, type, &failed);
    void *r = recvbuf; /* significant at the root only */
    c.recv_staged = 0;
    if (rank == root) r = stage_recv(&c.recv, &c.recv_staged, recvbuf, count, type, sendbuf == MPI_IN_PLACE, &failed);
    STAGE_OR_FORWARD(PMPI_Reduce(sendbuf, recvbuf, count, type, op, root, comm));
    return finish(&c, PMPI_Reduce(s, r, count, type, op, root, comm));
}

COMMLIB_EXPORT int MPI_Bcast(void *buffer, int count, MPI_Datatype type, int root, MPI_Comm comm)
{
    FORWARD_IF_DISABLED(PMPI_Bcast(buffer, count, type, root, comm));
    if (!cuda_in_process() || is_intercomm(comm)) return KEPT_OUT(PMPI_Bcast(buffer, count, type, root, comm));
    int rank = 0;
    PMPI_Comm_rank(comm, &rank);
    struct staged_call c = {.send_staged = 0, .recv_staged = 0};
    int failed = 0;
    /* the root's buffer is only read */
    void *b = rank == root ? stage(&c.send, &c.send_staged, buffer, count, type, &failed)
                           : stage_recv(&c.recv, &c.recv_staged, buffer, count, type, 0, &failed);
    STAGE_OR_FORWARD(PMPI_Bcast(buffer, count, type, root, comm));
    return finish(&c, PMPI_Bcast(b, count, type, root, comm));
}

COMMLIB_EXPORT int MPI_Allgather(const void *sendbuf, int sendcount, MPI_Datatype sendtype, void *recvbuf,
                                 int recvcount, MPI_Datatype recvtype, MPI_Comm comm)
{
    FORWARD_IF_DISABLED(PMPI_Allgather(sendbuf, sendcount, sendtype, recvbuf, recvcount, recvtype, comm));
    if (!cuda_in_process() || is_intercomm(comm))
        return KEPT_OUT(PMPI_Allgather(sendbuf, sendcount, sendtype, recvbuf, recvcount, recvtype, comm));
    struct staged_call c;
    int failed = 0;
    const void *s = stage(&c.send, &c.send_staged, sendbuf, sendcount, sendtype, &failed);
    void *r = stage_recv(&c.recv, &c.recv_staged, recvbuf, (int64_t)recvcount * comm_size(comm), recvtype,
                         sendbuf == MPI_IN_PLACE, &failed);
    STAGE_OR_FORWARD(PMPI_Allgather(sendbuf, sendcount, sendtype, recvbuf, recvcount, recvtype, comm));
    return finish(&c, PMPI_Allgather(s, sendcount, sendtype, r, recvcount, recvtype, comm));
}

COMMLIB_EXPORT int MPI_Alltoall(const void *sendbuf, int sendcount, MPI_Datatype sendtype, void *recvbuf,
                                int recvcount, MPI_Datatype recvtype, MPI_Comm comm)
{
    FORWARD_IF_DISABLED(PMPI_Alltoall(sendbuf, sendcount, sendtype, recvbuf, recvcount, recvtype, comm));
    if (!cuda_in_process() || is_intercomm(comm))
        return KEPT_OUT(PMPI_Alltoall(sendbuf, sendcount, sendtype, recvbuf, recvcount, recvtype, comm));
    int size = comm_size(comm);
    struct staged_call c;
    int failed = 0;
    const void *s = stage(&c.send, &c.send_staged, sendbuf, (int64_t)sendcount * size, sendtype, &failed);
    void *r = stage_recv(&c.recv, &c.recv_staged, recvbuf, (int64_t)recvcount * size, recvtype,
                         sendbuf == MPI_IN_PLACE, &failed);
    STAGE_OR_FORWARD(PMPI_Alltoall(sendbuf, sendcount, sendtype, recvbuf, recvcount, recvtype, comm));
    return finish(&c, PMPI_Alltoall(s, sendcount, sendtype, r, recvcount, recvtype, comm));
}

/* Elements of `type` covered by n blocks of (counts[i] at displs[i] elements). */
static int64_t vector_elements(int n, const int *counts, const int *displs)
{
    int64_t end = 0;
    for (int i = 0; i < n; i++)
        if (counts[i] > 0 && (int64_t)displs[i] + counts[i] > end) end = (int64_t)displs[i] + counts[i];
    return end;
}

/* The receive side of a vector collective: a block of counts[i] elements at displs[i]
 * extents per peer, only those written back. */
static void *stage_recv_vector(struct span_stage *s, int *staged, void *buf, int n, const int *counts,
                               const int *displs, MPI_Datatype type, int read_first, int *failed)
{
    *staged = 0;
    MPI_Aint lb, extent;
    if (buf == NULL || n <= 0 || !counts || !displs || type == MPI_DATATYPE_NULL ||
        PMPI_Type_get_extent(type, &lb, &extent) != MPI_SUCCESS)
        return buf;
    int64_t *c = malloc((size_t)n * sizeof *c), *d = malloc((size_t)n * sizeof *d);
    int rc = -1;
    if (c && d) {
        for (int i = 0; i < n; i++) {
            c[i] = counts[i];
            d[i] = (int64_t)displs[i] * extent;
        }
        rc = span_stage_receive_blocks(s, buf, n, c, d, &type, 1, read_first);
    }
    free(c);
    free(d);
    if (rc < 0) *failed = 1;
    *staged = rc == 1;
    return *staged ? span_host_base(s) : buf;
}

static int alltoallv_staged(const void *sendbuf, const int *sendcounts, const int *sdispls, MPI_Datatype sendtype,
                            void *recvbuf, const int *recvcounts, const int *rdispls, MPI_Datatype recvtype,
                            MPI_Comm comm, int outdegree, int indegree, int neighbor)
{
    struct staged_call c;
    int failed = 0;
    /* negative displacements are not staged: the span would start before the buffer */
    const void *s = sendbuf == MPI_IN_PLACE ? sendbuf
                    : stage(&c.send, &c.send_staged, sendbuf, vector_elements(outdegree, sendcounts, sdispls),
                            sendtype, &failed);
    if (sendbuf == MPI_IN_PLACE) c.send_staged = 0;
    void *r = stage_recv_vector(&c.recv, &c.recv_staged, recvbuf, indegree, recvcounts, rdispls, recvtype,
                                sendbuf == MPI_IN_PLACE, &failed);
    STAGE_OR_FORWARD(neighbor ? PMPI_Neighbor_alltoallv(sendbuf, sendcounts, sdispls, sendtype, recvbuf, recvcounts,
                                                        rdispls, recvtype, comm)
                              : PMPI_Alltoallv(sendbuf, sendcounts, sdispls, sendtype, recvbuf, recvcounts, rdispls,
                                               recvtype, comm));
    return finish(&c, neighbor ? PMPI_Neighbor_alltoallv(s, sendcounts, sdispls, sendtype, r, recvcounts, rdispls,
                                                         recvtype, comm)
                               : PMPI_Alltoallv(s, sendcounts, sdispls, sendtype, r, recvcounts, rdispls, recvtype,
                                                comm));
}

COMMLIB_EXPORT int MPI_Alltoallv(const void *sendbuf, const int sendcounts[], const int sdispls[],
                                 MPI_Datatype sendtype, void *recvbuf, const int recvcounts[], const int rdispls[],
                                 MPI_Datatype recvtype, MPI_Comm comm)
{
    FORWARD_IF_DISABLED(PMPI_Alltoallv(sendbuf, sendcounts, sdispls, sendtype, recvbuf, recvcounts, rdispls,
                                       recvtype, comm));
    if (!cuda_in_process() || is_intercomm(comm))
        return KEPT_OUT(
            PMPI_Alltoallv(sendbuf, sendcounts, sdispls, sendtype, recvbuf, recvcounts, rdispls, recvtype, comm));
    int size = comm_size(comm);
    return alltoallv_staged(sendbuf, sendcounts, sdispls, sendtype, recvbuf, recvcounts, rdispls, recvtype, comm,
                            size, size, 0);
}

/* In- and out-degree of a communicator with a topology (0, 0 without one). */
static void neighbor_degrees(MPI_Comm comm, int *indegree, int *outdegree)
{
    int kind = MPI_UNDEFINED, weighted;
    *indegree = *outdegree = 0;
    PMPI_Topo_test(comm, &kind);
    if (kind == MPI_DIST_GRAPH) {
        PMPI_Dist_graph_neighbors_count(comm, indegree, outdegree, &weighted);
    } else if (kind == MPI_CART) {
        int ndims = 0;
        PMPI_Cartdim_get(comm, &ndims);
        *indegree = *outdegree = 2 * ndims;
    } else if (kind == MPI_GRAPH) {
        int rank = 0, n = 0;
        PMPI_Comm_rank(comm, &rank);
        PMPI_Graph_neighbors_count(comm, rank, &n);
        *indegree = *outdegree = n;
    }
}

COMMLIB_EXPORT int MPI_Neighbor_alltoallv(const void *sendbuf, const int sendcounts[], const int sdispls[],
                                          MPI_Datatype sendtype, void *recvbuf, const int recvcounts[],
                                          const int rdispls[], MPI_Datatype recvtype, MPI_Comm comm)
{
    FORWARD_IF_DISABLED(PMPI_Neighbor_alltoallv(sendbuf, sendcounts, sdispls, sendtype, recvbuf, recvcounts, rdispls,
                                                recvtype, comm));
    if (!cuda_in_process())
        return KEPT_OUT(PMPI_Neighbor_alltoallv(sendbuf, sendcounts, sdispls, sendtype, recvbuf, recvcounts,
                                                rdispls, recvtype, comm));
    int indegree, outdegree;
    neighbor_degrees(comm, &indegree, &outdegree);
    return alltoallv_staged(sendbuf, sendcounts, sdispls, sendtype, recvbuf, recvcounts, rdispls, recvtype, comm,
                            outdegree, indegree, 1);
}

/* Byte span [*lo, *lo + *bytes) of n blocks (counts[i] of types[i] at byte displs[i]). */
static int w_span(int n, const int *counts, const MPI_Aint *displs, const MPI_Datatype *types, int64_t *lo,
                  int64_t *bytes)
{
    int64_t first = INT64_MAX, last = INT64_MIN;
    for (int i = 0; i < n; i++) {
        if (counts[i] <= 0) continue;
        MPI_Count tlb, text, lb, ext;
        if (PMPI_Type_get_true_extent_x(types[i], &tlb, &text) != MPI_SUCCESS ||
            PMPI_Type_get_extent_x(types[i], &lb, &ext) != MPI_SUCCESS)
            return 0;
        int64_t reach = (int64_t)(counts[i] - 1) * ext;
        int64_t a = displs[i] + tlb + (reach < 0 ? reach : 0), b = displs[i] + tlb + text + (reach > 0 ? reach : 0);
        first = a < first ? a : first;
        last = b > last ? b : last;
    }
    *lo = first == INT64_MAX ? 0 : first;
    *bytes = first == INT64_MAX ? 0 : last - first;
    return 1;
}

COMMLIB_EXPORT int MPI_Neighbor_alltoallw(const void *sendbuf, const int sendcounts[], const MPI_Aint sdispls[],
                                          const MPI_Datatype sendtypes[], void *recvbuf, const int recvcounts[],
                                          const MPI_Aint rdispls[], const MPI_Datatype recvtypes[], MPI_Comm comm)
{
    FORWARD_IF_DISABLED(PMPI_Neighbor_alltoallw(sendbuf, sendcounts, sdispls, sendtypes, recvbuf, recvcounts, rdispls,
                                                recvtypes, comm));
    int indegree = 0, outdegree = 0;
    int64_t slo, sbytes, rlo, rbytes;
    if (cuda_in_process()) neighbor_degrees(comm, &indegree, &outdegree);
    if (!cuda_in_process() || !w_span(outdegree, sendcounts, sdispls, sendtypes, &slo, &sbytes) ||
        !w_span(indegree, recvcounts, rdispls, recvtypes, &rlo, &rbytes))
        return KEPT_OUT(PMPI_Neighbor_alltoallw(sendbuf, sendcounts, sdispls, sendtypes, recvbuf, recvcounts,
                                                rdispls, recvtypes, comm));
    struct staged_call c;
    int rc_s = span_stage_bytes(&c.send, sendbuf, slo, sbytes, 0);
    int rc_r = 0;
    int64_t *counts = malloc((size_t)(indegree + 1) * sizeof *counts), *displs = malloc((size_t)(indegree + 1) * sizeof *displs);
    if (!counts || !displs) {
        rc_r = -1;
    } else if (rbytes > 0) {
        for (int i = 0; i < indegree; i++) {
            counts[i] = recvcounts[i];
            displs[i] = rdispls[i];
        }
        rc_r = span_stage_receive_blocks(&c.recv, recvbuf, indegree, counts, displs, recvtypes, 0, 0);
    }
    free(counts);
    free(displs);
    c.send_staged = rc_s == 1;
    c.recv_staged = rc_r == 1;
    int failed = rc_s < 0 || rc_r < 0;
    STAGE_OR_FORWARD(PMPI_Neighbor_alltoallw(sendbuf, sendcounts, sdispls, sendtypes, recvbuf, recvcounts, rdispls,
                                             recvtypes, comm));
    return finish(&c, PMPI_Neighbor_alltoallw(c.send_staged ? span_host_base(&c.send) : sendbuf, sendcounts, sdispls,
                                              sendtypes, c.recv_staged ? span_host_base(&c.recv) : recvbuf,
                                              recvcounts, rdispls, recvtypes, comm));
}
