#define _GNU_SOURCE /* pthread_getattr_np */
#include "device.h"

#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "../util/config.h"
#include "../util/log.h"
#include "../util/stats.h"
#include "pointer_cache.h"

const char *const buffer_kind_name[4] = {"host", "pinned", "device", "managed"};

#define MAX_CONTEXTS 16

static struct device_context contexts[MAX_CONTEXTS];
static pthread_mutex_t locks[MAX_CONTEXTS];
static int ncontexts;
static pthread_mutex_t contexts_lock = PTHREAD_MUTEX_INITIALIZER;

/* The brk heap (malloc's main arena) and the calling thread's stack are host memory: the
 * driver maps device, managed and its own pinned memory with mmap, never there.  A pointer
 * query is a driver call with a lock (0.1-0.15 us on the H200 host); an MPI_Pack makes
 * two, an MPI_Send one, which a small host message in a process with CUDA paid on every
 * call.  A block the program pinned with cuMemHostRegister is taken for pageable memory:
 * still right everywhere, only without the shortcut of a kernel writing into mapped
 * pinned memory. */
uintptr_t buffer_heap_start; /* 0 until found, then the heap's lowest address (it grows up) */
static pthread_once_t heap_once = PTHREAD_ONCE_INIT;

/* The program break, read from the C library's own copy: never through sbrk(0).  UCX
 * (MPICH's and Open MPI's transport) patches sbrk to track memory, and its sbrk(0) sets
 * the break again from its own idea of it - called from one thread while malloc grew the
 * heap in another, it gave the heap back under malloc (halo3d crashed on the H200 and on
 * the stand-in driver, 2 runs in 80, with the progress thread).  0 when the C library has
 * no __curbrk (not glibc): no shortcut then. */
static uintptr_t program_break(void) { return &__curbrk ? (uintptr_t)__atomic_load_n(&__curbrk, __ATOMIC_RELAXED) : 0; }

static void find_heap(void)
{
    uintptr_t start = program_break(); /* no heap yet: it will start at the break */
    if (!start) return;
    FILE *maps = fopen("/proc/self/maps", "r");
    char line[512];
    while (maps && fgets(line, sizeof line, maps)) {
        unsigned long lo, hi;
        if (strstr(line, "[heap]") && sscanf(line, "%lx-%lx", &lo, &hi) == 2 && lo < start) start = lo;
    }
    if (maps) fclose(maps);
    __atomic_store_n(&buffer_heap_start, start == (uintptr_t)-1 ? 0 : start, __ATOMIC_RELEASE);
}

static int in_heap(const void *p)
{
    pthread_once(&heap_once, find_heap);
    uintptr_t a = (uintptr_t)p, brk_now = program_break();
    uintptr_t start = __atomic_load_n(&buffer_heap_start, __ATOMIC_ACQUIRE);
    return start && a >= start && a < brk_now;
}

/* The live part of the calling thread's stack - from this frame up to the stack's top
 * (stacks grow down where commlib runs) - is host memory too: a reduction of one local
 * double, a send of an int.  The bounds are asked once per thread; a frame outside them
 * (a coroutine's or a signal's own stack) takes the query, as between the two stacks
 * there may be anything. */
static __thread uintptr_t stack_low, stack_top; /* both 0: not asked yet, or unknown */
static __thread int stack_asked;

static int on_my_stack(const void *p)
{
    uintptr_t a = (uintptr_t)p, frame = (uintptr_t)__builtin_frame_address(0);
    if (a < frame) return 0;
    if (!stack_asked) {
        pthread_attr_t attr;
        void *low;
        size_t size;
        stack_asked = 1;
        if (pthread_getattr_np(pthread_self(), &attr) == 0) {
            if (pthread_attr_getstack(&attr, &low, &size) == 0) {
                stack_low = (uintptr_t)low;
                stack_top = (uintptr_t)low + size;
            }
            pthread_attr_destroy(&attr);
        }
    }
    return frame >= stack_low && a < stack_top;
}

/* The pointer this thread's last classification asked the driver about, and the context the
 * same query found for it: device_context_of() of that pointer right after (every caller
 * classifies a buffer first) needs no query of its own - one per device buffer and call
 * instead of two (a halo exchange of 26 neighbours GPU to GPU: direct mode 104 -> 52 a
 * rank, pack mode 260 -> 156; tests/test_halo.py counts them).  Every classification of a
 * pointer outside the brk heap replaces or clears it, so it never outlives a free of the
 * buffer between two calls; device_context_of() does not take it for a pointer in the
 * heap, whose classification (buffer_kind_of's shortcut) does not touch it. */
static __thread const void *classified;
static __thread CUcontext classified_context;

enum buffer_kind buffer_kind_of_slow(const void *p)
{
    classified = NULL;
    if (!commlib_config.gpu) return BUFFER_HOST;
    const struct cuda_driver *cu = cuda_driver();
    if (!cu || !p || in_heap(p) || on_my_stack(p)) return BUFFER_HOST;
    unsigned memory_type = 0;
    int managed = 0;
    CUcontext context = NULL;
    CUdeviceptr start = 0;
    size_t size = 0;
    /* device allocations kept while CUPTI watches (pointer_cache.h): the range comes with the answer */
    int keep = pointer_cache_on();
    if (keep && pointer_cache_find(p, &context)) {
        classified = p;
        classified_context = context;
        return BUFFER_DEVICE;
    }
    uint64_t generation = keep ? pointer_cache_generation() : 0;
    int attributes[5] = {CU_POINTER_ATTRIBUTE_MEMORY_TYPE, CU_POINTER_ATTRIBUTE_IS_MANAGED, CU_POINTER_ATTRIBUTE_CONTEXT,
                         CU_POINTER_ATTRIBUTE_RANGE_START_ADDR, CU_POINTER_ATTRIBUTE_RANGE_SIZE};
    void *values[5] = {&memory_type, &managed, &context, &start, &size};
    /* Unlike cuPointerGetAttribute, this succeeds with zeroes for plain host memory. */
    if (cu->cuPointerGetAttributes(keep ? 5 : 3, attributes, values, (CUdeviceptr)(uintptr_t)p) != CUDA_SUCCESS)
        return BUFFER_HOST;
    classified = p;
    classified_context = context;
    if (managed) return BUFFER_MANAGED;
    if (memory_type == CU_MEMORYTYPE_DEVICE && keep && start <= (CUdeviceptr)(uintptr_t)p &&
        (CUdeviceptr)(uintptr_t)p - start < size)
        pointer_cache_add(generation, start, size, context);
    if (memory_type == CU_MEMORYTYPE_DEVICE) return BUFFER_DEVICE;
    if (memory_type == CU_MEMORYTYPE_HOST) return BUFFER_PINNED;
    return BUFFER_HOST;
}

int buffer_device_mapped(const void *p)
{
    const struct cuda_driver *cu = cuda_driver();
    CUdeviceptr device_pointer = 0;
    int attribute = CU_POINTER_ATTRIBUTE_DEVICE_POINTER;
    void *value = &device_pointer;
    return cu && p && cu->cuPointerGetAttributes(1, &attribute, &value, (CUdeviceptr)(uintptr_t)p) == CUDA_SUCCESS &&
           device_pointer == (CUdeviceptr)(uintptr_t)p;
}

/* The context this thread found last: contexts[] only grows, so it stays right (a device
 * exchange finds one context ~100 times, each under the lock before). */
static __thread CUcontext last_context;
static __thread struct device_context *last_found;

int device_make_current(CUcontext c)
{
    if (pointer_cache_current_is(c)) return 1;
    if (cuda_driver()->cuCtxSetCurrent(c) != CUDA_SUCCESS) return 0;
    pointer_cache_note_current(c);
    return 1;
}

static struct device_context *context_for(const struct cuda_driver *cu, CUcontext ctx)
{
    if (!ctx) return NULL;
    if (ctx == last_context) {
        device_make_current(ctx);
        return last_found;
    }
    pthread_mutex_lock(&contexts_lock);
    struct device_context *dc = NULL;
    for (int i = 0; i < ncontexts; i++)
        if (contexts[i].context == ctx) dc = &contexts[i];
    if (!dc && ncontexts < MAX_CONTEXTS) {
        struct device_context fresh = {.context = ctx};
        CUdevice device;
        if (cuda_check(cu->cuCtxSetCurrent(ctx), "cuCtxSetCurrent") &&
            cuda_check(cu->cuCtxGetDevice(&device), "cuCtxGetDevice") &&
            cuda_check(cu->cuStreamCreate(&fresh.stream, CU_STREAM_DEFAULT), "cuStreamCreate")) {
            fresh.device = device;
            cu->cuDeviceGetAttribute(&fresh.sm_count, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, device);
            cu->cuDeviceGetAttribute(&fresh.threads_per_sm, CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR, device);
            pthread_mutex_init(&locks[ncontexts], NULL);
            contexts[ncontexts] = fresh;
            dc = &contexts[ncontexts++];
        }
    }
    pthread_mutex_unlock(&contexts_lock);
    if (dc) {
        device_make_current(ctx);
        last_context = ctx;
        last_found = dc;
    }
    return dc;
}

struct device_context *device_context_of(const void *p)
{
    const struct cuda_driver *cu = cuda_driver();
    if (!cu || !p) return NULL;
    CUcontext ctx = NULL;
    static int ask = -1; /* COMMLIB_TEST_CONTEXT_QUERY=1: always asked, as before stop 29 */
    if (p == classified && !test_hook("COMMLIB_TEST_CONTEXT_QUERY", &ask) && !in_heap(p)) { /* just classified (above) */
        ctx = classified_context;
        classified = NULL;
    } else if (!pointer_cache_on() || in_heap(p) || !pointer_cache_find(p, &ctx)) {
        int attribute = CU_POINTER_ATTRIBUTE_CONTEXT;
        void *value = &ctx;
        if (cu->cuPointerGetAttributes(1, &attribute, &value, (CUdeviceptr)(uintptr_t)p) != CUDA_SUCCESS) ctx = NULL;
    }
    if (!ctx) return device_context_current();
    return context_for(cu, ctx);
}

struct device_context *device_context_current(void)
{
    const struct cuda_driver *cu = cuda_driver();
    if (!cu) return NULL;
    CUcontext ctx = NULL;
    cu->cuCtxGetCurrent(&ctx);
    if (ctx) return context_for(cu, ctx);
    pthread_mutex_lock(&contexts_lock);
    struct device_context *first = ncontexts ? &contexts[0] : NULL;
    pthread_mutex_unlock(&contexts_lock);
    if (first) cu->cuCtxSetCurrent(first->context);
    return first;
}

void device_lock(struct device_context *dc) { pthread_mutex_lock(&locks[dc - contexts]); }
void device_unlock(struct device_context *dc) { pthread_mutex_unlock(&locks[dc - contexts]); }

static size_t grown(size_t have, size_t need)
{
    size_t size = have ? have : 1 << 20;
    while (size < need) size *= 2;
    return size;
}

CUdeviceptr device_scratch(struct device_context *dc, size_t bytes)
{
    const struct cuda_driver *cu = cuda_driver();
    if (bytes <= dc->scratch_bytes) return dc->scratch;
    size_t size = grown(dc->scratch_bytes, bytes);
    if (dc->scratch) {
        cu->cuStreamSynchronize(dc->stream); /* in-flight work may still use the old one */
        cu->cuMemFree(dc->scratch);
    }
    dc->scratch = 0;
    dc->scratch_bytes = 0;
    if (!cuda_check(cu->cuMemAlloc(&dc->scratch, size), "cuMemAlloc (staging)")) return 0;
    dc->scratch_bytes = size;
    return dc->scratch;
}

void *device_pinned(struct device_context *dc, size_t bytes)
{
    const struct cuda_driver *cu = cuda_driver();
    if (bytes <= dc->pinned_bytes) return dc->pinned;
    size_t size = grown(dc->pinned_bytes, bytes);
    if (dc->pinned) {
        cu->cuStreamSynchronize(dc->stream);
        cu->cuMemFreeHost(dc->pinned);
    }
    dc->pinned = NULL;
    dc->pinned_bytes = 0;
    if (!cuda_check(cu->cuMemHostAlloc(&dc->pinned, size, CU_MEMHOSTALLOC_PORTABLE | CU_MEMHOSTALLOC_DEVICEMAP),
                    "cuMemHostAlloc (staging)"))
        return NULL;
    dc->pinned_bytes = size;
    return dc->pinned;
}

int device_copy(struct device_context *dc, void *dst, const void *src, size_t bytes)
{
    const struct cuda_driver *cu = cuda_driver();
    if (!bytes) return 1;
    return cuda_check(cu->cuMemcpyAsync((CUdeviceptr)(uintptr_t)dst, (CUdeviceptr)(uintptr_t)src, bytes, dc->stream),
                      "cuMemcpyAsync") &&
           device_sync(dc);
}

int device_copy_async(struct device_context *dc, void *dst, const void *src, size_t bytes)
{
    return !bytes || cuda_check(cuda_driver()->cuMemcpyAsync((CUdeviceptr)(uintptr_t)dst, (CUdeviceptr)(uintptr_t)src,
                                                             bytes, dc->stream),
                                "cuMemcpyAsync");
}

static void store_max(unsigned long long *at, unsigned long long value)
{
    unsigned long long seen = __atomic_load_n(at, __ATOMIC_RELAXED);
    while (seen < value && !__atomic_compare_exchange_n(at, &seen, value, 0, __ATOMIC_RELEASE, __ATOMIC_RELAXED)) {
    }
}

int device_sync(struct device_context *dc)
{
    /* what was queued before the wait began is done after it */
    unsigned long long ops = __atomic_load_n(&dc->async_ops, __ATOMIC_ACQUIRE);
    unsigned long long waits = __atomic_load_n(&dc->peer_waits, __ATOMIC_ACQUIRE);
    if (!cuda_check(cuda_driver()->cuStreamSynchronize(dc->stream), "cuStreamSynchronize")) return 0;
    store_max(&dc->async_synced, ops);
    store_max(&dc->peer_waits_synced, waits);
    return 1;
}

/* device_lock held: an event behind the ops left queued since the last one, if any - for
 * the bursts' stream (device_async_order), the only stream of commlib's that reads their
 * results elsewhere.  Recorded when something is about to need it, not per op: before a
 * wait for another process is queued (no op is left queued after such a wait until a
 * synchronisation: device_async_try), or when the bursts' stream is to wait. */
static void record_left_queued(struct device_context *dc)
{
    if (!dc->async_unrecorded || !commlib_config.ipc) return;
    const struct cuda_driver *cu = cuda_driver();
    dc->async_unrecorded = 0;
    if ((dc->async_event ||
         cuda_check(cu->cuEventCreate(&dc->async_event, CU_EVENT_DISABLE_TIMING), "cuEventCreate")) &&
        cuda_check(cu->cuEventRecord(dc->async_event, dc->stream), "cuEventRecord"))
        __atomic_store_n(&dc->async_recorded, dc->async_recorded + 1, __ATOMIC_RELEASE);
    else
        device_sync(dc); /* nothing of another process's is queued yet: this ends */
}

void device_before_peer_wait(struct device_context *dc)
{
    record_left_queued(dc);
    __atomic_add_fetch(&dc->peer_waits, 1, __ATOMIC_RELEASE);
}

int device_async_try(struct device_context *dc)
{
    return commlib_config.device_pack_async && !device_batch_open() &&
           __atomic_load_n(&dc->peer_waits, __ATOMIC_ACQUIRE) == __atomic_load_n(&dc->peer_waits_synced, __ATOMIC_ACQUIRE);
}

void device_async_leave(struct device_context *dc)
{
    dc->async_unrecorded = 1;
    __atomic_add_fetch(&dc->async_ops, 1, __ATOMIC_RELEASE);
    stat_add(STAT_DEVICE_ASYNC, 1);
}

int device_async_order(struct device_context *dc, CUstream other, unsigned long long *seen)
{
    if (__atomic_load_n(&dc->async_ops, __ATOMIC_ACQUIRE) == __atomic_load_n(&dc->async_synced, __ATOMIC_ACQUIRE))
        return 1; /* nothing left queued, or all of it waited for since */
    device_lock(dc);
    record_left_queued(dc);
    unsigned long long recorded = dc->async_recorded;
    int ok = recorded == *seen ||
             cuda_check(cuda_driver()->cuStreamWaitEvent(other, dc->async_event, 0), "cuStreamWaitEvent");
    if (ok) *seen = recorded;
    device_unlock(dc);
    return ok;
}

int device_legacy_settle(void)
{
    const struct cuda_driver *cu = cuda_driver();
    CUresult rc = cu->cuStreamQuery(CU_STREAM_LEGACY);
    if (rc == CUDA_SUCCESS) return 0;
    if (rc != CUDA_ERROR_NOT_READY) return cuda_check(rc, "cuStreamQuery (legacy stream)") ? 0 : -1;
    return cuda_check(cu->cuStreamSynchronize(CU_STREAM_LEGACY), "cuStreamSynchronize (legacy stream)") ? 1 : -1;
}

int device_async_drain(struct device_context *dc)
{
    return __atomic_load_n(&dc->async_ops, __ATOMIC_ACQUIRE) == __atomic_load_n(&dc->async_synced, __ATOMIC_ACQUIRE) ||
           device_sync(dc);
}

static __thread struct device_batch *open_batch;
static int (*batch_flush)(void);

int device_batch_open(void) { return open_batch != NULL; }
unsigned long long device_batch_id(void) { return open_batch ? open_batch->id : 0; }

void device_batch_set_flush(int (*flush)(void)) { __atomic_store_n(&batch_flush, flush, __ATOMIC_RELEASE); }

static __thread int flush_failed; /* a flush outside device_batch_end failed: that end reports it */

static int flush_deferred(void)
{
    int (*flush)(void) = __atomic_load_n(&batch_flush, __ATOMIC_ACQUIRE);
    if (!flush || flush()) return 1;
    commlib_log(LOG_ERROR, "launching deferred device packs and unpacks failed");
    return 0;
}

static unsigned long long batches; /* batch ids handed out (device_batch_id) */

void device_batch_begin(struct device_batch *b)
{
    b->outer = open_batch;
    b->id = __atomic_add_fetch(&batches, 1, __ATOMIC_RELAXED);
    b->n = 0;
    b->settled = 0;
    open_batch = b;
}

int device_batch_end(struct device_batch *b)
{
    int ok = flush_deferred() && !flush_failed;
    flush_failed = 0;
    open_batch = b->outer;
    for (int i = 0; i < b->n; i++) {
        if (!device_make_current(b->contexts[i]->context)) ok = 0;
        ok = device_sync(b->contexts[i]) && ok;
    }
    if (b->settled) stat_add(STAT_DEVICE_SETTLED, b->settled);
    b->n = 0;
    return ok;
}

void device_batch_round(struct device_batch *b, int launch)
{
    if (launch && !flush_deferred()) flush_failed = 1;
    b->id = __atomic_add_fetch(&batches, 1, __ATOMIC_RELAXED);
}

void device_batch_abandon(struct device_batch *b)
{
    if (!flush_deferred()) flush_failed = 1;
    open_batch = b->outer;
    b->n = 0;
}

struct device_batch *device_batch_suspend(void)
{
    struct device_batch *b = open_batch;
    if (b && !flush_deferred()) flush_failed = 1;
    open_batch = NULL;
    return b;
}

void device_batch_resume(struct device_batch *b) { open_batch = b; }

int device_settle(struct device_context *dc)
{
    struct device_batch *b = open_batch;
    if (!b) return device_sync(dc);
    int i = 0;
    while (i < b->n && b->contexts[i] != dc) i++;
    if (i == b->n) {
        if (b->n == (int)(sizeof b->contexts / sizeof *b->contexts)) return flush_deferred() && device_sync(dc);
        b->contexts[b->n++] = dc;
    }
    b->settled++;
    return 1;
}

int device_copy_to_device(struct device_context *dc, void *dst, const void *src, size_t bytes)
{
    return device_copy_async(dc, dst, src, bytes) && (!bytes || device_settle(dc));
}
