#include "staged.h"

#include <limits.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>

#include "../cuda/device.h"
#include "../datatype/cache.h"
#include "../pack/device_pack.h"
#include "../pack/pack_any.h"
#include "../util/config.h"
#include "../util/log.h"
#include "../util/stats.h"
#include "model.h"
#include "commlib.h"
#include "ipc.h"
#include "pipeline.h"
#include "staging.h"

static void *at(const void *base, int64_t offset) { return (void *)((uintptr_t)base + (uintptr_t)offset); }

/* A receive keeps a copy of the canonical form; its pieces live right after the struct. */
static staged_transfer *transfer_new(const canonical_type *copy)
{
    size_t extra = copy ? (size_t)copy->npieces * sizeof(strided_piece) : 0;
    staged_transfer *t = calloc(1, sizeof *t + extra);
    if (t && copy) {
        t->ct = *copy;
        t->ct.pieces = (strided_piece *)(t + 1);
        memcpy(t->ct.pieces, copy->pieces, extra);
    }
    return t;
}

static int pack_into(const canonical_type *ct, const void *buf, int64_t count, void *packed, int64_t bytes)
{
    int64_t position = 0;
    return any_pack_message(ct, buf, count, packed, bytes, &position) == COMMLIB_OK;
}

/* The device method's send: pack on the device into device staging, then one bulk copy
 * into the pinned staging the MPI sends from (a contiguous message needs no pack).
 * Without device staging to be had, the pack goes straight into the pinned staging.
 * `packed`: where in the staging (a partition's bytes start inside it). */
static int pack_through_device(staged_transfer *t, const canonical_type *ct, const void *buf, int64_t count,
                               char *packed, int64_t bytes)
{
    if (t->dense) return device_copy(t->dc, packed, at(buf, t->dense_offset), (size_t)bytes);
    size_t capacity;
    int kind;
    void *device = staging_get(t->dc, STAGING_DEVICE, (size_t)bytes, &capacity, &kind);
    if (!device) return pack_into(ct, buf, count, packed, bytes);
    int ok = pack_into(ct, buf, count, device, bytes) && device_copy(t->dc, packed, device, (size_t)bytes);
    staging_put(kind, device, capacity, t->dc);
    return ok;
}

/* A send's bytes into its staging, by the transfer's method (at the call, at each
 * MPI_Start of a persistent send, at each MPI_Pready of a partitioned one). */
static int fill_send(staged_transfer *t, const canonical_type *ct, const void *buf, int64_t count, char *packed,
                     int64_t bytes)
{
    return t->method == METHOD_DEVICE ? pack_through_device(t, ct, buf, count, packed, bytes)
                                      : pack_into(ct, buf, count, packed, bytes);
}

static int packed_prepare(staged_transfer **out, const canonical_type *ct, const void *buf, int count, int64_t bytes,
                          struct device_context *dc, int receiving, int persistent, int method,
                          const strided_piece *dense, int partitioned)
{
    /* a small device receive may be posted for a GPU-to-GPU descriptor (transfer/ipc.h) */
    int64_t posted =
        receiving && dc && !partitioned && method != METHOD_AWARE ? ipc_receive_posted_bytes(bytes) : bytes;
    staged_transfer *t = transfer_new(receiving || persistent ? ct : NULL);
    if (!t) return STAGED_FAILED;
    t->receiving = receiving;
    t->persistent = persistent;
    t->count = count;
    t->user = (void *)buf;
    t->dc = dc;
    t->method = dc ? method : -1;
    t->dense = dense != NULL;
    t->dense_offset = dense ? dense->offset : 0;
    int kind = !dc ? STAGING_HOST : method == METHOD_AWARE ? STAGING_DEVICE : STAGING_PINNED;
    if (!(t->staging = staging_get(dc, kind, (size_t)posted, &t->capacity, &t->staging_kind))) {
        free(t);
        return STAGED_FAILED;
    }
    t->posted_larger = posted > bytes;
    t->program_bytes = bytes;
    int ok = receiving || persistent || fill_send(t, ct, buf, count, t->staging, bytes);
    if (!ok) {
        staged_release(t);
        return STAGED_FAILED;
    }
    t->wire_buf = t->staging;
    t->wire_count = (int)posted;
    t->wire_type = MPI_PACKED;
    *out = t;
    return STAGED_YES;
}

/* What the program's buffer holds of a packed receive (its wire_count may be posted larger). */
static int64_t receive_capacity(const staged_transfer *t)
{
    return t->posted_larger ? t->program_bytes : t->wire_count;
}

/* A send copies the span in (the MPI may read any byte of its type map); a receive
 * copies nothing in and, at completion, only the bytes the message filled out
 * (transfer/typemap.h). */
static int typed_prepare(staged_transfer **out, const void *buf, int count, MPI_Datatype type, int receiving,
                         int persistent, int partitioned)
{
    staged_transfer *t = transfer_new(NULL);
    if (!t) return STAGED_FAILED;
    t->method = -1;
    /* persistent: staged_start copies a send's span at each start; partitioned: each
     * partition's type map bytes go in at MPI_Pready, so a send takes the map too */
    int s = receiving || partitioned ? span_stage_receive_typed(&t->span, buf, count, type, 0)
                                     : span_stage_begin(&t->span, buf, count, type, persistent);
    if (s != 1) {
        free(t);
        return s == 0 ? STAGED_FORWARD : STAGED_FAILED;
    }
    t->typed = 1;
    t->receiving = receiving;
    t->persistent = persistent;
    t->user = (void *)buf;
    t->wire_buf = span_host_base(&t->span);
    t->wire_count = count;
    t->wire_type = type;
    *out = t;
    return STAGED_YES;
}

/* A device buffer's packed path takes the method the model picks; a contiguous one
 * over a CUDA-aware MPI goes to the MPI as it is (HANDED_OFF, counted here). */
enum { HANDED_OFF = 2 };
static int packed_by_method(staged_transfer **out, const canonical_type *ct, const void *buf, int count, int64_t bytes,
                            struct device_context *dc, int receiving, int persistent, int partitioned)
{
    if (!dc) return packed_prepare(out, ct, buf, count, bytes, NULL, receiving, persistent, -1, NULL, partitioned);
    strided_piece piece;
    int dense = canonical_single_piece(ct, count, &piece) && piece.ndims == 0 && piece.block == bytes;
    enum transfer_method method = transfer_method_choose(dc, receiving, dense, bytes);
    stat_add((receiving ? STAT_METHOD_RECV_ONESHOT : STAT_METHOD_SEND_ONESHOT) + method, 1);
    if (method == METHOD_AWARE && dense) {
        stat_add(STAT_P2P_HANDED_OFF, 1);
        return HANDED_OFF;
    }
    return packed_prepare(out, ct, buf, count, bytes, dc, receiving, persistent, method, dense ? &piece : NULL,
                          partitioned);
}

static int prepare(staged_transfer **out, const void *buf, int count, MPI_Datatype type, int receiving,
                   int persistent, int partitioned)
{
    *out = NULL;
    /* count <= 0 moves no data (or is the host MPI's error to raise) */
    if (count <= 0 || (!commlib_config.stage_host && (!commlib_config.gpu || !cuda_driver()))) return STAGED_FORWARD;
    int locked;
    const canonical_type *ct = type_cache_acquire(type, &locked);
    /* classify where the data is: with MPI_BOTTOM the pointer itself is 0 */
    int bounded = ct && ct->unsupported != TYPE_REASON_MPI_ERROR;
    const void *first = at(buf, bounded ? ct->true_lb : 0);
    enum buffer_kind kind = buffer_kind_of(first);
    int gpu = kind == BUFFER_DEVICE || kind == BUFFER_MANAGED;
    int rc = STAGED_FORWARD;
    if (gpu || (commlib_config.stage_host && buf != MPI_BOTTOM)) {
        struct device_context *dc = gpu ? device_context_of(first) : NULL;
        int64_t bytes;
        if (gpu && !dc)
            rc = STAGED_FAILED;
        else if (ct && !ct->unsupported && !__builtin_mul_overflow(ct->size, (int64_t)count, &bytes) && bytes <= INT_MAX)
            rc = packed_by_method(out, ct, buf, count, bytes, dc, receiving, persistent, partitioned);
        /* an unknown handle on host memory is the host MPI's to judge (and report) */
        if (rc == HANDED_OFF) rc = STAGED_FORWARD;
        else if (rc != STAGED_YES && (ct || gpu))
            rc = typed_prepare(out, buf, count, type, receiving, persistent, partitioned);
        if (rc == STAGED_FAILED) {
            commlib_log(LOG_ERROR, "staging a %s %s buffer failed", buffer_kind_name[kind], receiving ? "receive" : "send");
            if (!gpu) rc = STAGED_FORWARD; /* the host MPI can still use host memory */
        }
    }
    type_cache_release(locked);
    if (rc == STAGED_YES && !persistent) { /* persistent transfers count at each start */
        stat_add(receiving ? STAT_P2P_STAGED_RECV : STAT_P2P_STAGED_SEND, 1);
        if ((*out)->typed) stat_add(STAT_P2P_STAGED_TYPED, 1);
    }
    return rc;
}

int staged_send_prepare(staged_transfer **out, const void *buf, int count, MPI_Datatype type)
{
    return prepare(out, buf, count, type, 0, 0, 0);
}

int staged_recv_prepare(staged_transfer **out, void *buf, int count, MPI_Datatype type)
{
    return prepare(out, buf, count, type, 1, 0, 0);
}

int staged_persistent_prepare(staged_transfer **out, const void *buf, int count, MPI_Datatype type, int receiving)
{
    return prepare(out, buf, count, type, receiving, 1, 0);
}

/* A receive partition's state: compare-and-swap from WAITING to MOVING claims the move,
 * so that concurrent MPI_Parrived calls and the completion move each partition once. */
enum { PARTITION_WAITING, PARTITION_MOVING, PARTITION_MOVED };

int staged_partitioned_prepare(staged_transfer **out, const void *buf, int partitions, MPI_Count count,
                               MPI_Datatype type, int receiving)
{
    *out = NULL;
    if (partitions <= 0 || count <= 0 || count > INT_MAX / partitions) return STAGED_FORWARD;
    int s = prepare(out, buf, partitions * (int)count, type, receiving, 1, 1);
    if (s != STAGED_YES) return s;
    staged_transfer *t = *out;
    if (!(t->partition_state = malloc((size_t)partitions))) {
        staged_release(t);
        *out = NULL;
        return STAGED_FAILED;
    }
    /* before the first MPI_Start nothing arrived that could be moved */
    memset(t->partition_state, PARTITION_MOVED, (size_t)partitions);
    t->partitions = partitions;
    t->count = (int)count;
    t->wire_count /= partitions;
    return STAGED_YES;
}

int staged_start(staged_transfer *t)
{
    int ok = 1;
    if (t->partitions) {
        memset(t->partition_state, PARTITION_WAITING, (size_t)t->partitions);
    } else if (t->typed && !t->receiving) {
        ok = span_stage_copy(&t->span, 0);
    } else if (!t->receiving) {
        ok = fill_send(t, &t->ct, t->user, t->count, t->staging, t->wire_count);
    }
    if (!ok) {
        commlib_log(LOG_ERROR, "staging a persistent %s failed at MPI_Start", t->receiving ? "receive" : "send");
        return 0;
    }
    stat_add(t->receiving ? STAT_P2P_STAGED_RECV : STAT_P2P_STAGED_SEND, 1);
    if (t->typed) stat_add(STAT_P2P_STAGED_TYPED, 1);
    return 1;
}

/* What the host MPI would have left in a host receive buffer: data on success and on
 * truncation (the part that fit), nothing after another error or a cancel. */
static int writes_back(const MPI_Status *status, int err)
{
    int class = MPI_SUCCESS, cancelled = 0;
    if (err != MPI_SUCCESS && PMPI_Error_class(err, &class) != MPI_SUCCESS) return 0;
    if (class != MPI_SUCCESS && class != MPI_ERR_TRUNCATE) return 0;
    return PMPI_Test_cancelled(status, &cancelled) == MPI_SUCCESS && !cancelled;
}

/* `received` packed bytes from `packed` (the staging, or a device copy of it) into the
 * program's buffer.  A message ending inside an element (MPI_Get_count is MPI_UNDEFINED)
 * fills that element's first bytes in type-map order, as the host MPI writes the basic
 * elements that arrived: the rest of the element is neither read nor written. */
static int unpack_from(staged_transfer *t, const char *packed, int received)
{
    int64_t whole = t->ct.size ? received / t->ct.size : 0, rest = received - whole * t->ct.size;
    int64_t position = 0;
    if (any_unpack_message(&t->ct, packed, received, &position, t->user, whole) != COMMLIB_OK) return 0;
    if (!rest) return 1;
    strided_piece *pieces = malloc((size_t)CANONICAL_PREFIX_MAX(&t->ct) * sizeof *pieces);
    canonical_type prefix;
    position = 0;
    int ok = pieces && canonical_prefix(&t->ct, rest, &prefix, pieces) &&
             any_unpack_message(&prefix, packed + whole * t->ct.size, rest, &position,
                                at(t->user, whole * t->ct.extent), 1) == COMMLIB_OK;
    free(pieces);
    return ok;
}

/* Whole elements of a packed receive, from `packed` (their place in the staging) into the
 * program's buffer at `user`, as unpack_through_device does it for the device method. */
static int unpack_elements(staged_transfer *t, const char *packed, void *user, int64_t count)
{
    int64_t bytes = count * t->ct.size, position = 0;
    void *device = NULL;
    size_t capacity;
    int kind, ok = 1;
    if (t->method == METHOD_DEVICE && t->dense) return device_copy(t->dc, at(user, t->dense_offset), packed, (size_t)bytes);
    if (t->method == METHOD_DEVICE && (device = staging_get(t->dc, STAGING_DEVICE, (size_t)bytes, &capacity, &kind)))
        ok = device_copy(t->dc, device, packed, (size_t)bytes);
    ok = ok && any_unpack_message(&t->ct, device ? device : packed, bytes, &position, user, count) == COMMLIB_OK;
    if (device) staging_put(kind, device, capacity, t->dc);
    return ok;
}

/* Partitions [first, first + n): into the staging (a send) or out of it (a receive), their
 * elements only.  Called on any thread of the program: CUDA wants the context current. */
static int move_partitions(staged_transfer *t, int first, int n)
{
    int64_t start = (int64_t)first * t->count, count = (int64_t)n * t->count;
    if (t->typed) {
        const struct typemap *m = &t->span.maps[0];
        if (t->span.dc) device_make_current(t->span.dc->context);
        return typemap_copy_elements(m, t->span.dc, t->user, span_host_base(&t->span), start * m->ct->extent, count,
                                     t->receiving);
    }
    if (t->dc) device_make_current(t->dc->context);
    char *packed = t->staging + start * t->ct.size;
    void *user = at(t->user, start * t->ct.extent);
    return t->receiving ? unpack_elements(t, packed, user, count)
                        : fill_send(t, &t->ct, user, count, packed, count * t->ct.size);
}

int staged_partitions_ready(staged_transfer *t, int first, int n)
{
    if (!move_partitions(t, first, n)) {
        commlib_log(LOG_ERROR, "staging partitions %d..%d of a partitioned send failed", first, first + n - 1);
        return 0;
    }
    stat_add(STAT_P2P_PARTITIONS, (uint64_t)n);
    return 1;
}

int staged_partition_arrived(staged_transfer *t, int partition)
{
    unsigned char state = PARTITION_WAITING;
    if (!__atomic_compare_exchange_n(&t->partition_state[partition], &state, PARTITION_MOVING, 0, __ATOMIC_ACQUIRE,
                                     __ATOMIC_ACQUIRE))
        return state == PARTITION_MOVED;
    int ok = move_partitions(t, partition, 1);
    __atomic_store_n(&t->partition_state[partition], ok ? PARTITION_MOVED : PARTITION_WAITING, __ATOMIC_RELEASE);
    if (!ok) {
        commlib_log(LOG_ERROR, "copying partition %d of a partitioned receive into the program's buffer failed",
                    partition);
        return -1;
    }
    stat_add(STAT_P2P_PARTITIONS, 1);
    return 1;
}

/* The completion of a partitioned receive: the partitions before `upto` that nobody moved
 * yet go in one move per run (a program that never calls MPI_Parrived gets one unpack of
 * the whole message), a partition another thread is moving is waited for; those from
 * `upto` on (a message shorter than the receive, an error, a cancel) are marked moved
 * without a byte written. */
static int partitions_finish(staged_transfer *t, int upto)
{
    int ok = 1;
    for (int i = 0; i < t->partitions;) {
        int n = 0;
        unsigned char state = PARTITION_WAITING;
        while (i + n < t->partitions && (n == 0 || (i + n < upto) == (i < upto)) &&
               __atomic_compare_exchange_n(&t->partition_state[i + n], &state, PARTITION_MOVING, 0, __ATOMIC_ACQUIRE,
                                           __ATOMIC_ACQUIRE)) {
            n++;
            state = PARTITION_WAITING;
        }
        if (!n) { /* moved, or being moved by an MPI_Parrived (which may fail and leave it waiting) */
            while ((state = __atomic_load_n(&t->partition_state[i], __ATOMIC_ACQUIRE)) == PARTITION_MOVING)
                sched_yield();
            i += state == PARTITION_MOVED;
            continue;
        }
        int write = i < upto, moved = !write || move_partitions(t, i, n);
        if (write && moved) stat_add(STAT_P2P_PARTITIONS, (uint64_t)n);
        ok = ok && moved;
        for (int k = i; k < i + n; k++) __atomic_store_n(&t->partition_state[k], PARTITION_MOVED, __ATOMIC_RELEASE);
        i += n;
    }
    return ok;
}

/* How many partitions a partitioned receive got whole: the status counts bytes (MPICH
 * completes a receive longer than the message with an error, data and count of what came). */
static int partitions_received(staged_transfer *t, const MPI_Status *status, int err)
{
    MPI_Count received;
    int64_t bytes = (t->typed ? t->span.maps[0].size : t->ct.size) * t->count;
    if (!writes_back(status, err)) return 0;
    if (bytes == 0) return t->partitions;
    if (PMPI_Get_elements_x(status, MPI_BYTE, &received) != MPI_SUCCESS || received == MPI_UNDEFINED) return 0;
    return received / bytes < t->partitions ? (int)(received / bytes) : t->partitions;
}

/* The device method's receive: one bulk copy of the pinned staging to the device, then
 * the unpack there (a contiguous message lands in place with the copy: the bytes that
 * arrived are exactly what the MPI would have written).  Without device staging to be
 * had, the unpack reads the pinned staging directly. */
static int unpack_through_device(staged_transfer *t, int received)
{
    if (t->dense) return device_copy_to_device(t->dc, at(t->user, t->dense_offset), t->staging, (size_t)received);
    size_t capacity;
    int kind;
    void *device = staging_get(t->dc, STAGING_DEVICE, (size_t)received, &capacity, &kind);
    if (!device) return unpack_from(t, t->staging, received);
    /* in a device batch both stay queued: the device staging may go back to its pool now
     * (the context's one stream runs them in order), the pinned staging is kept by the
     * caller until the batch ends */
    int ok = device_copy_to_device(t->dc, device, t->staging, (size_t)received) && unpack_from(t, device, received);
    staging_put(kind, device, capacity, t->dc);
    return ok;
}

/* Measuring hooks (util/config.h test_hook): COMMLIB_TEST_DENSE_COPY_ENGINE=1 copies a
 * contiguous GPU-to-GPU message of 1 MiB or more by the copy engine even inside a batch;
 * COMMLIB_TEST_TWO_PASS=1 moves a strided direct message in two passes (pack into scratch,
 * unpack) - both as before stop 26, for same-run comparisons. */
static int dense_hook = -1, two_pass_hook = -1;

/* Inside a completion call's device batch, a GPU-to-GPU message of whole elements is queued
 * for the batch's one unpack launch (pack/device_pack.h): the sender's memory stays as it is
 * until this receive acknowledges it, after the batch waited.  A contiguous one of any size
 * too: the copy engine costs a call per message (H200, 1 MiB and 4 MiB: ~5.2 us each, one
 * after another, against 0.67 and 2.4 us each for 15 in one launch of the batched kernel,
 * tests/gpu/strided_passes.cu).  1 when queued. */
static int deferred_from_peer(staged_transfer *t, const char *peer, int64_t fits)
{
    if (!t->ct.size || fits % t->ct.size ||
        (t->dense && fits >= (1 << 20) && test_hook("COMMLIB_TEST_DENSE_COPY_ENGINE", &dense_hook)))
        return 0;
    return device_unpack_deferred(t->dc, &t->ct, t->user, fits / t->ct.size, peer) && device_settle(t->dc);
}

/* A GPU-to-GPU message (transfer/ipc.h): `message` packed bytes at `peer`, the sender's
 * memory mapped here.  The status counts the bytes written; more than the receive holds is
 * MPI_ERR_TRUNCATE, with the part that fits written, as the host MPI does. */
static int receive_from_peer(staged_transfer *t, const char *peer, int64_t message, const MPI_Status *status)
{
    int64_t capacity = receive_capacity(t);
    int truncated = message > capacity;
    int64_t fits = truncated ? capacity : message;
    if (status) {
        PMPI_Status_set_elements_x((MPI_Status *)status, MPI_BYTE, fits);
        if (truncated) ((MPI_Status *)status)->MPI_ERROR = MPI_ERR_TRUNCATE;
    }
    int ok = 1;
    /* the sender's piece as it lies in its buffer: straight into the program's buffer in one
       pass where the kernel takes both (whole elements, nothing truncated) */
    if (t->ipc_strided && !truncated && t->ct.size && fits % t->ct.size == 0 &&
        !test_hook("COMMLIB_TEST_TWO_PASS", &two_pass_hook) &&
        device_copy_piece(t->dc, &t->ipc_piece, peer, &t->ct, t->user, fits / t->ct.size)) {
        stat_add(STAT_P2P_IPC_ONE_PASS, 1);
        if (!device_settle(t->dc)) {
            commlib_log(LOG_ERROR, "copying a GPU-to-GPU message into the program's buffer failed");
            return MPI_ERR_OTHER;
        }
        return MPI_SUCCESS;
    }
    if (t->ipc_strided) { /* else packed here first */
        if (t->peer_scratch) /* a persistent receive's earlier message, long complete */
            staging_put(t->peer_scratch_kind, t->peer_scratch, t->peer_scratch_capacity, t->dc);
        t->peer_scratch = staging_get(t->dc, STAGING_DEVICE, (size_t)message, &t->peer_scratch_capacity,
                                      &t->peer_scratch_kind);
        /* the unpack below ends with the device_settle that notes (or waits for) both */
        ok = t->peer_scratch && device_pack_piece(t->dc, &t->ipc_piece, peer, t->peer_scratch);
        peer = t->peer_scratch;
    }
    /* an unpack launched now comes after a pack the batch still holds: launch that first */
    ok = ok && (deferred_from_peer(t, peer, fits) ||
                (device_deferred_flush() &&
                 (t->dense ? device_copy_to_device(t->dc, at(t->user, t->dense_offset), peer, (size_t)fits)
                           : unpack_from(t, peer, (int)fits))));
    if (!ok) commlib_log(LOG_ERROR, "copying a GPU-to-GPU message into the program's buffer failed");
    if (truncated) commlib_log(LOG_INFO, "GPU-to-GPU message of %lld bytes truncated to %lld", (long long)message, (long long)fits);
    return !ok ? MPI_ERR_OTHER : truncated ? MPI_ERR_TRUNCATE : MPI_SUCCESS;
}

/* A pipelined message (transfer/pipeline.h): its chunks received into pinned staging and
 * copied onto the device as they arrive, then unpacked; the status as receive_from_peer's. */
static int receive_pipelined(staged_transfer *t, const struct pipeline_message *m, const MPI_Status *status)
{
    int64_t capacity = receive_capacity(t);
    int truncated = m->bytes > capacity;
    int64_t fits = truncated ? capacity : m->bytes;
    size_t pinned_capacity = 0, device_capacity = 0;
    int pinned_kind = -1, device_kind = -1;
    /* the chunks land in the receive's own staging (the descriptor is read) unless they
     * are more than it holds */
    int own = t->capacity >= (size_t)m->bytes && t->staging_kind == STAGING_PINNED;
    char *pinned = own ? t->staging : staging_get(t->dc, STAGING_PINNED, (size_t)m->bytes, &pinned_capacity, &pinned_kind);
    char *device = t->dense ? at(t->user, t->dense_offset)
                            : staging_get(t->dc, STAGING_DEVICE, (size_t)fits, &device_capacity, &device_kind);
    /* without pinned staging the chunks cannot be drained and the sender never completes */
    int ok = pinned && pipeline_receive_chunks(t->dc, m, pinned, device, fits, own);
    if (ok && !t->dense) ok = unpack_from(t, device ? device : pinned, (int)fits) && (device || device_sync(t->dc));
    if (device && !t->dense) staging_put(device_kind, device, device_capacity, t->dc);
    if (pinned && !own) staging_put(pinned_kind, pinned, pinned_capacity, t->dc);
    if (status) {
        PMPI_Status_set_elements_x((MPI_Status *)status, MPI_BYTE, fits);
        if (truncated) ((MPI_Status *)status)->MPI_ERROR = MPI_ERR_TRUNCATE;
    }
    if (!ok) commlib_log(LOG_ERROR, "copying a pipelined message into the program's buffer failed");
    if (truncated) commlib_log(LOG_INFO, "pipelined message of %lld bytes truncated to %lld", (long long)m->bytes, (long long)fits);
    return !ok ? MPI_ERR_OTHER : truncated ? MPI_ERR_TRUNCATE : MPI_SUCCESS;
}

int staged_recv_finish(staged_transfer *t, const MPI_Status *status, int err)
{
    int ok;
    if (t->partitions) {
        ok = partitions_finish(t, partitions_received(t, status, err));
    } else if (!writes_back(status, err)) {
        return MPI_SUCCESS;
    } else if (t->typed) {
        /* a collective fills every element (its status counts nothing); a receive, what
         * the status counts (the copy is freed by staged_release, a persistent one reused) */
        MPI_Count received = -1;
        if (!t->collective &&
            (PMPI_Get_elements_x(status, MPI_BYTE, &received) != MPI_SUCCESS || received == MPI_UNDEFINED))
            received = 0;
        ok = span_stage_write_back(&t->span, received);
    } else {
        int received = 0; /* MPI_PACKED on the wire: the status counts bytes */
        if (PMPI_Get_count(status, MPI_BYTE, &received) != MPI_SUCCESS || received < 0) received = 0;
        /* more than was posted: Open MPI counts a truncated message whole, and its
         * MPI_Request_get_status does not report the truncation (its MPI_Wait does) */
        int overrun = received > t->wire_count;
        if (overrun) received = t->wire_count;
        /* the progress thread finishes receives too, and has no context of its own */
        if (t->dc) device_make_current(t->dc->context);
        /* a device receive staged in host memory may have got a descriptor instead of bytes */
        int descriptor_possible = t->dc && t->staging_kind != STAGING_DEVICE;
        struct pipeline_message pipelined;
        if (descriptor_possible && pipeline_message_of(t->staging, received, &pipelined))
            return receive_pipelined(t, &pipelined, status);
        int64_t message = 0;
        int failed = 0;
        const char *peer = descriptor_possible ? ipc_message(t, t->staging, received, &message, &failed) : NULL;
        if (peer) return receive_from_peer(t, peer, message, status);
        if (descriptor_possible && !failed && received == t->wire_count &&
            ipc_truncated_descriptor(t, t->staging, received)) {
            if (status) { /* nothing written: the bytes that came are the descriptor's */
                PMPI_Status_set_elements_x((MPI_Status *)status, MPI_BYTE, 0);
                ((MPI_Status *)status)->MPI_ERROR = MPI_ERR_TRUNCATE;
            }
            return MPI_ERR_TRUNCATE;
        }
        /* posted larger than the program's buffer: the host MPI's truncation, done here; and
         * one the host MPI did not report (yet) */
        int cut = t->posted_larger && received > t->program_bytes;
        int truncated = !failed && (cut || (overrun && err == MPI_SUCCESS));
        if (truncated) {
            if (cut) received = (int)t->program_bytes;
            if (status) {
                PMPI_Status_set_elements_x((MPI_Status *)status, MPI_BYTE, received);
                ((MPI_Status *)status)->MPI_ERROR = MPI_ERR_TRUNCATE;
            }
        }
        ok = !failed && (t->method == METHOD_DEVICE ? unpack_through_device(t, received)
                                                    : unpack_from(t, t->staging, received));
        if (ok && truncated) return MPI_ERR_TRUNCATE;
    }
    if (!ok) commlib_log(LOG_ERROR, "copying a staged receive into the program's buffer failed");
    return ok ? MPI_SUCCESS : MPI_ERR_OTHER;
}

void staged_release(staged_transfer *t)
{
    if (!t) return;
    staged_release(t->linked);
    if (t->typed) span_stage_end(&t->span, 0);
    if (t->staging) staging_put(t->staging_kind, t->staging, t->capacity, t->dc);
    if (t->peer_scratch) staging_put(t->peer_scratch_kind, t->peer_scratch, t->peer_scratch_capacity, t->dc);
    pipeline_send_release(t);
    free(t->partition_state);
    free(t);
}

int staged_wire_bytes(staged_transfer **out, const void *bytes, int n)
{
    staged_transfer *t = transfer_new(NULL);
    if (!t) return STAGED_FAILED;
    t->method = -1;
    if (!(t->staging = staging_get(NULL, STAGING_HOST, (size_t)n, &t->capacity, &t->staging_kind))) {
        free(t);
        return STAGED_FAILED;
    }
    memcpy(t->staging, bytes, (size_t)n);
    t->wire_buf = t->staging;
    t->wire_count = n;
    t->wire_type = MPI_BYTE;
    *out = t;
    return STAGED_YES;
}

int staged_companions_test(staged_transfer *t)
{
    if (!t->companion_pending) return 1;
    int flag = 0;
    if (t->pipelined) flag = pipeline_send_done(t, 0);
    else if (PMPI_Test(&t->companion, &flag, MPI_STATUS_IGNORE) != MPI_SUCCESS) flag = 0;
    if (flag) t->companion_pending = 0;
    return flag;
}

int staged_companions_wait(staged_transfer *t)
{
    if (!t->companion_pending) return MPI_SUCCESS;
    int rc = MPI_SUCCESS;
    if (t->pipelined) rc = pipeline_send_done(t, 1) && !t->pipe_failed ? MPI_SUCCESS : MPI_ERR_OTHER;
    else rc = PMPI_Wait(&t->companion, MPI_STATUS_IGNORE);
    t->companion_pending = 0;
    return rc;
}

int staged_complete(staged_transfer *t, const MPI_Status *status, int err)
{
    int rc = t->receiving && status ? staged_recv_finish(t, status, err) : MPI_SUCCESS;
    ipc_acknowledge(t); /* the unpack from a peer's memory is complete */
    staged_release(t);
    return rc;
}
