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
#include "../util/config.h"
#include "../util/log.h"
#include "../util/stats.h"
#include "commlib.h"
#include "model.h"
#include "staging.h"

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

/* A send's chunks on their way, after its call returned: the requests and the staging
 * they send from, reaped by pipeline_poll_outgoing. */
struct outgoing {
    struct outgoing *next;
    char *staging;
    size_t capacity;
    int kind, n;
    struct device_context *dc;
    MPI_Request requests[];
};
static struct outgoing *outgoing;
static pthread_mutex_t outgoing_lock = PTHREAD_MUTEX_INITIALIZER;
int pipeline_outgoing;
static void reap_outgoing(double seconds);

/* A send between its prepare and its chunks: the copies off the GPU, one event each. */
struct pipeline_send {
    struct device_context *dc;
    int dest; /* world rank */
    uint64_t seq;
    int64_t bytes, chunk;
    int nchunks;
    CUevent events[MAX_CHUNKS];
};

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
    for (struct outgoing *o = outgoing, *next; o; o = next, left++) {
        next = o->next;
        for (int k = 0; k < o->n; k++) /* the MPI may still read the staging: it is not given back */
            if (o->requests[k] != MPI_REQUEST_NULL) PMPI_Request_free(&o->requests[k]);
        free(o);
    }
    outgoing = NULL;
    pthread_mutex_unlock(&outgoing_lock);
    if (left) commlib_log(LOG_WARN, "pipelined staging: %d message(s) never received before MPI_Finalize", left);
    __atomic_store_n(&pipeline_enabled, 0, __ATOMIC_RELAXED);
    PMPI_Comm_free(&pipe.comm);
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

/* The world rank of `rank` in an intracommunicator; -1 when it has none. */
static int world_rank_of(MPI_Comm comm, int rank)
{
    int inter = 0, size = 0, world = MPI_UNDEFINED;
    if (PMPI_Comm_test_inter(comm, &inter) != MPI_SUCCESS || inter || PMPI_Comm_size(comm, &size) != MPI_SUCCESS ||
        rank >= size)
        return -1;
    MPI_Group group, world_group;
    PMPI_Comm_group(comm, &group);
    PMPI_Comm_group(MPI_COMM_WORLD, &world_group);
    int ok = PMPI_Group_translate_ranks(group, 1, &rank, world_group, &world) == MPI_SUCCESS;
    PMPI_Group_free(&group);
    PMPI_Group_free(&world_group);
    return ok && world != MPI_UNDEFINED ? world : -1;
}

static void send_state_free(struct pipeline_send *p)
{
    if (!p) return;
    for (int k = 0; k < p->nchunks; k++)
        if (p->events[k]) cuda_driver()->cuEventDestroy(p->events[k]);
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
        send_state_free(p);
        if (!ok) commlib_log(LOG_WARN, "pipelined staging of %lld bytes failed: staged whole", (long long)bytes);
        return ok ? rc : STAGED_FORWARD;
    }
    staged_transfer *t = *out;
    t->pipe = p;
    t->chunk_staging = pinned;
    t->chunk_capacity = pinned_capacity;
    t->chunk_kind = pinned_kind;
    t->dc = dc;
    t->pipelined = 1;
    stat_add(STAT_P2P_PIPELINED_SEND, 1);
    return STAGED_YES;
}

int pipeline_send_chunks(staged_transfer *t)
{
    struct pipeline_send *p = t->pipe;
    if (!p) return MPI_SUCCESS;
    const struct cuda_driver *cu = cuda_driver();
    cu->cuCtxSetCurrent(p->dc->context);
    struct outgoing *o = calloc(1, sizeof *o + (size_t)p->nchunks * sizeof(MPI_Request));
    int rc = o ? MPI_SUCCESS : MPI_ERR_NO_MEM;
    for (int k = 0; rc == MPI_SUCCESS && k < p->nchunks; k++) {
        /* the host MPI moves the chunks posted so far while the next copy finishes */
        CUresult q;
        while ((q = cu->cuEventQuery(p->events[k])) == CUDA_ERROR_NOT_READY) {
            int flag;
            if (o->n) PMPI_Testall(o->n, o->requests, &flag, MPI_STATUSES_IGNORE);
            else sched_yield();
        }
        if (!cuda_check(q, "cuEventQuery (pipeline)")) {
            rc = MPI_ERR_OTHER;
            break;
        }
        int64_t off = (int64_t)k * p->chunk, len = p->bytes - off < p->chunk ? p->bytes - off : p->chunk;
        rc = PMPI_Isend(t->chunk_staging + off, (int)len, MPI_BYTE, p->dest, CHUNK_TAG(p->seq), pipe.comm,
                        &o->requests[k]);
        if (rc == MPI_SUCCESS) o->n++;
    }
    /* a failure leaves the receiver short of chunks: the send reports it, and the copies
     * still queued finish before the staging can go back */
    if (rc != MPI_SUCCESS) {
        device_sync(p->dc);
        commlib_log(LOG_ERROR, "pipelined send of %lld bytes to rank %d failed after %d of %d chunks",
                    (long long)p->bytes, p->dest, o ? o->n : 0, p->nchunks);
    }
    if (o && o->n) { /* the chunks' sends go on without the program's request */
        o->staging = t->chunk_staging;
        o->capacity = t->chunk_capacity;
        o->kind = t->chunk_kind;
        o->dc = p->dc;
        t->chunk_staging = NULL;
        stat_add(STAT_P2P_PIPELINED_CHUNKS, (uint64_t)o->n);
        pthread_mutex_lock(&outgoing_lock);
        o->next = outgoing;
        outgoing = o;
        __atomic_add_fetch(&pipeline_outgoing, 1, __ATOMIC_RELAXED);
        pthread_mutex_unlock(&outgoing_lock);
    } else {
        free(o);
    }
    send_state_free(p);
    t->pipe = NULL;
    return rc;
}

/* caller holds outgoing_lock; wait: until every chunk is sent (or `seconds` passed) */
static void reap_outgoing(double seconds)
{
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (struct outgoing **link = &outgoing; *link;) {
        struct outgoing *o = *link;
        int flag = 0;
        PMPI_Testall(o->n, o->requests, &flag, MPI_STATUSES_IGNORE);
        if (!flag) {
            clock_gettime(CLOCK_MONOTONIC, &now);
            if (now.tv_sec - start.tv_sec + (now.tv_nsec - start.tv_nsec) * 1e-9 < seconds) continue;
            link = &o->next; /* given up on (finalize warns) */
            continue;
        }
        *link = o->next;
        staging_put(o->kind, o->staging, o->capacity, o->dc);
        free(o);
        __atomic_sub_fetch(&pipeline_outgoing, 1, __ATOMIC_RELAXED);
    }
}

void pipeline_poll_outgoing(void)
{
    if (pthread_mutex_trylock(&outgoing_lock)) return; /* another thread is at it */
    reap_outgoing(0);
    pthread_mutex_unlock(&outgoing_lock);
}

void pipeline_send_release(struct pipeline_send *p)
{
    if (p && p->nchunks) device_sync(p->dc); /* prepared, never sent: the copies end first */
    send_state_free(p);
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
                            int64_t fits)
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
    /* each chunk onto the device as it arrives, while the next ones are received */
    for (int left = posted; left > 0; left--) {
        int k = MPI_UNDEFINED;
        if (PMPI_Waitany(posted, requests, &k, MPI_STATUS_IGNORE) != MPI_SUCCESS || k == MPI_UNDEFINED) {
            ok = 0;
            break;
        }
        int64_t off = (int64_t)k * m->chunk, len = m->bytes - off < m->chunk ? m->bytes - off : m->chunk;
        if (device && off < fits)
            ok = device_copy_async(dc, device + off, pinned + off, (size_t)(off + len > fits ? fits - off : len)) && ok;
    }
    if (device) ok = device_sync(dc) && ok; /* the pinned staging goes back after this */
    if (!ok) commlib_log(LOG_ERROR, "receiving a pipelined message of %lld bytes from rank %d failed",
                         (long long)m->bytes, m->sender);
    else stat_add(STAT_P2P_PIPELINED_RECV, 1);
    return ok;
}
