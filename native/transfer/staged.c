#include "staged.h"

#include <limits.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "../cuda/device.h"
#include "../datatype/cache.h"
#include "../pack/pack_any.h"
#include "../util/config.h"
#include "../util/log.h"
#include "../util/stats.h"
#include "commlib.h"

static void *at(const void *base, int64_t offset) { return (void *)((uintptr_t)base + (uintptr_t)offset); }

/* Staging buffers: several nonblocking operations are in flight at once, so each takes
 * its own buffer.  Freed buffers are kept (a few per kind, the largest ones) because
 * pinned allocation costs milliseconds. */
#define POOL_KEEP 8
static struct pool {
    pthread_mutex_t lock;
    int n;
    struct kept { void *p; size_t size; } kept[POOL_KEEP];
} pools[2] = {{.lock = PTHREAD_MUTEX_INITIALIZER}, {.lock = PTHREAD_MUTEX_INITIALIZER}}; /* [pinned] */

static void pool_free(int pinned, void *p)
{
    if (!pinned) {
        free(p);
        return;
    }
    device_context_current(); /* cuMemFreeHost wants some context current on this thread */
    cuda_check(cuda_driver()->cuMemFreeHost(p), "cuMemFreeHost (staging)");
}

/* dc set: pinned memory (dc's context is current); NULL: malloc. */
static void *pool_get(struct device_context *dc, size_t need, size_t *size, int *pinned)
{
    struct pool *pool = &pools[*pinned = dc != NULL];
    pthread_mutex_lock(&pool->lock);
    int best = -1;
    for (int i = 0; i < pool->n; i++)
        if (pool->kept[i].size >= need && (best < 0 || pool->kept[i].size < pool->kept[best].size)) best = i;
    if (best >= 0) {
        void *p = pool->kept[best].p;
        *size = pool->kept[best].size;
        pool->kept[best] = pool->kept[--pool->n];
        pthread_mutex_unlock(&pool->lock);
        return p;
    }
    pthread_mutex_unlock(&pool->lock);
    for (*size = 4096; *size < need; *size *= 2) {}
    void *p = NULL;
    if (dc && cuda_check(cuda_driver()->cuMemHostAlloc(&p, *size, CU_MEMHOSTALLOC_PORTABLE | CU_MEMHOSTALLOC_DEVICEMAP),
                         "cuMemHostAlloc (staging)"))
        return p;
    *pinned = 0; /* pageable memory still works, only slower */
    return malloc(*size);
}

static void pool_put(int pinned, void *p, size_t size)
{
    struct pool *pool = &pools[pinned];
    pthread_mutex_lock(&pool->lock);
    if (pool->n < POOL_KEEP) {
        pool->kept[pool->n++] = (struct kept){p, size};
        p = NULL;
    } else { /* full: keep the larger buffers, they serve every size */
        int smallest = 0;
        for (int i = 1; i < POOL_KEEP; i++)
            if (pool->kept[i].size < pool->kept[smallest].size) smallest = i;
        if (pool->kept[smallest].size < size) {
            struct kept out = pool->kept[smallest];
            pool->kept[smallest] = (struct kept){p, size};
            p = out.p;
        }
    }
    pthread_mutex_unlock(&pool->lock);
    if (p) pool_free(pinned, p);
}

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

static int packed_prepare(staged_transfer **out, const canonical_type *ct, const void *buf, int count, int64_t bytes,
                          struct device_context *dc, int receiving, int persistent)
{
    staged_transfer *t = transfer_new(receiving || persistent ? ct : NULL);
    if (!t) return STAGED_FAILED;
    t->receiving = receiving;
    t->persistent = persistent;
    t->count = count;
    t->user = (void *)buf;
    if (!(t->staging = pool_get(dc, (size_t)bytes, &t->capacity, &t->pinned))) {
        free(t);
        return STAGED_FAILED;
    }
    int64_t position = 0;
    if (!receiving && !persistent && any_pack_message(ct, buf, count, t->staging, bytes, &position) != COMMLIB_OK) {
        staged_release(t);
        return STAGED_FAILED;
    }
    t->wire_buf = t->staging;
    t->wire_count = (int)bytes;
    t->wire_type = MPI_PACKED;
    *out = t;
    return STAGED_YES;
}

/* A receive copies the span in first as well: bytes between the blocks, and those past a
 * shorter message, must come back unchanged. */
static int typed_prepare(staged_transfer **out, const void *buf, int count, MPI_Datatype type, int receiving,
                         int persistent)
{
    staged_transfer *t = transfer_new(NULL);
    if (!t) return STAGED_FAILED;
    /* persistent: staged_start copies the span at each start */
    int s = span_stage_begin(&t->span, buf, count, type, persistent);
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

static int prepare(staged_transfer **out, const void *buf, int count, MPI_Datatype type, int receiving,
                   int persistent)
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
            rc = packed_prepare(out, ct, buf, count, bytes, dc, receiving, persistent);
        /* an unknown handle on host memory is the host MPI's to judge (and report) */
        if (rc != STAGED_YES && (ct || gpu)) rc = typed_prepare(out, buf, count, type, receiving, persistent);
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
    return prepare(out, buf, count, type, 0, 0);
}

int staged_recv_prepare(staged_transfer **out, void *buf, int count, MPI_Datatype type)
{
    return prepare(out, buf, count, type, 1, 0);
}

int staged_persistent_prepare(staged_transfer **out, const void *buf, int count, MPI_Datatype type, int receiving)
{
    return prepare(out, buf, count, type, receiving, 1);
}

int staged_start(staged_transfer *t)
{
    int ok = 1;
    if (t->typed) {
        ok = span_stage_copy(&t->span, 0);
    } else if (!t->receiving) {
        int64_t position = 0;
        ok = any_pack_message(&t->ct, t->user, t->count, t->staging, t->wire_count, &position) == COMMLIB_OK;
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

/* A message ending inside an element (MPI_Get_count is MPI_UNDEFINED): the host MPI
 * writes the basic elements that arrived.  Same result: pack the element as it is, lay
 * the received bytes over the front of it and unpack the whole element. */
static int unpack_partial(staged_transfer *t, int64_t whole, int64_t rest)
{
    const canonical_type *ct = &t->ct;
    void *element = at(t->user, whole * ct->extent);
    char *scratch = malloc((size_t)ct->size);
    int64_t position = 0, back = 0;
    int ok = scratch && any_pack_message(ct, element, 1, scratch, ct->size, &position) == COMMLIB_OK;
    if (ok) {
        memcpy(scratch, t->staging + whole * ct->size, (size_t)rest);
        ok = any_unpack_message(ct, scratch, ct->size, &back, element, 1) == COMMLIB_OK;
    }
    free(scratch);
    return ok;
}

int staged_recv_finish(staged_transfer *t, const MPI_Status *status, int err)
{
    if (!writes_back(status, err)) return MPI_SUCCESS;
    int ok;
    if (t->typed) {
        ok = span_stage_copy(&t->span, 1); /* the copy is freed by staged_release (a persistent one is reused) */
    } else {
        int received = 0; /* MPI_PACKED on the wire: the status counts bytes */
        if (PMPI_Get_count(status, MPI_BYTE, &received) != MPI_SUCCESS || received < 0) received = 0;
        if (received > t->wire_count) received = t->wire_count;
        int64_t whole = t->ct.size ? received / t->ct.size : 0, rest = received - whole * t->ct.size;
        int64_t position = 0;
        ok = any_unpack_message(&t->ct, t->staging, received, &position, t->user, whole) == COMMLIB_OK &&
             (!rest || unpack_partial(t, whole, rest));
    }
    if (!ok) commlib_log(LOG_ERROR, "copying a staged receive into the program's buffer failed");
    return ok ? MPI_SUCCESS : MPI_ERR_OTHER;
}

void staged_release(staged_transfer *t)
{
    if (!t) return;
    staged_release(t->linked);
    if (t->typed) span_stage_end(&t->span, 0);
    if (t->staging) pool_put(t->pinned, t->staging, t->capacity);
    free(t);
}

int staged_complete(staged_transfer *t, const MPI_Status *status, int err)
{
    int rc = t->receiving && status ? staged_recv_finish(t, status, err) : MPI_SUCCESS;
    staged_release(t);
    return rc;
}
