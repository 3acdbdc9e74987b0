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
 * PMPI_Iallreduce; so do intercommunicators. */
#include <stdlib.h>
#include <string.h>

#include "../pack/pack_any.h"
#include "../progress/requests.h"
#include "../transfer/span.h"
#include "../util/log.h"
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
    int r = span_stage_begin(&recv, recvbuf, count, type, !in_place), ok = 1;
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
    /* a typed receive: completion copies the span back (staged_recv_finish) */
    *t = (staged_transfer){.wire_buf = reduced, .wire_count = count, .wire_type = type, .receiving = 1,
                           .typed = 1, .user = recvbuf, .span = recv};
    int rc = PMPI_Iallreduce(MPI_IN_PLACE, reduced, count, type, op, comm, request);
    if (rc == MPI_SUCCESS) requests_add(*request, t);
    else staged_release(t);
    return rc;
}
