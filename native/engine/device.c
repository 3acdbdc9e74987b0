/* Device buffers in engine operations.
 *
 * Over an MPI that cannot read device memory, an operation's device buffers are staged in
 * pinned host memory (transfer/staging.h pools): per partition, the inputs are copied to
 * the host on a stream of commlib's own - after an event recorded on the caller's stream
 * when the operation started, so the copy reads what the work queued before the call
 * wrote - the host algorithm runs on the copies, and the results are copied back on the
 * same stream.  Partitions overlap: the copy in of partition i+1 is issued as soon as it is
 * ready, while partition i moves, and the copy back of partition i runs while partition i+1
 * moves.  A partition counts as done once its results are in device memory, so
 * engine_stream_wait only has to order the caller's stream after an event that already
 * happened (as NCCL's wait does, never later than the data).
 *
 * Over a CUDA-aware MPI, what the MPI can do on device memory itself (broadcast,
 * all-to-all, send, recv, and all-reduce of the dtypes and ops the MPI knows) gets the
 * device pointers as they are, after the same event.  The shared-memory transport always
 * stages (it reduces on the CPU). */
#include <stdlib.h>
#include <string.h>

#include "../transfer/model.h"
#include "../transfer/staging.h"
#include "../util/config.h"
#include "../util/stats.h"
#include "internal.h"

#define CU_STREAM_NON_BLOCKING 0x1
#define NOT_READY 600 /* CUDA_ERROR_NOT_READY */

int engine_mpi_reduces(int dtype, int op); /* ring.c */

/* The engine's stream of each context (made on first use, kept for the process). */
static struct {
    pthread_mutex_t lock;
    int n;
    CUcontext context[16];
    CUstream stream[16];
} streams = {.lock = PTHREAD_MUTEX_INITIALIZER};

static CUstream engine_stream(struct device_context *dc)
{
    CUstream s = NULL;
    pthread_mutex_lock(&streams.lock);
    for (int i = 0; i < streams.n && !s; i++)
        if (streams.context[i] == dc->context) s = streams.stream[i];
    if (!s && streams.n < 16 && cuda_driver()->cuStreamCreate(&s, CU_STREAM_NON_BLOCKING) == CUDA_SUCCESS) {
        streams.context[streams.n] = dc->context;
        streams.stream[streams.n++] = s;
    }
    pthread_mutex_unlock(&streams.lock);
    return s ? s : dc->stream;
}

static int is_device(const void *p) { return p && buffer_kind_of(p) == BUFFER_DEVICE; }

/* Byte ranges of partition p: what the operation reads (input) or writes (output),
 * relative to the buffer it is in (send, or recv when in place). */
struct range {
    int64_t at, bytes;
    int in_recv; /* the range lies in the receive buffer */
};

static int ranges_of(const engine_op *op, int p, int output, struct range *out)
{
    const struct engine_args *a = &op->a;
    engine_comm *c = op->c;
    int64_t size = (int64_t)cl_dtype_size(a->dtype), n = 0;
    int in_place = a->send == NULL;
    switch (a->kind) {
    case ENGINE_ALLREDUCE:
    case ENGINE_BROADCAST: {
        int64_t counts[op->parts], displs[op->parts];
        engine_split_parts(op, a->count, counts, displs);
        if (a->kind == ENGINE_BROADCAST && (output ? c->rank == a->root : c->rank != a->root)) return 0;
        out[n++] = (struct range){displs[p] * size, counts[p] * size, output || in_place || a->kind == ENGINE_BROADCAST};
        return (int)n;
    }
    case ENGINE_SEND:
        if (!output) out[n++] = (struct range){0, a->count * size, 0};
        return (int)n;
    case ENGINE_RECV:
        if (output) out[n++] = (struct range){0, a->count * size, 1};
        return (int)n;
    case ENGINE_ALLTOALL:
        if (output) out[n++] = (struct range){0, (int64_t)c->size * op->counts[c->rank] * size, 1};
        else out[n++] = (struct range){0, op->counts[c->size] * size, 0};
        return (int)n;
    case ENGINE_REDUCE_SCATTER:
    case ENGINE_ALLGATHER: {
        int rs = a->kind == ENGINE_REDUCE_SCATTER;
        for (int q = 0; q < c->size; q++) {
            int64_t counts[op->parts], displs[op->parts];
            engine_split_parts(op, op->counts[q], counts, displs);
            if (rs && !output) { /* every share's part p of the input */
                out[n++] = (struct range){(op->displs[q] + displs[p]) * size, counts[p] * size, 0};
            } else if (rs && q == c->rank) { /* my share's part p */
                out[n++] = (struct range){displs[p] * size, counts[p] * size, 1};
            } else if (!rs && output) {
                out[n++] = (struct range){(op->displs[q] + displs[p]) * size, counts[p] * size, 1};
            } else if (!rs && q == c->rank) {
                out[n++] = in_place ? (struct range){(op->displs[q] + displs[p]) * size, counts[p] * size, 1}
                                    : (struct range){displs[p] * size, counts[p] * size, 0};
            }
        }
        return (int)n;
    }
    default:
        return 0;
    }
}

static int64_t send_bytes(const engine_op *op)
{
    const struct engine_args *a = &op->a;
    int64_t size = (int64_t)cl_dtype_size(a->dtype);
    switch (a->kind) {
    case ENGINE_REDUCE_SCATTER:
    case ENGINE_ALLTOALL: return op->counts[op->c->size] * size;
    case ENGINE_ALLGATHER: return op->counts[op->c->rank] * size;
    case ENGINE_ALLREDUCE:
    case ENGINE_SEND: return a->count * size;
    default: return 0;
    }
}

static int64_t recv_bytes(const engine_op *op)
{
    const struct engine_args *a = &op->a;
    int64_t size = (int64_t)cl_dtype_size(a->dtype);
    switch (a->kind) {
    case ENGINE_REDUCE_SCATTER: return op->counts[op->c->rank] * size;
    case ENGINE_ALLGATHER: return op->counts[op->c->size] * size;
    case ENGINE_ALLTOALL: return (int64_t)op->c->size * op->counts[op->c->rank] * size;
    case ENGINE_ALLREDUCE:
    case ENGINE_BROADCAST:
    case ENGINE_RECV: return a->count * size;
    default: return 0;
    }
}

static int cuda_failed(engine_op *op, CUresult rc, const char *what)
{
    if (rc == CUDA_SUCCESS) return 0;
    const char *text = "unknown error";
    cuda_driver()->cuGetErrorString(rc, &text);
    engine_fail(op, ENGINE_ERR_CUDA, "%s failed: %s", what, text ? text : "unknown error");
    return 1;
}

int device_prepare(engine_op *op, char *err, size_t errlen)
{
    const struct engine_args *a = &op->a;
    if (!commlib_config.gpu || !cuda_driver()) return ENGINE_OK; /* no CUDA in the process: host memory */
    int send_dev = is_device(a->send), recv_dev = is_device(a->recv);
    if (!send_dev && !recv_dev) return ENGINE_OK;
    const struct cuda_driver *cu = cuda_driver();
    op->dc = device_context_of(recv_dev ? a->recv : a->send);
    if (!op->dc) {
        snprintf(err, errlen, "%s: no CUDA context for the device buffer", "engine");
        return ENGINE_ERR_CUDA;
    }
    op->device = 1;
    int k = a->kind, shm = op->c->transport == TRANSPORT_SHM && k != ENGINE_SEND && k != ENGINE_RECV && k != ENGINE_ALLTOALL;
    op->aware = !shm && op->parts == 1 && !a->partitioned && transfer_cuda_aware() &&
                (k == ENGINE_BROADCAST || k == ENGINE_ALLTOALL || k == ENGINE_SEND || k == ENGINE_RECV ||
                 (k == ENGINE_ALLREDUCE && engine_mpi_reduces(a->dtype, a->op)));
    /* the caller's stream: what was queued before the call comes first */
    op->in_event = calloc((size_t)op->parts, sizeof *op->in_event);
    op->out_event = calloc((size_t)op->parts, sizeof *op->out_event);
    op->in_state = calloc((size_t)op->parts, sizeof *op->in_state);
    op->out_state = calloc((size_t)op->parts, sizeof *op->out_state);
    if (!op->in_event || !op->out_event || !op->in_state || !op->out_state) {
        snprintf(err, errlen, "out of memory");
        return ENGINE_ERR_MEMORY;
    }
    int ok = cu->cuEventCreate(&op->input_ready, CU_EVENT_DISABLE_TIMING) == CUDA_SUCCESS &&
             cu->cuEventRecord(op->input_ready, (CUstream)a->stream) == CUDA_SUCCESS &&
             cu->cuEventCreate(&op->finished, CU_EVENT_DISABLE_TIMING) == CUDA_SUCCESS;
    for (int p = 0; ok && p < op->parts; p++)
        ok = cu->cuEventCreate(&op->in_event[p], CU_EVENT_DISABLE_TIMING) == CUDA_SUCCESS &&
             cu->cuEventCreate(&op->out_event[p], CU_EVENT_DISABLE_TIMING) == CUDA_SUCCESS;
    if (!ok) {
        snprintf(err, errlen, "cannot record a CUDA event on the caller's stream");
        return ENGINE_ERR_CUDA;
    }
    if (op->aware) return ENGINE_OK;
    op->send_bytes = a->send ? send_bytes(op) : 0;
    op->recv_bytes = recv_bytes(op);
    /* pinned staging, playing the program's buffers (host buffers among them are copied
     * through it too: the algorithm then works on one kind of memory) */
    if (op->recv_bytes && !(op->host_recv = staging_get(op->dc, STAGING_PINNED, (size_t)op->recv_bytes,
                                                        &op->recv_capacity, &op->recv_kind))) {
        snprintf(err, errlen, "out of pinned memory (%lld bytes)", (long long)op->recv_bytes);
        return ENGINE_ERR_MEMORY;
    }
    if (op->send_bytes && !(op->host_send = staging_get(op->dc, STAGING_PINNED, (size_t)op->send_bytes,
                                                        &op->send_capacity, &op->send_kind))) {
        snprintf(err, errlen, "out of pinned memory (%lld bytes)", (long long)op->send_bytes);
        return ENGINE_ERR_MEMORY;
    }
    stat_add(STAT_ENGINE_DEVICE_STAGED, 1);
    return ENGINE_OK;
}

/* Issues the copies of partition p's ranges (input: device -> staging; output: back). */
static int copy_ranges(engine_op *op, int p, int output, CUstream stream)
{
    const struct cuda_driver *cu = cuda_driver();
    struct range ranges[op->c->size + 1];
    int n = ranges_of(op, p, output, ranges);
    for (int i = 0; i < n; i++) {
        if (!ranges[i].bytes) continue;
        char *user = ranges[i].in_recv ? (char *)op->a.recv : (char *)op->a.send;
        char *host = ranges[i].in_recv ? op->host_recv : op->host_send;
        user += ranges[i].at;
        host += ranges[i].at;
        CUresult rc = output ? cu->cuMemcpyAsync((CUdeviceptr)(uintptr_t)user, (CUdeviceptr)(uintptr_t)host,
                                                 (size_t)ranges[i].bytes, stream)
                             : cu->cuMemcpyAsync((CUdeviceptr)(uintptr_t)host, (CUdeviceptr)(uintptr_t)user,
                                                 (size_t)ranges[i].bytes, stream);
        if (cuda_failed(op, rc, "cuMemcpyAsync")) return 0;
    }
    CUevent e = output ? op->out_event[p] : op->in_event[p];
    if (cuda_failed(op, cu->cuEventRecord(e, stream), "cuEventRecord")) return 0;
    return !output || !cuda_failed(op, cu->cuEventRecord(op->finished, stream), "cuEventRecord");
}

/* 1 when the event happened (or failed: the status says so). */
static int happened(engine_op *op, CUevent e, const char *what)
{
    CUresult rc = cuda_driver()->cuEventQuery(e);
    if (rc == NOT_READY) return 0;
    cuda_failed(op, rc, what);
    return 1;
}

void device_issue_in(engine_op *op, int p)
{
    if (op->in_state[p]) return;
    const struct cuda_driver *cu = cuda_driver();
    device_make_current(op->dc->context); /* the engine's thread has none of its own */
    op->in_state[p] = 1;
    if (op->aware) return; /* the MPI reads device memory itself, after input_ready */
    CUstream s = engine_stream(op->dc);
    if (!op->waited_input) {
        if (cuda_failed(op, cu->cuStreamWaitEvent(s, op->input_ready, 0), "cuStreamWaitEvent")) return;
        op->waited_input = 1;
    }
    copy_ranges(op, p, 0, s);
}

int device_in_done(engine_op *op, int p)
{
    if (op->in_state[p] == 2) return 1;
    if (op->in_state[p] == 0) device_issue_in(op, p);
    device_make_current(op->dc->context);
    if (!happened(op, op->aware ? op->input_ready : op->in_event[p], "cuEventQuery (copy in)")) return 0;
    op->in_state[p] = 2;
    return 1;
}

void device_issue_out(engine_op *op, int p)
{
    if (op->out_state[p]) return;
    device_make_current(op->dc->context);
    op->out_state[p] = op->aware ? 2 : 1; /* aware: the MPI wrote device memory itself */
    if (!op->aware) copy_ranges(op, p, 1, engine_stream(op->dc));
}

int device_out_done(engine_op *op, int p)
{
    if (op->out_state[p] == 2) return 1;
    if (op->out_state[p] == 0) return 0;
    device_make_current(op->dc->context);
    if (!happened(op, op->out_event[p], "cuEventQuery (copy out)")) return 0;
    op->out_state[p] = 2;
    return 1;
}

int engine_stream_wait(engine_op *op, void *stream)
{
    if (!op->device) return ENGINE_OK;
    const struct cuda_driver *cu = cuda_driver();
    device_make_current(op->dc->context);
    /* aware: the MPI wrote device memory itself, before the operation completed */
    if (op->aware) return ENGINE_OK;
    return cu->cuStreamWaitEvent((CUstream)stream, op->finished, 0) == CUDA_SUCCESS ? ENGINE_OK : ENGINE_ERR_CUDA;
}

void device_release(engine_op *op)
{
    if (!op->device) return;
    const struct cuda_driver *cu = cuda_driver();
    device_make_current(op->dc->context);
    /* copies of an operation that failed half-way may still be running */
    for (int p = 0; p < op->parts && op->in_state; p++) {
        if (op->in_state[p] == 1 && op->in_event[p]) cu->cuEventSynchronize(op->in_event[p]);
        if (op->out_state[p] == 1 && op->out_event[p]) cu->cuEventSynchronize(op->out_event[p]);
    }
    if (op->host_send) staging_put(op->send_kind, op->host_send, op->send_capacity, op->dc);
    if (op->host_recv) staging_put(op->recv_kind, op->host_recv, op->recv_capacity, op->dc);
    if (op->input_ready) cu->cuEventDestroy(op->input_ready);
    if (op->finished) cu->cuEventDestroy(op->finished);
    for (int p = 0; p < op->parts && op->in_event; p++) {
        if (op->in_event[p]) cu->cuEventDestroy(op->in_event[p]);
        if (op->out_event[p]) cu->cuEventDestroy(op->out_event[p]);
    }
    free(op->in_event);
    free(op->out_event);
    free(op->in_state);
    free(op->out_state);
}
