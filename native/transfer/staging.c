#include "staging.h"

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>

#include "../util/stats.h"

/* Staging buffers: several nonblocking operations are in flight at once, so each takes
 * its own buffer.  Freed buffers are kept (up to POOL_KEEP per kind, the largest ones, at
 * most 1 GiB in all) because pinned and device allocation cost milliseconds and freeing
 * pinned memory waits for the device.  POOL_KEEP covers what programs keep in flight: a
 * 26-neighbour halo exchange holds 52 buffers, a bandwidth window of 64 messages 64 per
 * side (with 8 kept, a window of 64 x 1 MiB ran at 1.4 GB/s on an H200, a window of 4 at 68). */
#define POOL_KEEP 256
#define POOL_KEEP_BYTES ((size_t)1 << 30) /* per kind: pinned memory is every process's to share */
static struct pool {
    pthread_mutex_t lock;
    int n;
    size_t bytes; /* the sizes of kept[0..n) summed */
    struct kept { void *p; size_t size; CUcontext context; } kept[POOL_KEEP];
} pools[STAGING_KINDS] = {{.lock = PTHREAD_MUTEX_INITIALIZER}, {.lock = PTHREAD_MUTEX_INITIALIZER},
                          {.lock = PTHREAD_MUTEX_INITIALIZER}};

static void pool_free(int kind, void *p, CUcontext context)
{
    const struct cuda_driver *cu = cuda_driver();
    if (kind == STAGING_HOST) {
        free(p);
    } else if (kind == STAGING_PINNED) {
        device_context_current(); /* cuMemFreeHost wants some context current on this thread */
        cuda_check(cu->cuMemFreeHost(p), "cuMemFreeHost (staging)");
    } else {
        CUcontext current = NULL;
        cu->cuCtxGetCurrent(&current);
        cu->cuCtxSetCurrent(context);
        cuda_check(cu->cuMemFree((CUdeviceptr)(uintptr_t)p), "cuMemFree (staging)");
        cu->cuCtxSetCurrent(current);
    }
}

/* A buffer of `kind` (dc's context current for pinned and device memory).  Pinned memory
 * that cannot be had becomes malloc memory (slower, still right); device memory that
 * cannot be had is NULL: the caller takes another way. */
void *staging_get(struct device_context *dc, int kind, size_t need, size_t *size, int *got_kind)
{
    struct pool *pool = &pools[*got_kind = kind];
    CUcontext context = kind == STAGING_DEVICE ? dc->context : NULL;
    size_t exact = 4096; /* the size a fresh one gets (below), as every kept one got: none fits better */
    while (exact < need && exact <= SIZE_MAX / 2) exact *= 2;
    pthread_mutex_lock(&pool->lock);
    int best = -1;
    for (int i = pool->n - 1; i >= 0; i--) /* the last kept first: most calls stop at their first look */
        if (pool->kept[i].size >= need && pool->kept[i].context == context &&
            (best < 0 || pool->kept[i].size < pool->kept[best].size)) {
            best = i;
            if (pool->kept[i].size == exact) break;
        }
    if (best >= 0) {
        void *p = pool->kept[best].p;
        *size = pool->kept[best].size;
        pool->bytes -= *size;
        pool->kept[best] = pool->kept[--pool->n];
        pthread_mutex_unlock(&pool->lock);
        return p;
    }
    pthread_mutex_unlock(&pool->lock);
    for (*size = 4096; *size < need; *size *= 2) {}
    if (kind != STAGING_HOST) stat_add(STAT_STAGING_ALLOCS, 1);
    const struct cuda_driver *cu = cuda_driver();
    void *p = NULL;
    if (kind == STAGING_DEVICE) {
        CUdeviceptr d = 0;
        return cuda_check(cu->cuMemAlloc(&d, *size), "cuMemAlloc (staging)") ? (void *)(uintptr_t)d : NULL;
    }
    if (kind == STAGING_PINNED &&
        cuda_check(cu->cuMemHostAlloc(&p, *size, CU_MEMHOSTALLOC_PORTABLE | CU_MEMHOSTALLOC_DEVICEMAP),
                   "cuMemHostAlloc (staging)"))
        return p;
    *got_kind = STAGING_HOST;
    return malloc(*size);
}

void staging_put(int kind, void *p, size_t size, struct device_context *dc)
{
    struct pool *pool = &pools[kind];
    CUcontext context = kind == STAGING_DEVICE ? dc->context : NULL;
    struct kept out[POOL_KEEP + 1];
    int nout = 0;
    pthread_mutex_lock(&pool->lock);
    if (size > POOL_KEEP_BYTES) {
        out[nout++] = (struct kept){p, size, context}; /* too big to sit idle */
    } else if (pool->n < POOL_KEEP) {
        pool->kept[pool->n++] = (struct kept){p, size, context};
        pool->bytes += size;
    } else { /* full: keep the larger buffers, they serve every size */
        int smallest = 0;
        for (int i = 1; i < POOL_KEEP; i++)
            if (pool->kept[i].size < pool->kept[smallest].size) smallest = i;
        if (pool->kept[smallest].size < size) {
            out[nout++] = pool->kept[smallest];
            pool->bytes += size - pool->kept[smallest].size;
            pool->kept[smallest] = (struct kept){p, size, context};
        } else {
            out[nout++] = (struct kept){p, size, context};
        }
    }
    /* and no more than POOL_KEEP_BYTES kept in all: the smallest go first */
    while (pool->bytes > POOL_KEEP_BYTES) {
        int smallest = 0;
        for (int i = 1; i < pool->n; i++)
            if (pool->kept[i].size < pool->kept[smallest].size) smallest = i;
        pool->bytes -= pool->kept[smallest].size;
        out[nout++] = pool->kept[smallest];
        pool->kept[smallest] = pool->kept[--pool->n];
    }
    pthread_mutex_unlock(&pool->lock);
    for (int i = 0; i < nout; i++) pool_free(kind, out[i].p, out[i].context);
}
