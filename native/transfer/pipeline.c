#include "pipeline.h"

#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../cuda/device.h"
#include "../datatype/cache.h"
#include "../pack/pack_any.h"
#include "../progress/thread.h"
#include "../util/config.h"
#include "../util/log.h"
#include "../util/stats.h"
#include "commlib.h"
#include "model.h"
#include "staging.h"
#include "world_ranks.h"

#define MAX_CHUNKS 64
#define MIN_CHUNK ((int64_t)256 << 10)
#define CHUNK_TAG(seq) ((int)((seq) % 32000))

/* The message on the wire: two constants no program's bytes are likely to start with. */
static const uint64_t MAGIC0 = 0x636f6d6d6c696250ull, MAGIC1 = 0x50495045c3c3a55aull;
struct pipeline_descriptor {
    uint64_t magic[2];
    int32_t version, sender; /* world rank */
    uint64_t seq;
    int64_t bytes, chunk;
    uint64_t reserved[2];
};
_Static_assert(sizeof(struct pipeline_descriptor) == PIPELINE_DESCRIPTOR_BYTES, "the descriptor's size is part of the protocol");

/* A pipelined send from its prepare until its chunks are sent: the copies off the GPU (an
 * event each, in queue order), the chunks handed to the host MPI as their copies end, and the
 * pinned staging they send from.  Linked into `outgoing` once its descriptor is posted;
 * whoever polls (every commlib call, the progress thread, the send's own completion) posts
 * the chunks whose copies ended.  Freed by the poll once every chunk is sent and the
 * program's request no longer refers to it (`owned`). */
struct pipeline_send {
    struct pipeline_send *next;
    struct device_context *dc;
    int dest; /* world rank */
    uint64_t seq;
    int64_t bytes, chunk;
    int nchunks, posted, failed, owned, linked, deferred;
    char *staging;
    size_t capacity;
    int kind;
    CUevent events[MAX_CHUNKS];
    MPI_Request requests[MAX_CHUNKS];
};
static struct pipeline_send *outgoing;
static pthread_mutex_t outgoing_lock = PTHREAD_MUTEX_INITIALIZER;
int pipeline_outgoing; /* linked sends: requests_progress polls while there are any */
int pipeline_unposted;  /* deferred sends with chunks still to hand over */
static void reap_outgoing(double seconds);

static struct {
    MPI_Comm comm; /* chunks travel here: a duplicate of MPI_COMM_WORLD */
    int world_rank, world_size;
    int64_t test_chunk; /* testing hook: a fixed chunk size */
    uint64_t next_seq;
} pipe = {.comm = MPI_COMM_NULL};
int pipeline_enabled;

void pipeline_init(void)
{
    if (!commlib_config.pipeline) return;
    PMPI_Comm_rank(MPI_COMM_WORLD, &pipe.world_rank);
    PMPI_Comm_size(MPI_COMM_WORLD, &pipe.world_size);
    if (PMPI_Comm_dup(MPI_COMM_WORLD, &pipe.comm) != MPI_SUCCESS) return;
    /* testing hook (not a user knob): chunks of this many KiB, whatever the model says */
    const char *kb = getenv("COMMLIB_TEST_PIPELINE_CHUNK_KB");
    pipe.test_chunk = kb && atoi(kb) > 0 ? (int64_t)atoi(kb) << 10 : 0;
    world_ranks_init();
    __atomic_store_n(&pipeline_enabled, 1, __ATOMIC_RELAXED);
    commlib_log(LOG_INFO, "pipelined staging on");
}

void pipeline_finalize(void)
{
    if (!pipeline_enabled) return;
    /* every receive completed before MPI_Finalize: its chunks arrive */
    pthread_mutex_lock(&outgoing_lock);
    reap_outgoing(10);
    int left = 0;
    for (struct pipeline_send *p = outgoing, *next; p; p = next, left++) {
        next = p->next;
        for (int k = 0; k < p->posted; k++) /* the MPI may still read the staging: it is not given back */
            if (p->requests[k] != MPI_REQUEST_NULL) PMPI_Request_free(&p->requests[k]);
        free(p);
    }
    outgoing = NULL;
    pthread_mutex_unlock(&outgoing_lock);
    if (left) commlib_log(LOG_WARN, "pipelined staging: %d message(s) never received before MPI_Finalize", left);
    __atomic_store_n(&pipeline_enabled, 0, __ATOMIC_RELAXED);
    PMPI_Comm_free(&pipe.comm);
    world_ranks_finalize();
}

/* Cutting a message of B bytes into chunks of c costs each chunk the method's fixed cost
 * a, and leaves one chunk's time c/b unoverlapped at each end: B/c * a + c/b is least at
 * c = sqrt(B * a * b), with a and b the device method's measured latency and bandwidth. */
int64_t pipeline_chunk_bytes(struct device_context *dc, int contiguous, int64_t bytes)
{
    int64_t chunk = pipe.test_chunk;
    if (!chunk) {
        double latency_us = 0, bytes_per_us = 0;
        transfer_model_line(dc, 0, contiguous, METHOD_DEVICE, &latency_us, &bytes_per_us);
        chunk = (int64_t)sqrt((double)bytes * latency_us * bytes_per_us);
        if (chunk < MIN_CHUNK) chunk = MIN_CHUNK;
        if (chunk < bytes / MAX_CHUNKS) chunk = bytes / MAX_CHUNKS;
        chunk = (chunk + 4095) & ~(int64_t)4095;
    }
    if (chunk * 2 > bytes) return 0; /* one chunk: nothing overlaps */
    if ((bytes + chunk - 1) / chunk > MAX_CHUNKS) chunk = (bytes + MAX_CHUNKS - 1) / MAX_CHUNKS;
    return chunk;
}

/* The copies are done (or the device was waited for) and no chunk is in flight. */
static void send_state_free(struct pipeline_send *p)
{
    if (!p) return;
    for (int k = 0; k < p->nchunks; k++)
        if (p->events[k]) cuda_driver()->cuEventDestroy(p->events[k]);
    if (p->staging) staging_put(p->kind, p->staging, p->capacity, p->dc);
    free(p);
}

int pipeline_send_prepare(staged_transfer **out, const void *buf, int count, MPI_Datatype type, int dest,
                          MPI_Comm comm)
{
    *out = NULL;
    if (!__atomic_load_n(&pipeline_enabled, __ATOMIC_RELAXED) || count <= 0 || dest < 0 || !commlib_config.gpu ||
        !cuda_driver() || transfer_cuda_aware())
        return STAGED_FORWARD;
    int locked;
    const canonical_type *ct = type_cache_acquire(type, &locked);
    int64_t bytes;
    if (!ct || ct->unsupported || __builtin_mul_overflow(ct->size, (int64_t)count, &bytes) ||
        bytes < PIPELINE_MIN_BYTES || bytes > INT32_MAX) {
        type_cache_release(locked);
        return STAGED_FORWARD;
    }
    const char *first = (const char *)buf + ct->true_lb;
    struct device_context *dc = buffer_kind_of(first) == BUFFER_DEVICE ? device_context_of(first) : NULL;
    int contiguous = ct->npieces == 1 && ct->true_extent == ct->size && (count == 1 || ct->extent == ct->size);
    int64_t chunk = dc ? pipeline_chunk_bytes(dc, contiguous, bytes) : 0;
    int world = chunk ? world_rank_of(comm, dest) : -1;
    if (world < 0 || world == pipe.world_rank) {
        type_cache_release(locked);
        return STAGED_FORWARD;
    }
    const struct cuda_driver *cu = cuda_driver();
    struct pipeline_send *p = calloc(1, sizeof *p);
    size_t pinned_capacity = 0, device_capacity = 0;
    int pinned_kind = -1, device_kind = -1;
    char *pinned = p ? staging_get(dc, STAGING_PINNED, (size_t)bytes, &pinned_capacity, &pinned_kind) : NULL;
    char *device = pinned && !contiguous ? staging_get(dc, STAGING_DEVICE, (size_t)bytes, &device_capacity, &device_kind)
                                         : NULL;
    int ok = pinned && (contiguous || device);
    if (ok && !contiguous) { /* one pack kernel into device staging, left queued: the copies follow it */
        struct device_batch batch;
        device_batch_begin(&batch);
        int64_t position = 0;
        ok = any_pack_message(ct, buf, count, device, bytes, &position) == COMMLIB_OK;
        if (ok) device_batch_abandon(&batch);
        else device_batch_end(&batch);
    }
    const char *source = contiguous ? first : device;
    if (ok) {
        p->dc = dc;
        p->dest = world;
        p->bytes = bytes;
        p->chunk = chunk;
        p->seq = __atomic_fetch_add(&pipe.next_seq, 1, __ATOMIC_RELAXED);
        for (int64_t off = 0; ok && off < bytes; off += chunk) {
            int64_t len = bytes - off < chunk ? bytes - off : chunk;
            CUevent *e = &p->events[p->nchunks];
            ok = device_copy_async(dc, pinned + off, source + off, (size_t)len) &&
                 cuda_check(cu->cuEventCreate(e, CU_EVENT_DISABLE_TIMING), "cuEventCreate (pipeline)");
            if (ok) p->nchunks++;
            ok = ok && cuda_check(cu->cuEventRecord(*e, dc->stream), "cuEventRecord (pipeline)");
        }
    }
    /* device staging goes back now: its next user's work queues behind these copies */
    if (device) staging_put(device_kind, device, device_capacity, dc);
    type_cache_release(locked);
    int rc = STAGED_FAILED;
    if (ok) {
        struct pipeline_descriptor d = {{MAGIC0, MAGIC1}, 1, pipe.world_rank, p->seq, bytes, chunk, {0, 0}};
        rc = staged_wire_bytes(out, &d, (int)sizeof d);
    }
    if (rc != STAGED_YES) {
        if (p && p->nchunks) device_sync(dc); /* the copies must not write freed staging */
        if (pinned) staging_put(pinned_kind, pinned, pinned_capacity, dc);
        if (p) p->staging = NULL;
        send_state_free(p);
        if (!ok) commlib_log(LOG_WARN, "pipelined staging of %lld bytes failed: staged whole", (long long)bytes);
        return ok ? rc : STAGED_FORWARD;
    }
    p->staging = pinned;
    p->capacity = pinned_capacity;
    p->kind = pinned_kind;
    p->owned = 1;
    staged_transfer *t = *out;
    t->pipe = p;
    t->dc = dc;
    t->pipelined = 1;
    stat_add(STAT_P2P_PIPELINED_SEND, 1);
    return STAGED_YES;
}

/* Hands the chunks whose copies ended to the host MPI, in order (caller holds outgoing_lock). */
static void post_ready(struct pipeline_send *p)
{
    if (p->posted == p->nchunks || p->failed) return;
    const struct cuda_driver *cu = cuda_driver();
    device_make_current(p->dc->context);
    int before = p->posted;
    while (p->posted < p->nchunks) {
        int k = p->posted;
        CUresult q = cu->cuEventQuery(p->events[k]);
        if (q == CUDA_ERROR_NOT_READY) break;
        int64_t off = (int64_t)k * p->chunk, len = p->bytes - off < p->chunk ? p->bytes - off : p->chunk;
        if (!cuda_check(q, "cuEventQuery (pipeline)") ||
            PMPI_Isend(p->staging + off, (int)len, MPI_BYTE, p->dest, CHUNK_TAG(p->seq), pipe.comm, &p->requests[k]) !=
                MPI_SUCCESS) {
            p->failed = 1;
            commlib_log(LOG_ERROR, "pipelined send of %lld bytes to rank %d failed after %d of %d chunks",
                        (long long)p->bytes, p->dest, p->posted, p->nchunks);
            break;
        }
        p->posted++;
    }
    if (p->posted > before) stat_add(STAT_P2P_PIPELINED_CHUNKS, (uint64_t)(p->posted - before));
    if (p->deferred && (p->posted == p->nchunks || p->failed)) {
        p->deferred = 0;
        __atomic_sub_fetch(&pipeline_unposted, 1, __ATOMIC_RELAXED);
    }
}

int pipeline_send_start(staged_transfer *t)
{
    struct pipeline_send *p = t->pipe;
    if (!p) return MPI_SUCCESS;
    /* with the progress thread the call returns now, and whoever polls next hands the
     * chunks over; without it nobody might (a program blocked in a plain MPI_Recv whose
     * sender waits for these chunks): then the call hands them all over itself */
    int deferred = progress_thread_running();
    pthread_mutex_lock(&outgoing_lock);
    p->linked = 1;
    p->next = outgoing;
    outgoing = p;
    __atomic_add_fetch(&pipeline_outgoing, 1, __ATOMIC_RELAXED);
    p->deferred = deferred;
    if (deferred) __atomic_add_fetch(&pipeline_unposted, 1, __ATOMIC_RELAXED);
    post_ready(p);
    pthread_mutex_unlock(&outgoing_lock);
    t->companion_pending = 1; /* until every chunk is with the host MPI (pipeline_send_done) */
    if (!deferred) {
        pipeline_send_done(t, 1);
        t->companion_pending = 0;
    }
    int failed = t->pipe_failed;
    if (t->pipe) { /* still handing over: its failure shows at completion */
        pthread_mutex_lock(&outgoing_lock);
        failed = p->failed;
        pthread_mutex_unlock(&outgoing_lock);
    }
    return failed ? MPI_ERR_OTHER : MPI_SUCCESS;
}

int pipeline_send_done(staged_transfer *t, int wait)
{
    struct pipeline_send *p = t->pipe;
    if (!p) return 1;
    for (;;) {
        pthread_mutex_lock(&outgoing_lock);
        post_ready(p);
        int all = p->posted == p->nchunks || p->failed, failed = p->failed;
        if (all) { /* the program's buffer is free: the chunks go on without its request */
            p->owned = 0;
            t->pipe = NULL;
            t->pipe_failed = failed;
        }
        /* the host MPI moves the chunks posted so far while the next copy finishes (their
         * requests are tested under the lock: a poll on another thread tests them too) */
        int flag;
        if (!all && wait && p->posted) PMPI_Testall(p->posted, p->requests, &flag, MPI_STATUSES_IGNORE);
        pthread_mutex_unlock(&outgoing_lock);
        if (all || !wait) return all;
        sched_yield();
    }
}

int pipeline_send_chunks(staged_transfer *t)
{
    int rc = pipeline_send_start(t);
    pipeline_send_done(t, 1);
    t->companion_pending = 0;
    return rc == MPI_SUCCESS && t->pipe_failed ? MPI_ERR_OTHER : rc;
}

/* caller holds outgoing_lock; wait: until every chunk is sent (or `seconds` passed) */
static void reap_outgoing(double seconds)
{
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (struct pipeline_send **link = &outgoing; *link;) {
        struct pipeline_send *p = *link;
        post_ready(p);
        int flag = 1;
        if (p->posted) PMPI_Testall(p->posted, p->requests, &flag, MPI_STATUSES_IGNORE);
        if (!flag || p->owned || (p->posted < p->nchunks && !p->failed)) {
            clock_gettime(CLOCK_MONOTONIC, &now);
            if (now.tv_sec - start.tv_sec + (now.tv_nsec - start.tv_nsec) * 1e-9 < seconds) continue;
            link = &p->next; /* given up on (finalize warns) */
            continue;
        }
        *link = p->next;
        if (p->failed) device_sync(p->dc); /* copies may still be queued */
        send_state_free(p);
        __atomic_sub_fetch(&pipeline_outgoing, 1, __ATOMIC_RELAXED);
    }
}

void pipeline_poll_outgoing(void)
{
    if (pthread_mutex_trylock(&outgoing_lock)) return; /* another thread is at it */
    reap_outgoing(0);
    pthread_mutex_unlock(&outgoing_lock);
}

void pipeline_send_release(staged_transfer *t)
{
    struct pipeline_send *p = t->pipe;
    if (!p) return;
    t->pipe = NULL;
    if (!p->linked) { /* prepared, never sent: the copies end first */
        device_sync(p->dc);
        send_state_free(p);
        return;
    }
    pthread_mutex_lock(&outgoing_lock); /* the poll posts the rest and frees it */
    p->owned = 0;
    pthread_mutex_unlock(&outgoing_lock);
}

int pipeline_message_of(const void *bytes, int64_t received, struct pipeline_message *m)
{
    struct pipeline_descriptor d;
    if (!__atomic_load_n(&pipeline_enabled, __ATOMIC_RELAXED) || received != (int64_t)sizeof d) return 0;
    memcpy(&d, bytes, sizeof d);
    if (d.magic[0] != MAGIC0 || d.magic[1] != MAGIC1 || d.version != 1 || d.sender < 0 ||
        d.sender >= pipe.world_size || d.bytes <= 0 || d.bytes > INT32_MAX || d.chunk <= 0 ||
        (d.bytes + d.chunk - 1) / d.chunk > MAX_CHUNKS)
        return 0;
    *m = (struct pipeline_message){d.sender, d.seq, d.bytes, d.chunk};
    return 1;
}

int pipeline_receive_chunks(struct device_context *dc, const struct pipeline_message *m, char *pinned, char *device,
                            int64_t fits, int settle)
{
    int n = (int)((m->bytes + m->chunk - 1) / m->chunk), ok = 1, posted = 0;
    MPI_Request requests[MAX_CHUNKS];
    for (int k = 0; k < n; k++) {
        int64_t off = (int64_t)k * m->chunk, len = m->bytes - off < m->chunk ? m->bytes - off : m->chunk;
        if (PMPI_Irecv(pinned + off, (int)len, MPI_BYTE, m->sender, CHUNK_TAG(m->seq), pipe.comm, &requests[k]) !=
            MPI_SUCCESS) {
            ok = 0;
            break;
        }
        posted++;
    }
    /* each chunk onto the device as it arrives, while the next ones are received; and our
     * own chunks handed over meanwhile - the sender may be waiting for them just as we wait
     * for its (two ranks exchanging, each finishing its receive first) */
    for (int left = posted; left > 0; left--) {
        int k = MPI_UNDEFINED, flag = 0;
        for (;;) {
            if (PMPI_Testany(posted, requests, &k, &flag, MPI_STATUS_IGNORE) != MPI_SUCCESS) {
                flag = 0;
                break;
            }
            if (flag) break;
            if (__atomic_load_n(&pipeline_unposted, __ATOMIC_RELAXED)) pipeline_poll_outgoing();
            sched_yield();
        }
        if (!flag || k == MPI_UNDEFINED) {
            ok = 0;
            break;
        }
        int64_t off = (int64_t)k * m->chunk, len = m->bytes - off < m->chunk ? m->bytes - off : m->chunk;
        if (device && off < fits)
            ok = device_copy_async(dc, device + off, pinned + off, (size_t)(off + len > fits ? fits - off : len)) && ok;
    }
    /* the pinned staging goes back after this - or, settled, when the caller's batch ends */
    if (device) ok = (settle ? device_settle(dc) : device_sync(dc)) && ok;
    if (!ok) commlib_log(LOG_ERROR, "receiving a pipelined message of %lld bytes from rank %d failed",
                         (long long)m->bytes, m->sender);
    else stat_add(STAT_P2P_PIPELINED_RECV, 1);
    return ok;
}
