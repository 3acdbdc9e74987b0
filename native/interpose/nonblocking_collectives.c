/* Nonblocking collectives with device buffers over an MPI that cannot read them.
 *
 * MPI_Iallreduce: the receive buffer's span is staged in host memory (as the blocking
 * collectives do, collectives.c) and the host MPI reduces in place on that copy; the
 * request is the host MPI's own and the side table (progress/requests.h) holds a typed
 * receive whose completion copies the span back, so that MPI_Wait and friends - or the
 * progress thread, before them - finish it like a staged MPI_Irecv.  A separate send
 * buffer is laid into the receive copy at the call (allreduce(send, recv) is
 * allreduce(MPI_IN_PLACE, recv) once recv holds send's values) - for a dense type by one
 * copy straight from the device - so only one staging buffer outlives the call.  Host buffers, and processes without CUDA, go straight to
 * PMPI_Iallreduce; so do intercommunicators.
 *
 * MPI_Ibcast, Ireduce, Iallgather, Ialltoall, Ialltoallv and Ireduce_scatter_block: as the
 * blocking forms (collectives.c), a host copy of each staged buffer's span, the host
 * MPI's nonblocking collective on the copies.  Both copies must outlive the call (the MPI
 * reads the send buffer until completion), so the side-table entry holds the receive copy
 * as a typed receive, copied back at completion, and the send copy as linked staging,
 * freed with it; with only a send buffer staged the entry holds that copy alone (nothing
 * to copy back).  The host MPI's request is the program's, as for MPI_Iallreduce. */
#include <stdlib.h>
#include <string.h>

#include "../pack/pack_any.h"
#include "../progress/requests.h"
#include "../transfer/span.h"
#include "../util/log.h"
#include "engine_served.h"
#include "commlib.h"
#include "interpose.h"

/* COMMLIB_STAGE_HOST stages host buffers too, so that CI exercises this path. */
static int cuda_in_process(void) { return commlib_config.stage_host || (commlib_config.gpu && cuda_driver() != NULL); }

static int is_intercomm(MPI_Comm comm)
{
    int inter = 0;
    return comm != MPI_COMM_NULL && PMPI_Comm_test_inter(comm, &inter) == MPI_SUCCESS && inter;
}

/* The byte span of `count` elements relative to the buffer; dense: no gaps in it. */
struct layout {
    int64_t lo, bytes;
    int dense;
};

static int layout_of(MPI_Datatype type, int count, struct layout *l)
{
    MPI_Count true_lb, true_extent, lb, extent, size;
    if (PMPI_Type_get_true_extent_x(type, &true_lb, &true_extent) != MPI_SUCCESS ||
        PMPI_Type_get_extent_x(type, &lb, &extent) != MPI_SUCCESS || PMPI_Type_size_x(type, &size) != MPI_SUCCESS)
        return 0;
    typed_span(true_lb, true_extent, extent, count, &l->lo, &l->bytes);
    l->dense = l->bytes == size * count;
    return 1;
}

/* A dense send buffer goes straight into the host copy of the receive buffer (or into
 * the receive buffer itself, in host memory): one copy, no staging of its own. */
static int copy_dense(void *dst_base, const void *src_base, const struct layout *l)
{
    void *dst = (char *)dst_base + l->lo;
    const void *src = (const char *)src_base + l->lo;
    if (buffer_kind_of(src) == BUFFER_DEVICE) {
        struct device_context *dc = device_context_of(src);
        return dc && device_copy(dc, dst, src, (size_t)l->bytes);
    }
    memcpy(dst, src, (size_t)l->bytes);
    return 1;
}

/* Copies the elements of (src, count, type) onto (dst, count, type), host memory both,
 * leaving the bytes between them in dst alone (the host MPI packs and unpacks). */
static int lay_over(void *dst, const void *src, int count, MPI_Datatype type, MPI_Comm comm)
{
    int packed = 0, position = 0;
    if (PMPI_Pack_size(count, type, comm, &packed) != MPI_SUCCESS) return 0;
    char *tmp = malloc(packed > 0 ? (size_t)packed : 1);
    int ok = tmp && PMPI_Pack(src, count, type, tmp, packed, &position, comm) == MPI_SUCCESS;
    int used = position;
    position = 0;
    ok = ok && PMPI_Unpack(tmp, used, &position, dst, count, type, comm) == MPI_SUCCESS;
    free(tmp);
    return ok;
}

static int staging_failed(MPI_Comm comm)
{
    commlib_log(LOG_ERROR, "staging an MPI_Iallreduce buffer failed");
    PMPI_Comm_call_errhandler(comm, MPI_ERR_OTHER);
    return MPI_ERR_OTHER;
}

COMMLIB_EXPORT int MPI_Iallreduce(const void *sendbuf, void *recvbuf, int count, MPI_Datatype type, MPI_Op op,
                                  MPI_Comm comm, MPI_Request *request)
{
    FORWARD_IF_DISABLED(PMPI_Iallreduce(sendbuf, recvbuf, count, type, op, comm, request));
    requests_progress();
    int served_rc;
    if (engine_serve_iallreduce(sendbuf, recvbuf, count, type, op, comm, request, &served_rc)) return served_rc;
    /* MPI_BOTTOM (absolute addresses) is left to the host MPI, as for point-to-point */
    if (!cuda_in_process() || is_intercomm(comm) || count <= 0 || type == MPI_DATATYPE_NULL || !request ||
        !sendbuf || !recvbuf)
        return PMPI_Iallreduce(sendbuf, recvbuf, count, type, op, comm, request);
    int in_place = sendbuf == MPI_IN_PLACE;
    struct layout l;
    if (!layout_of(type, count, &l)) /* the host MPI reports the bad type */
        return PMPI_Iallreduce(sendbuf, recvbuf, count, type, op, comm, request);
    struct span_stage recv, send;
    /* with a separate send buffer every element of recv is overwritten below */
    int r = span_stage_receive_typed(&recv, recvbuf, count, type, in_place), ok = 1;
    if (r < 0) return staging_failed(comm);
    void *reduced = r == 1 ? span_host_base(&recv) : recvbuf;
    if (in_place) {
        if (r == 0) return PMPI_Iallreduce(sendbuf, recvbuf, count, type, op, comm, request);
    } else if (l.dense) {
        if (r == 0 && buffer_kind_of((const char *)sendbuf + l.lo) != BUFFER_DEVICE)
            return PMPI_Iallreduce(sendbuf, recvbuf, count, type, op, comm, request);
        ok = copy_dense(reduced, sendbuf, &l);
    } else {
        int s = span_stage_begin(&send, sendbuf, count, type, 0);
        if (r == 0 && s == 0) return PMPI_Iallreduce(sendbuf, recvbuf, count, type, op, comm, request);
        ok = s >= 0 && lay_over(reduced, s == 1 ? span_host_base(&send) : sendbuf, count, type, comm);
        if (s == 1) span_stage_end(&send, 0);
    }
    if (!ok) {
        if (r == 1) span_stage_end(&recv, 0);
        return staging_failed(comm);
    }
    stat_add(STAT_COLLECTIVE_STAGED, 1);
    if (r == 0) /* only the send buffer was staged: the result goes straight to recvbuf */
        return PMPI_Iallreduce(MPI_IN_PLACE, recvbuf, count, type, op, comm, request);
    staged_transfer *t = calloc(1, sizeof *t);
    if (!t) {
        span_stage_end(&recv, 0);
        return staging_failed(comm);
    }
    /* a typed receive: completion copies the elements back (staged_recv_finish) */
    *t = (staged_transfer){.wire_buf = reduced, .wire_count = count, .wire_type = type, .receiving = 1,
                           .typed = 1, .collective = 1, .user = recvbuf, .span = recv};
    int rc = PMPI_Iallreduce(MPI_IN_PLACE, reduced, count, type, op, comm, request);
    if (rc == MPI_SUCCESS) requests_add(*request, t);
    else staged_release(t);
    return rc;
}

/* The other nonblocking collectives: up to two spans staged per call. */
struct nbc {
    struct span_stage send, recv;
    int send_staged, recv_staged, failed;
};

/* A buffer the MPI only reads (receive 0), or one it writes (receive 1; read_first: and
 * reads, in place), whose type-map bytes alone go back at completion. */
static void *nbc_stage(struct nbc *c, int receive, const void *buf, int64_t count, MPI_Datatype type,
                       int read_first)
{
    if (buf == MPI_IN_PLACE || buf == NULL || count <= 0 || type == MPI_DATATYPE_NULL) return (void *)buf;
    struct span_stage *s = receive ? &c->recv : &c->send;
    int rc = receive ? span_stage_receive_typed(s, buf, count, type, read_first) : span_stage_begin(s, buf, count, type, 0);
    if (rc < 0) c->failed = 1;
    if (rc == 1) *(receive ? &c->recv_staged : &c->send_staged) = 1;
    return rc == 1 ? span_host_base(s) : (void *)buf;
}

/* The receive side of a vector collective: counts[i] elements at displs[i] extents. */
static void *nbc_stage_vector(struct nbc *c, void *buf, int n, const int64_t *counts, const int64_t *displs,
                              MPI_Datatype type, int read_first)
{
    MPI_Aint lb, extent;
    if (buf == NULL || n <= 0 || type == MPI_DATATYPE_NULL || PMPI_Type_get_extent(type, &lb, &extent) != MPI_SUCCESS)
        return buf;
    int64_t *bytes = malloc((size_t)n * sizeof *bytes);
    int rc = -1;
    if (bytes) {
        for (int i = 0; i < n; i++) bytes[i] = displs[i] * (int64_t)extent;
        rc = span_stage_receive_blocks(&c->recv, buf, n, counts, bytes, &type, 1, read_first);
    }
    free(bytes);
    if (rc < 0) c->failed = 1;
    if (rc == 1) c->recv_staged = 1;
    return rc == 1 ? span_host_base(&c->recv) : buf;
}

static void nbc_abandon(struct nbc *c)
{
    if (c->send_staged) span_stage_end(&c->send, 0);
    if (c->recv_staged) span_stage_end(&c->recv, 0);
}

/* The side-table entry holding the copies (made before the host call, which cannot be
 * undone once it succeeded). */
static staged_transfer *nbc_entry(struct nbc *c)
{
    staged_transfer *t = calloc(1, sizeof *t), *send = t;
    if (t && c->recv_staged) {
        *t = (staged_transfer){.receiving = 1, .typed = 1, .collective = 1, .user = c->recv.device_base,
                               .span = c->recv};
        if (c->send_staged && !(send = t->linked = calloc(1, sizeof *t))) {
            free(t);
            return NULL;
        }
    }
    if (t && c->send_staged) *send = (staged_transfer){.typed = 1, .user = c->send.device_base, .span = c->send};
    return t;
}

#define NBC_ISSUE(forward, staged)                                  \
    do {                                                            \
        staged_transfer *t_ = NULL;                                 \
        if (!c.failed && !c.send_staged && !c.recv_staged) return forward; \
        if (c.failed || !(t_ = nbc_entry(&c))) {                    \
            nbc_abandon(&c);                                        \
            return staging_failed(comm);                            \
        }                                                           \
        stat_add(STAT_COLLECTIVE_STAGED, 1);                        \
        int rc_ = staged;                                           \
        if (rc_ == MPI_SUCCESS) requests_add(*request, t_);         \
        else staged_release(t_);                                    \
        return rc_;                                                 \
    } while (0)

/* Host buffers, processes without CUDA, intercommunicators: the host MPI's own call. */
#define NBC_FORWARD_UNLESS_STAGED(forward)                                         \
    do {                                                                           \
        FORWARD_IF_DISABLED(forward);                                              \
        requests_progress();                                                       \
        if (!cuda_in_process() || is_intercomm(comm) || !request) return forward;  \
    } while (0)

static int comm_rank(MPI_Comm comm)
{
    int rank = 0;
    PMPI_Comm_rank(comm, &rank);
    return rank;
}

static int comm_size(MPI_Comm comm)
{
    int size = 1;
    PMPI_Comm_size(comm, &size);
    return size;
}

COMMLIB_EXPORT int MPI_Ibcast(void *buffer, int count, MPI_Datatype type, int root, MPI_Comm comm,
                              MPI_Request *request)
{
    NBC_FORWARD_UNLESS_STAGED(PMPI_Ibcast(buffer, count, type, root, comm, request));
    struct nbc c = {.failed = 0};
    int sender = comm_rank(comm) == root; /* the root's buffer is only read */
    void *b = nbc_stage(&c, !sender, buffer, count, type, 0);
    NBC_ISSUE(PMPI_Ibcast(buffer, count, type, root, comm, request), PMPI_Ibcast(b, count, type, root, comm, request));
}

COMMLIB_EXPORT int MPI_Ireduce(const void *sendbuf, void *recvbuf, int count, MPI_Datatype type, MPI_Op op, int root,
                               MPI_Comm comm, MPI_Request *request)
{
    NBC_FORWARD_UNLESS_STAGED(PMPI_Ireduce(sendbuf, recvbuf, count, type, op, root, comm, request));
    struct nbc c = {.failed = 0};
    const void *s = nbc_stage(&c, 0, sendbuf, count, type, 0);
    void *r = recvbuf; /* significant at the root only */
    if (comm_rank(comm) == root) r = nbc_stage(&c, 1, recvbuf, count, type, sendbuf == MPI_IN_PLACE);
    NBC_ISSUE(PMPI_Ireduce(sendbuf, recvbuf, count, type, op, root, comm, request),
              PMPI_Ireduce(s, r, count, type, op, root, comm, request));
}

COMMLIB_EXPORT int MPI_Iallgather(const void *sendbuf, int sendcount, MPI_Datatype sendtype, void *recvbuf,
                                  int recvcount, MPI_Datatype recvtype, MPI_Comm comm, MPI_Request *request)
{
    NBC_FORWARD_UNLESS_STAGED(
        PMPI_Iallgather(sendbuf, sendcount, sendtype, recvbuf, recvcount, recvtype, comm, request));
    struct nbc c = {.failed = 0};
    const void *s = nbc_stage(&c, 0, sendbuf, sendcount, sendtype, 0);
    void *r = nbc_stage(&c, 1, recvbuf, (int64_t)recvcount * comm_size(comm), recvtype, sendbuf == MPI_IN_PLACE);
    NBC_ISSUE(PMPI_Iallgather(sendbuf, sendcount, sendtype, recvbuf, recvcount, recvtype, comm, request),
              PMPI_Iallgather(s, sendcount, sendtype, r, recvcount, recvtype, comm, request));
}

COMMLIB_EXPORT int MPI_Ialltoall(const void *sendbuf, int sendcount, MPI_Datatype sendtype, void *recvbuf,
                                 int recvcount, MPI_Datatype recvtype, MPI_Comm comm, MPI_Request *request)
{
    NBC_FORWARD_UNLESS_STAGED(
        PMPI_Ialltoall(sendbuf, sendcount, sendtype, recvbuf, recvcount, recvtype, comm, request));
    int size = comm_size(comm);
    struct nbc c = {.failed = 0};
    const void *s = nbc_stage(&c, 0, sendbuf, (int64_t)sendcount * size, sendtype, 0);
    void *r = nbc_stage(&c, 1, recvbuf, (int64_t)recvcount * size, recvtype, sendbuf == MPI_IN_PLACE);
    NBC_ISSUE(PMPI_Ialltoall(sendbuf, sendcount, sendtype, recvbuf, recvcount, recvtype, comm, request),
              PMPI_Ialltoall(s, sendcount, sendtype, r, recvcount, recvtype, comm, request));
}

/* Elements of `type` covered by n blocks of (counts[i] at displs[i] elements). */
static int64_t vector_elements(int n, const int *counts, const int *displs)
{
    int64_t end = 0;
    for (int i = 0; i < n; i++)
        if (counts[i] > 0 && (int64_t)displs[i] + counts[i] > end) end = (int64_t)displs[i] + counts[i];
    return end;
}

COMMLIB_EXPORT int MPI_Ialltoallv(const void *sendbuf, const int sendcounts[], const int sdispls[],
                                  MPI_Datatype sendtype, void *recvbuf, const int recvcounts[], const int rdispls[],
                                  MPI_Datatype recvtype, MPI_Comm comm, MPI_Request *request)
{
    NBC_FORWARD_UNLESS_STAGED(PMPI_Ialltoallv(sendbuf, sendcounts, sdispls, sendtype, recvbuf, recvcounts, rdispls,
                                              recvtype, comm, request));
    int size = comm_size(comm);
    struct nbc c = {.failed = 0};
    const void *s = sendbuf == MPI_IN_PLACE || !sendcounts || !sdispls
                        ? sendbuf : nbc_stage(&c, 0, sendbuf, vector_elements(size, sendcounts, sdispls), sendtype, 0);
    void *r = recvbuf;
    int64_t *counts = malloc((size_t)size * sizeof *counts), *displs = malloc((size_t)size * sizeof *displs);
    if (!counts || !displs) {
        c.failed = 1;
    } else if (recvcounts && rdispls) {
        for (int i = 0; i < size; i++) {
            counts[i] = recvcounts[i];
            displs[i] = rdispls[i];
        }
        r = nbc_stage_vector(&c, recvbuf, size, counts, displs, recvtype, sendbuf == MPI_IN_PLACE);
    }
    free(counts);
    free(displs);
    NBC_ISSUE(PMPI_Ialltoallv(sendbuf, sendcounts, sdispls, sendtype, recvbuf, recvcounts, rdispls, recvtype, comm,
                              request),
              PMPI_Ialltoallv(s, sendcounts, sdispls, sendtype, r, recvcounts, rdispls, recvtype, comm, request));
}

#if MPI_VERSION >= 4
/* The large-count form is staged here rather than through the int entry point (as the
 * other _c forms are, large_count.c): the count and displacement arrays must stay alive
 * until the operation completes, so converted copies could not be freed at return.  The
 * host MPI's own _c call takes the program's arrays as they are. */
static int64_t vector_elements_c(int n, const MPI_Count *counts, const MPI_Aint *displs)
{
    int64_t end = 0;
    for (int i = 0; i < n; i++)
        if (counts[i] > 0 && (int64_t)displs[i] + (int64_t)counts[i] > end) end = (int64_t)displs[i] + (int64_t)counts[i];
    return end;
}

COMMLIB_EXPORT int MPI_Ialltoallv_c(const void *sendbuf, const MPI_Count sendcounts[], const MPI_Aint sdispls[],
                                    MPI_Datatype sendtype, void *recvbuf, const MPI_Count recvcounts[],
                                    const MPI_Aint rdispls[], MPI_Datatype recvtype, MPI_Comm comm,
                                    MPI_Request *request)
{
    NBC_FORWARD_UNLESS_STAGED(PMPI_Ialltoallv_c(sendbuf, sendcounts, sdispls, sendtype, recvbuf, recvcounts, rdispls,
                                                recvtype, comm, request));
    int size = comm_size(comm);
    struct nbc c = {.failed = 0};
    const void *s = sendbuf == MPI_IN_PLACE || !sendcounts || !sdispls
                        ? sendbuf : nbc_stage(&c, 0, sendbuf, vector_elements_c(size, sendcounts, sdispls), sendtype, 0);
    void *r = recvbuf;
    int64_t *counts = malloc((size_t)size * sizeof *counts), *displs = malloc((size_t)size * sizeof *displs);
    if (!counts || !displs) {
        c.failed = 1;
    } else if (recvcounts && rdispls) {
        for (int i = 0; i < size; i++) {
            counts[i] = (int64_t)recvcounts[i];
            displs[i] = (int64_t)rdispls[i];
        }
        r = nbc_stage_vector(&c, recvbuf, size, counts, displs, recvtype, sendbuf == MPI_IN_PLACE);
    }
    free(counts);
    free(displs);
    NBC_ISSUE(PMPI_Ialltoallv_c(sendbuf, sendcounts, sdispls, sendtype, recvbuf, recvcounts, rdispls, recvtype, comm,
                                request),
              PMPI_Ialltoallv_c(s, sendcounts, sdispls, sendtype, r, recvcounts, rdispls, recvtype, comm, request));
}
#endif

COMMLIB_EXPORT int MPI_Ireduce_scatter_block(const void *sendbuf, void *recvbuf, int recvcount, MPI_Datatype type,
                                             MPI_Op op, MPI_Comm comm, MPI_Request *request)
{
    NBC_FORWARD_UNLESS_STAGED(PMPI_Ireduce_scatter_block(sendbuf, recvbuf, recvcount, type, op, comm, request));
    int64_t all = (int64_t)recvcount * comm_size(comm);
    struct nbc c = {.failed = 0};
    const void *s = nbc_stage(&c, 0, sendbuf, all, type, 0);
    /* in place, the input is the receive buffer's first `all` elements (and what the MPI
     * leaves in those past the first recvcount goes back too, as it would in place) */
    void *r = sendbuf == MPI_IN_PLACE ? nbc_stage(&c, 1, recvbuf, all, type, 1)
                                      : nbc_stage(&c, 1, recvbuf, recvcount, type, 0);
    NBC_ISSUE(PMPI_Ireduce_scatter_block(sendbuf, recvbuf, recvcount, type, op, comm, request),
              PMPI_Ireduce_scatter_block(s, r, recvcount, type, op, comm, request));
}
