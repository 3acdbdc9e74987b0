#define _GNU_SOURCE /* pthread_setname_np */
#include "ipc.h"

#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../cuda/device.h"
#include "../datatype/cache.h"
#include "../pack/device_pack.h"
#include "../pack/pack_any.h"
#include "../progress/thread.h"
#include "../util/config.h"
#include "../util/log.h"
#include "../util/stats.h"
#include "commlib.h"
#include "model.h"
#include "staging.h"
#include "world_ranks.h"

#define ACK_TAG 7
/* a direct message's acknowledgement: its own tag, which the sender's companion receive
 * waits for (seq cycles through them; ACK_TAG stays outside) */
#define DIRECT_TAG(seq) (16 + (int)((seq) % 32000))
#define DIRECT_MIN_BYTES ((int64_t)1 << 20)
#define DIRECT_MAPPINGS_MAX 64 /* a receiver's mappings of senders' own buffers, before the oldest close */
#define ARENA_BYTES ((size_t)64 << 20)
#define ARENAS_MAX_BYTES ((size_t)1 << 30)
#define SLOTS_PER_ARENA 4096
#define ALIGN 256
/* An arena's first bytes: its signal, the number of the newest burst with a message there
 * (ipc.h), which the receivers' streams wait on */
#define SIGNAL_BYTES ALIGN
#define SIGNAL_VALUE 2 /* the descriptor's has_event: wait for the arena's signal, not the event */
#define BURST_ARENAS 8 /* arenas one burst signals, at most (one per context, unless one is full) */

/* The message on the wire: two constants no program's bytes are likely to start with,
 * then where the packed bytes are. */
static const uint64_t MAGIC0 = 0x636f6d6d6c696250ull, MAGIC1 = 0x47505532475055a5ull;
#define DESCRIPTOR_VERSION 2 /* 2: a burst's messages wait for the burst's number (1: their own sequence) */
struct ipc_descriptor {
    uint64_t magic[2];
    int32_t version, sender; /* world rank */
    int32_t arena;       /* IPC_DIRECT: handle is the sender's own allocation, the first 8 bytes of event its id */
    uint32_t extra_low;  /* IPC_DIRECT: 1 when strided (the layout in event after the id); a burst's
                            message (has_event SIGNAL_VALUE): the low half of its burst's number */
    uint64_t seq, offset, bytes;
    CUipcMemHandle handle;
    CUipcEventHandle event; /* recorded after the pack (has_event): the receiver's stream waits for it */
    int32_t has_event;
    uint32_t extra_high; /* a burst's message: the high half of its burst's number */
};
_Static_assert(sizeof(struct ipc_descriptor) == IPC_DESCRIPTOR_BYTES, "the descriptor's size is part of the protocol");

struct slot {
    size_t offset, bytes;
    uint64_t seq;
    int done;          /* acknowledged */
    uint64_t burst_no; /* its pack was burst burst_no's (0: none): the space comes back only
                        * once that burst finished on its stream, too - a receive truncated
                        * inside the descriptor acknowledges without waiting for the pack */
};

/* A sender's device memory that peers map: packed messages in a ring, freed by acks in
 * any order (the ring's tail moves past the slots acknowledged). */
struct arena {
    struct device_context *dc;
    CUdeviceptr base;
    size_t size, head, tail;
    int id;
    CUipcMemHandle handle;
    CUevent event; /* inter-process, recorded after each pack (NULL: the sender waits itself) */
    CUipcEventHandle event_handle;
    int signal;         /* its first 8 bytes hold its signal (zeroed when created): bursts allowed */
    struct burst_stream *bs; /* its context's burst stream (with signal) */
    int in_burst;       /* the queued burst has messages here (burst_lock) */
    struct slot slots[SLOTS_PER_ARENA]; /* the ring of slots in flight, oldest at `first` */
    int first, count;
};

struct import {
    uint64_t buffer_id; /* a direct mapping (arena IPC_DIRECT): the sender's allocation */
    int sender, arena;
    struct device_context *dc;
    CUdeviceptr base;
    CUevent event;
    int users; /* a direct mapping: receives between ipc_message and their acknowledgement */
};

static struct {
    int direct; /* every rank of the node runs the progress thread: direct messages allowed */
    int world_rank, world_size;
    unsigned char *local; /* world rank -> on this node */
    MPI_Comm node, acks;
    struct arena **arenas;
    int narenas;
    size_t arena_bytes, arenas_max;
    int64_t min_bytes; /* smaller messages are staged (IPC_MIN_BYTES) */
    int64_t direct_min_nonblocking; /* COMMLIB_IPC_DIRECT_BYTES (0: off): nonblocking sends this long may be direct */
    int strided_direct; /* a strided piece from DIRECT_MIN_BYTES goes direct (COMMLIB_TEST_STRIDED_ARENA=1: not) */
    int wait_each;      /* COMMLIB_TEST_WAIT_EACH=1: no wait shared by a burst's messages (burst_waited) */
    int legacy_unchecked; /* COMMLIB_TEST_LEGACY_UNCHECKED=1: direct sends do not query the legacy stream (A/B) */
    int ack_each;         /* COMMLIB_TEST_ACK_EACH=1: no acknowledgements batched (ipc_ack_batch_end; A/B) */
    uint64_t next_seq;
    int in_flight; /* slots not yet acknowledged, every arena */
    struct import *imports;
    int nimports;
    struct pending_ack {
        MPI_Request request;
        uint64_t payload[]; /* arena, seq: one pair, or a batch's pairs (ipc_ack_batch_end) */
    } **pending; /* our acknowledgements on their way */
    int nacks, ack_room;
} ipc;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
int ipc_enabled; /* between ipc_init and ipc_finalize with COMMLIB_IPC=1 (ipc.h) */
int ipc_small_receives; /* the same, and COMMLIB_IPC_SMALL=1 on every rank of the node (ipc.h) */

void ipc_init(void)
{
    if (!commlib_config.ipc) return;
    PMPI_Comm_rank(MPI_COMM_WORLD, &ipc.world_rank);
    PMPI_Comm_size(MPI_COMM_WORLD, &ipc.world_size);
    ipc.local = calloc((size_t)ipc.world_size, 1);
    if (!ipc.local) return;
    if (commlib_config.ranks_per_node > 0) { /* pretended nodes (tests): consecutive world ranks */
        int per = commlib_config.ranks_per_node;
        PMPI_Comm_split(MPI_COMM_WORLD, ipc.world_rank / per, ipc.world_rank, &ipc.node);
    } else {
        PMPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, ipc.world_rank, MPI_INFO_NULL, &ipc.node);
    }
    int node_size;
    PMPI_Comm_size(ipc.node, &node_size);
    int *members = malloc((size_t)node_size * sizeof *members);
    if (members && PMPI_Allgather(&ipc.world_rank, 1, MPI_INT, members, 1, MPI_INT, ipc.node) == MPI_SUCCESS)
        for (int i = 0; i < node_size; i++) ipc.local[members[i]] = 1;
    free(members);
    /* what every rank of the node must have, in one reduction: a direct sender waits for
     * its receiver's acknowledgement, which the receiver's progress thread guarantees; small
     * messages as descriptors need every receiver to post room for one */
    int mine[2] = {progress_thread_running(), commlib_config.ipc_small}, all[2] = {0, 0};
    PMPI_Allreduce(mine, all, 2, MPI_INT, MPI_MIN, ipc.node);
    ipc.direct = all[0];
    int small = mine[1], all_small = all[1];
    if (small && !all_small)
        commlib_log(LOG_WARN, "COMMLIB_IPC_SMALL=0 is set on another rank of this node: small messages stay staged");
    PMPI_Comm_dup(MPI_COMM_WORLD, &ipc.acks);
    world_ranks_init();
    /* testing hook (not a user knob): a smaller arena budget, to run out of room */
    const char *test_mb = getenv("COMMLIB_TEST_IPC_ARENAS_MB");
    ipc.arenas_max = test_mb && atoi(test_mb) > 0 ? (size_t)atoi(test_mb) << 20 : ARENAS_MAX_BYTES;
    /* testing and measuring hook: a higher threshold (never under the descriptor's size) */
    const char *test_min = getenv("COMMLIB_TEST_IPC_MIN_BYTES");
    ipc.min_bytes = test_min && atoll(test_min) > IPC_MIN_BYTES ? atoll(test_min) : all_small ? 1 : IPC_MIN_BYTES;
    __atomic_store_n(&ipc_small_receives, all_small, __ATOMIC_RELAXED);
    ipc.direct_min_nonblocking = commlib_config.ipc_direct_bytes;
    /* measuring hook: strided pieces of 1 MiB and more through the arena, as before stop 26 */
    const char *strided_arena = getenv("COMMLIB_TEST_STRIDED_ARENA");
    ipc.strided_direct = !(strided_arena && atoi(strided_arena) > 0);
    /* measuring hook: direct sends as before stop 36, no query of the legacy stream (what it costs) */
    const char *unchecked = getenv("COMMLIB_TEST_LEGACY_UNCHECKED");
    ipc.legacy_unchecked = unchecked && atoi(unchecked) > 0;
    /* measuring hook: one acknowledgement message per receive, as before stop 36 */
    const char *ack_each = getenv("COMMLIB_TEST_ACK_EACH");
    ipc.ack_each = ack_each && atoi(ack_each) > 0;
    /* measuring hook: every burst message queues its own wait, as before stop 29 */
    const char *wait_each = getenv("COMMLIB_TEST_WAIT_EACH");
    ipc.wait_each = wait_each && atoi(wait_each) > 0;
    __atomic_store_n(&ipc_enabled, 1, __ATOMIC_RELAXED);
    commlib_log(LOG_INFO, "GPU-to-GPU on: %d rank(s) on this node%s", node_size,
                ipc.direct ? ", direct messages (progress threads)" : "");
}

/* The burst queued (ipc.h): its packs, one context's, and the arenas whose sequence its
 * launch writes.  burst_lock comes before lock, and is held from a burst send's sequence
 * number to its queueing, so a flush never writes a sequence past a pack not yet queued.
 * The packs and the writes go on a stream of their own per context, which never waits
 * for anything: on the context's stream, where receives wait for their senders'
 * sequences, two ranks' packs for each other would each sit behind the other's wait. */
static struct {
    struct deferred_moves *packs;
    struct device_context *dc;
    struct arena *arenas[BURST_ARENAS];
    int narenas, sends;
    uint64_t last_ns; /* when the newest send came */
    uint64_t flushes; /* bursts launched: a send of burst k is on its stream once flushes >= k */
    struct burst_stream {
        struct device_context *dc;
        CUstream stream;
        uint64_t synced; /* every burst up to this one finished on it */
        unsigned long long async_seen; /* device_async_order: the context's queued MPI_Packs it waits for */
    } streams[8];
    int nstreams;
    pthread_t flusher; /* launches a burst no send joined for COMMLIB_IPC_BURST_US */
    int flusher_state;  /* 0 not started, 1 running, -1 could not start */
    int stopping;
    pthread_cond_t wake;
} burst;
static pthread_mutex_t burst_lock = PTHREAD_MUTEX_INITIALIZER;
int ipc_burst_pending;

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* 64-bit stream memory operations on the current context's device */
static int bursts_supported(void)
{
    CUdevice device = 0;
    int yes = 0;
    const struct cuda_driver *cu = cuda_driver();
    return cu->cuStreamWriteValue64 && cu->cuStreamWaitValue64 && cu->cuCtxGetDevice(&device) == CUDA_SUCCESS &&
           cu->cuDeviceGetAttribute(&yes, CU_DEVICE_ATTRIBUTE_CAN_USE_64_BIT_STREAM_MEM_OPS, device) == CUDA_SUCCESS &&
           yes;
}

/* dc's burst stream, created on first use (dc current); NULL if none can be.  Its own
 * lock, taken last: a new arena asks under lock, with or without burst_lock. */
static struct burst_stream *burst_stream_of(struct device_context *dc)
{
    static pthread_mutex_t streams_lock = PTHREAD_MUTEX_INITIALIZER;
    struct burst_stream *found = NULL;
    pthread_mutex_lock(&streams_lock);
    for (int i = 0; i < burst.nstreams && !found; i++)
        if (burst.streams[i].dc == dc) found = &burst.streams[i];
    CUstream s = NULL;
    if (!found && burst.nstreams < (int)(sizeof burst.streams / sizeof burst.streams[0]) &&
        cuda_check(cuda_driver()->cuStreamCreate(&s, CU_STREAM_DEFAULT), "cuStreamCreate (bursts)")) {
        burst.streams[burst.nstreams] = (struct burst_stream){dc, s, 0, 0};
        found = &burst.streams[burst.nstreams++];
    }
    pthread_mutex_unlock(&streams_lock);
    return found;
}

/* Launches the burst's packs, then writes the burst's number into each arena's signal after
 * them (burst_lock held).  Numbers only grow, so a receiver that already queued a wait for
 * burst k on an arena's signal needs none for the burst's other messages there. */
static int burst_flush_locked(void)
{
    if (!burst.sends) return 1;
    const struct cuda_driver *cu = cuda_driver();
    CUcontext current = NULL;
    cu->cuCtxGetCurrent(&current);
    int ok = current == burst.dc->context || cuda_check(cu->cuCtxSetCurrent(burst.dc->context), "cuCtxSetCurrent");
    struct burst_stream *bs = burst_stream_of(burst.dc); /* there: its arenas have a signal */
    /* the packs read send buffers an MPI_Pack may still be writing (COMMLIB_DEVICE_PACK_ASYNC) */
    if (bs) ok = device_async_order(burst.dc, bs->stream, &bs->async_seen) && ok;
    ok = device_pack_queue_launch(burst.packs) && ok;
    /* written even after a failed launch: a receiver must not wait forever (the failure is logged) */
    CUstream stream = bs ? bs->stream : burst.dc->stream;
    for (int i = 0; i < burst.narenas; i++) {
        struct arena *a = burst.arenas[i];
        ok = cuda_check(cu->cuStreamWriteValue64(stream, a->base, burst.flushes + 1, CU_STREAM_WRITE_VALUE_DEFAULT),
                        "cuStreamWriteValue64") && ok;
        a->in_burst = 0;
    }
    if (current != burst.dc->context) cu->cuCtxSetCurrent(current);
    burst.narenas = burst.sends = 0;
    burst.flushes++;
    __atomic_store_n(&ipc_burst_pending, 0, __ATOMIC_RELAXED);
    return ok;
}

int ipc_flush_sends(void)
{
    pthread_mutex_lock(&burst_lock);
    int ok = burst_flush_locked();
    pthread_mutex_unlock(&burst_lock);
    return ok;
}

/* The flusher: a thread that makes no MPI call (so it needs no thread level and takes no
 * lock of the MPI's), asleep while no burst waits. */
static void *flusher_main(void *unused)
{
    (void)unused;
    pthread_mutex_lock(&burst_lock);
    while (!burst.stopping) {
        if (!burst.sends) {
            pthread_cond_wait(&burst.wake, &burst_lock);
            continue;
        }
        uint64_t due = burst.last_ns + (uint64_t)commlib_config.ipc_burst_us * 1000u;
        if (now_ns() >= due) {
            burst_flush_locked();
            continue;
        }
        struct timespec at = {(time_t)(due / 1000000000u), (long)(due % 1000000000u)};
        pthread_cond_timedwait(&burst.wake, &burst_lock, &at);
    }
    pthread_mutex_unlock(&burst_lock);
    return NULL;
}

/* burst_lock held: 1 when the flusher runs (started on the first burst). */
static int flusher_running(void)
{
    if (burst.flusher_state) return burst.flusher_state > 0;
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&burst.wake, &attr);
    pthread_condattr_destroy(&attr);
    sigset_t all, old; /* signals stay with the program's threads */
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    burst.stopping = 0;
    int rc = pthread_create(&burst.flusher, NULL, flusher_main, NULL);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc) commlib_log(LOG_WARN, "GPU-to-GPU: no thread for bursts (%s); one pack launch per send", strerror(rc));
    else pthread_setname_np(burst.flusher, "commlib-burst");
    burst.flusher_state = rc ? -1 : 1;
    return !rc;
}

/* Queues the pack of a message in arena a on the burst (burst_lock held); 0: pack it now.
 * *number: the burst it joined. */
static int burst_add(struct arena *a, const canonical_type *ct, const void *buf, int count, void *packed,
                     uint64_t *number)
{
    if (!a->signal || !flusher_running()) return 0;
    if (burst.sends && (burst.dc != a->dc || (!a->in_burst && burst.narenas == BURST_ARENAS)) && !burst_flush_locked())
        return 0;
    struct burst_stream *bs = burst_stream_of(a->dc);
    if (!bs || !device_pack_queue_add(&burst.packs, a->dc, ct, buf, count, packed, bs->stream)) return 0;
    if (!a->in_burst) {
        a->in_burst = 1;
        burst.arenas[burst.narenas++] = a;
    }
    burst.dc = a->dc;
    if (!burst.sends++) pthread_cond_signal(&burst.wake); /* the flusher's clock starts */
    burst.last_ns = now_ns();
    *number = burst.flushes + 1;
    __atomic_store_n(&ipc_burst_pending, 1, __ATOMIC_RELAXED);
    stat_add(STAT_P2P_IPC_BURST, 1);
    return 1;
}

int ipc_send_settle(staged_transfer *t, int later)
{
    if (!t->ipc_burst) return later ? device_settle(t->dc) : device_sync(t->dc);
    pthread_mutex_lock(&burst_lock);
    int ok = burst.flushes >= t->ipc_burst || burst_flush_locked();
    struct burst_stream *bs = burst_stream_of(t->dc);
    uint64_t target = burst.flushes;
    int done = bs && bs->synced >= t->ipc_burst;
    CUstream stream = bs ? bs->stream : NULL;
    pthread_mutex_unlock(&burst_lock);
    if (!done && stream) {
        device_make_current(t->dc->context);
        ok = cuda_check(cuda_driver()->cuStreamSynchronize(stream), "cuStreamSynchronize (bursts)") && ok;
        pthread_mutex_lock(&burst_lock);
        if (ok && bs->synced < target) __atomic_store_n(&bs->synced, target, __ATOMIC_RELEASE);
        pthread_mutex_unlock(&burst_lock);
    }
    return ok && stream;
}

static void arena_trim(struct arena *a);

/* Space for `bytes` in an arena on dc (with grow, a new arena when none has room); NULL if none. */
static struct arena *arena_take(struct device_context *dc, size_t bytes, size_t *offset, int grow)
{
    size_t need = (bytes + ALIGN - 1) / ALIGN * ALIGN;
    for (int i = 0; i < ipc.narenas; i++) {
        struct arena *a = ipc.arenas[i];
        arena_trim(a); /* bursts finished since the last acknowledgements */
        if (a->dc != dc || a->count == SLOTS_PER_ARENA) continue;
        if (a->count == 0) a->head = a->tail = 0;
        size_t at;
        if (a->count == 0 || a->head > a->tail || (a->head == a->tail && a->count == 0)) {
            if (a->size - a->head >= need) at = a->head;
            else if (a->tail >= need) at = 0; /* wrap */
            else continue;
        } else if (a->head < a->tail && a->tail - a->head >= need) {
            at = a->head;
        } else {
            continue;
        }
        struct slot *s = &a->slots[(a->first + a->count++) % SLOTS_PER_ARENA];
        *s = (struct slot){at, need, ipc.next_seq++, 0, 0};
        a->head = at + need;
        *offset = SIGNAL_BYTES + at;
        return a;
    }
    if (!grow) return NULL;
    size_t size = ARENA_BYTES < ipc.arenas_max ? ARENA_BYTES : ipc.arenas_max;
    while (size < need + SIGNAL_BYTES) size *= 2;
    if (ipc.arena_bytes + size > ipc.arenas_max) {
        commlib_log(LOG_DEBUG, "GPU-to-GPU: no arena room for %zu bytes: staged", bytes);
        return NULL;
    }
    const struct cuda_driver *cu = cuda_driver();
    struct arena *a = calloc(1, sizeof *a), **grown = realloc(ipc.arenas, (size_t)(ipc.narenas + 1) * sizeof *grown);
    if (grown) ipc.arenas = grown;
    if (!a || !grown || !cuda_check(cu->cuMemAlloc(&a->base, size), "cuMemAlloc (GPU-to-GPU arena)")) {
        free(a);
        return NULL;
    }
    if (!cuda_check(cu->cuIpcGetMemHandle(&a->handle, a->base), "cuIpcGetMemHandle")) {
        cu->cuMemFree(a->base);
        free(a);
        return NULL;
    }
    /* the pack's completion travels as an event the receiver's stream waits for, so the
     * sender never waits for its own kernel before sending the descriptor */
    if (cu->cuIpcGetEventHandle && cu->cuIpcOpenEventHandle &&
        cuda_check(cu->cuEventCreate(&a->event, CU_EVENT_DISABLE_TIMING | CU_EVENT_INTERPROCESS),
                   "cuEventCreate (inter-process)") &&
        !cuda_check(cu->cuIpcGetEventHandle(&a->event_handle, a->event), "cuIpcGetEventHandle")) {
        cu->cuEventDestroy(a->event);
        a->event = NULL;
    }
    /* the signal starts at 0, written before any descriptor can name the arena (on
     * the burst stream: the context's may be waiting for a peer) */
    struct burst_stream *bs = commlib_config.ipc_burst_us > 0 && a->event && bursts_supported() ? burst_stream_of(dc) : NULL;
    a->bs = bs;
    a->signal = bs &&
                cuda_check(cu->cuStreamWriteValue64(bs->stream, a->base, 0, CU_STREAM_WRITE_VALUE_DEFAULT),
                           "cuStreamWriteValue64") &&
                cuda_check(cu->cuStreamSynchronize(bs->stream), "cuStreamSynchronize");
    a->dc = dc;
    a->size = size - SIGNAL_BYTES; /* the slots come after the signal word */
    a->id = ipc.narenas;
    ipc.arenas[ipc.narenas++] = a;
    ipc.arena_bytes += size;
    return arena_take(dc, bytes, offset, 1);
}

/* Moves the ring's tail past the slots whose space may be used again (caller holds lock). */
static void arena_trim(struct arena *a)
{
    uint64_t synced = a->bs ? __atomic_load_n(&a->bs->synced, __ATOMIC_ACQUIRE) : 0;
    while (a->count && a->slots[a->first].done && a->slots[a->first].burst_no <= synced) {
        a->first = (a->first + 1) % SLOTS_PER_ARENA;
        a->count--;
    }
    a->tail = a->count ? a->slots[a->first].offset : a->head;
}

static void arena_free(int id, uint64_t seq)
{
    if (id < 0 || id >= ipc.narenas) return;
    struct arena *a = ipc.arenas[id];
    for (int k = 0; k < a->count; k++) {
        struct slot *s = &a->slots[(a->first + k) % SLOTS_PER_ARENA];
        if (s->seq != seq || s->done) continue;
        s->done = 1;
        ipc.in_flight--;
        break;
    }
    arena_trim(a);
}

/* Acknowledgements: ours on their way out, the peers' coming in (caller holds lock). */
static void progress_locked(void)
{
    for (int i = 0; i < ipc.nacks;) {
        int flag = 0;
        PMPI_Test(&ipc.pending[i]->request, &flag, MPI_STATUS_IGNORE);
        if (!flag) {
            i++;
            continue;
        }
        free(ipc.pending[i]);
        ipc.pending[i] = ipc.pending[--ipc.nacks];
    }
    while (ipc.in_flight > 0) {
        int flag = 0, words = 0;
        MPI_Status status;
        if (PMPI_Iprobe(MPI_ANY_SOURCE, ACK_TAG, ipc.acks, &flag, &status) != MPI_SUCCESS || !flag) break;
        /* one pair, or a receiver's batch of them (ipc_ack_batch_end) */
        if (PMPI_Get_count(&status, MPI_UINT64_T, &words) != MPI_SUCCESS || words < 2) words = 2;
        uint64_t local[2 * 64], *ack = words <= 2 * 64 ? local : malloc((size_t)words * sizeof *ack);
        if (!ack) { /* the pairs must be taken off the wire: one at a time would not match */
            commlib_log(LOG_ERROR, "GPU-to-GPU: no memory for %d acknowledgements", words / 2);
            break;
        }
        PMPI_Recv(ack, words, MPI_UINT64_T, status.MPI_SOURCE, ACK_TAG, ipc.acks, MPI_STATUS_IGNORE);
        for (int i = 0; i + 1 < words; i += 2) arena_free((int)ack[i], ack[i + 1]);
        if (ack != local) free(ack);
    }
}

/* The allocation holding [p, p + bytes) when another process can map it with legacy
 * CUDA IPC: its start and driver-wide id (never reused, so a recycled address is a new id). */
static int allocation_of(CUdeviceptr p, int64_t bytes, CUdeviceptr *base, uint64_t *id)
{
    CUdeviceptr start = 0;
    size_t size = 0;
    unsigned long long buffer_id = 0;
    int capable = 0;
    int attributes[] = {CU_POINTER_ATTRIBUTE_RANGE_START_ADDR, CU_POINTER_ATTRIBUTE_RANGE_SIZE,
                        CU_POINTER_ATTRIBUTE_BUFFER_ID, CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE};
    void *data[] = {&start, &size, &buffer_id, &capable};
    if (cuda_driver()->cuPointerGetAttributes(4, attributes, data, p) != CUDA_SUCCESS || !capable || !buffer_id ||
        !start || p < start || p + (uint64_t)bytes > start + size)
        return 0;
    *base = start;
    *id = buffer_id;
    return 1;
}

/* A direct message's strided piece, in the descriptor after the buffer id (event field). */
struct direct_layout {
    uint32_t block, ndims, count[3], pad;
    int64_t stride[3];
};
_Static_assert(8 + sizeof(struct direct_layout) <= sizeof(CUipcEventHandle), "the layout fits the descriptor");

/* 1 when p can travel as a direct_layout; *span: the bytes from its first to past its last. */
static int encodable(const strided_piece *p, int64_t *span)
{
    if (p->ndims < 1 || p->ndims > 3 || p->block > UINT32_MAX) return 0;
    *span = p->block;
    for (int d = 0; d < p->ndims; d++) {
        if (p->dims[d].count < 1 || p->dims[d].count > UINT32_MAX || p->dims[d].stride < 0) return 0;
        *span += (p->dims[d].count - 1) * p->dims[d].stride;
    }
    return 1;
}

/* The inter-process handles of the program's allocations a direct sender named lately, by
 * the driver's buffer id (never reused: a freed and reallocated address is a new id). */
#define HANDLES_KEPT 64
static struct {
    uint64_t id;
    CUipcMemHandle handle;
} handles[HANDLES_KEPT];
static int handles_next;

static int handle_of(CUdeviceptr base, uint64_t id, CUipcMemHandle *handle)
{
    pthread_mutex_lock(&lock);
    for (int i = 0; i < HANDLES_KEPT; i++)
        if (handles[i].id == id) {
            *handle = handles[i].handle;
            pthread_mutex_unlock(&lock);
            return 1;
        }
    pthread_mutex_unlock(&lock);
    if (!cuda_check(cuda_driver()->cuIpcGetMemHandle(handle, base), "cuIpcGetMemHandle (direct)")) return 0;
    pthread_mutex_lock(&lock);
    handles[handles_next].id = id;
    handles[handles_next].handle = *handle;
    handles_next = (handles_next + 1) % HANDLES_KEPT;
    pthread_mutex_unlock(&lock);
    return 1;
}

/* A direct message (transfer/ipc.h): the descriptor names the program's own allocation and
 * the send completes on the receiver's acknowledgement; `piece` (NULL: contiguous) is how
 * the message lies there, from `first` over `span` bytes.  STAGED_FORWARD: not possible. */
static int direct_prepare(staged_transfer **out, const char *first, int64_t bytes, int64_t span,
                          const strided_piece *piece, struct device_context *dc, int dest_world)
{
    CUdeviceptr base;
    uint64_t id;
    if (!allocation_of((CUdeviceptr)(uintptr_t)first, span, &base, &id)) return STAGED_FORWARD;
    /* the receiver reads the buffer on its own stream: what MPI_Pack left queued into it
     * first, and what the program left on the legacy stream (its last pageable copy's bytes
     * may not have landed yet: the arena's pack, on a blocking stream, would wait for it) */
    if (!device_async_drain(dc)) return STAGED_FORWARD;
    int settled = ipc.legacy_unchecked ? 0 : device_legacy_settle();
    if (settled < 0) return STAGED_FORWARD;
    stat_add(STAT_P2P_IPC_DIRECT_SETTLED, settled);
    struct ipc_descriptor d = {{MAGIC0, MAGIC1}, DESCRIPTOR_VERSION, ipc.world_rank, IPC_DIRECT, piece != NULL, 0,
                               (uint64_t)((CUdeviceptr)(uintptr_t)first - base), (uint64_t)bytes, {{0}}, {{0}}, 0, 0};
    if (!handle_of(base, id, &d.handle)) return STAGED_FORWARD;
    memcpy(d.event.reserved, &id, sizeof id);
    if (piece) {
        struct direct_layout l = {(uint32_t)piece->block, (uint32_t)piece->ndims, {0}, 0, {0}};
        for (int i = 0; i < piece->ndims; i++) {
            l.count[i] = (uint32_t)piece->dims[i].count;
            l.stride[i] = piece->dims[i].stride;
        }
        memcpy(d.event.reserved + 8, &l, sizeof l);
    }
    pthread_mutex_lock(&lock);
    d.seq = ipc.next_seq++;
    pthread_mutex_unlock(&lock);
    int rc = staged_wire_bytes(out, &d, (int)sizeof d);
    if (rc != STAGED_YES) return rc;
    staged_transfer *t = *out;
    if (PMPI_Irecv(t->ipc_ack, 2, MPI_UINT64_T, dest_world, DIRECT_TAG(d.seq), ipc.acks, &t->companion) != MPI_SUCCESS) {
        staged_release(t);
        *out = NULL;
        return STAGED_FORWARD;
    }
    t->companion_pending = 1;
    t->ipc_direct = 1;
    t->dc = dc;
    stat_add(STAT_P2P_IPC_DIRECT, 1);
    return STAGED_YES;
}

int ipc_send_prepare(staged_transfer **out, const void *buf, int count, MPI_Datatype type, int dest, MPI_Comm comm,
                     int direct_ok)
{
    *out = NULL;
    if (!__atomic_load_n(&ipc_enabled, __ATOMIC_RELAXED) || count <= 0 || dest < 0 || !commlib_config.gpu ||
        !cuda_driver() || !cuda_driver()->cuIpcOpenMemHandle || transfer_cuda_aware())
        return STAGED_FORWARD;
    int dest_world = world_rank_of(comm, dest);
    if (dest_world < 0 || !ipc.local[dest_world]) return STAGED_FORWARD;
    int locked, rc = STAGED_FORWARD;
    const canonical_type *ct = type_cache_acquire(type, &locked);
    int64_t bytes;
    if (!ct || ct->unsupported || __builtin_mul_overflow(ct->size, (int64_t)count, &bytes) || bytes < ipc.min_bytes ||
        bytes > INT32_MAX) {
        type_cache_release(locked);
        return STAGED_FORWARD;
    }
    const void *first = (const char *)buf + ct->true_lb;
    struct device_context *dc = buffer_kind_of(first) == BUFFER_DEVICE ? device_context_of(first) : NULL;
    /* one block in type-map order (a span as long as the size may still run backwards) */
    strided_piece piece;
    int64_t span = bytes;
    int single = canonical_single_piece(ct, count, &piece);
    int contiguous = single && piece.ndims == 0 && piece.block == bytes;
    /* from DIRECT_MIN_BYTES, and COMMLIB_IPC_DIRECT_BYTES (opt-in): nonblocking sends from that
       size; one block, or one strided piece the receiver copies in one pass (device_copy_piece) */
    int opted = direct_ok == IPC_DIRECT_NONBLOCKING && ipc.direct_min_nonblocking > 0 &&
                bytes >= ipc.direct_min_nonblocking;
    int large = bytes >= DIRECT_MIN_BYTES;
    int strided = (opted || (large && ipc.strided_direct)) && single && !contiguous && encodable(&piece, &span);
    if (dc && direct_ok && ((contiguous && (large || opted)) || strided) && ipc.direct &&
        dest_world != ipc.world_rank) {
        rc = direct_prepare(out, (const char *)buf + piece.offset, bytes, span, strided ? &piece : NULL, dc,
                            dest_world);
        if (rc == STAGED_YES) {
            stat_add(STAT_P2P_IPC_SEND, 1);
            type_cache_release(locked);
            return rc;
        }
        rc = STAGED_FORWARD; /* the arena instead */
    }
    if (dc) {
        size_t offset = 0;
        /* a nonblocking send (a blocking one waits for its pack at once) */
        int may_burst = direct_ok == IPC_DIRECT_NONBLOCKING && commlib_config.ipc_burst_us > 0;
        uint64_t burst_number = 0;
        if (may_burst) pthread_mutex_lock(&burst_lock);
        pthread_mutex_lock(&lock);
        /* the peers' acknowledgements are taken in when the arenas have no room (before one
         * more is made), not at every send: a halo's 26 sends made 26 probes of the host MPI;
         * a completion call that acknowledges takes them in too (ipc_acknowledge) */
        struct arena *a = arena_take(dc, (size_t)bytes, &offset, 0);
        if (!a) {
            progress_locked();
            a = arena_take(dc, (size_t)bytes, &offset, 1);
        }
        uint64_t seq = a ? a->slots[(a->first + a->count - 1) % SLOTS_PER_ARENA].seq : 0;
        if (a) ipc.in_flight++;
        pthread_mutex_unlock(&lock);
        int64_t position = 0;
        void *packed = a ? (void *)(uintptr_t)(a->base + offset) : NULL;
        int queued = may_burst && a && burst_add(a, ct, buf, count, packed, &burst_number) ? SIGNAL_VALUE : 0;
        if (queued) { /* before the descriptor leaves: no acknowledgement yet */
            pthread_mutex_lock(&lock);
            for (int k = a->count - 1; k >= 0; k--) {
                struct slot *slot = &a->slots[(a->first + k) % SLOTS_PER_ARENA];
                if (slot->seq == seq) {
                    slot->burst_no = burst_number;
                    break;
                }
            }
            pthread_mutex_unlock(&lock);
        }
        if (may_burst) pthread_mutex_unlock(&burst_lock);
        /* Otherwise the pack into the arena is left queued (a device batch of its own) and
         * followed by the arena's event: the receiver's stream waits for that before
         * reading, and this send's completion waits for the stream before the program may
         * reuse its buffer (ipc_unsynced).  Without an inter-process event the pack is
         * waited for here. */
        int packed_ok = queued;
        if (!queued) {
            struct device_batch batch;
            device_batch_begin(&batch);
            packed_ok = a && any_pack_message(ct, buf, count, packed, bytes, &position) == COMMLIB_OK;
            queued = packed_ok && batch.n && a->event &&
                     cuda_check(cuda_driver()->cuEventRecord(a->event, dc->stream), "cuEventRecord");
            if (queued) device_batch_abandon(&batch);
            else packed_ok = device_batch_end(&batch) && packed_ok;
        }
        if (packed_ok) {
            struct ipc_descriptor d = {{MAGIC0, MAGIC1}, DESCRIPTOR_VERSION, ipc.world_rank, a->id, 0, seq, offset,
                                       (uint64_t)bytes, a->handle, a->event_handle, queued, 0};
            if (queued == SIGNAL_VALUE) { /* the burst it joined: its wait's value */
                d.extra_low = (uint32_t)burst_number;
                d.extra_high = (uint32_t)(burst_number >> 32);
            }
            rc = staged_wire_bytes(out, &d, (int)sizeof d);
            if (rc == STAGED_YES && queued) {
                (*out)->ipc_unsynced = 1;
                (*out)->ipc_burst = burst_number;
                (*out)->dc = dc;
            }
        }
        if (rc != STAGED_YES && queued) {
            staged_transfer settle = {.dc = dc, .ipc_burst = burst_number};
            ipc_send_settle(&settle, 0);
        }
        if (rc != STAGED_YES && a) {
            pthread_mutex_lock(&lock);
            arena_free(a->id, seq);
            pthread_mutex_unlock(&lock);
        }
        stat_add(rc == STAGED_YES ? STAT_P2P_IPC_SEND : STAT_P2P_IPC_FALLBACK, 1);
    }
    type_cache_release(locked);
    return rc;
}

/* The mapping of a sender's arena or (direct) allocation in context dc; NULL if none
 * (caller holds lock). */
static struct import *find_import(int sender, int arena, const struct device_context *dc, uint64_t buffer_id)
{
    for (int i = 0; i < ipc.nimports; i++) {
        struct import *m = &ipc.imports[i];
        if (m->sender == sender && m->arena == arena && m->dc == dc && m->buffer_id == buffer_id) return m;
    }
    return NULL;
}

/* Senders' own buffers stay mapped (a direct sender's next message often comes from the
 * same buffer) until DIRECT_MAPPINGS_MAX of them are: then the older half of those no
 * receive is still reading (users: another thread may be about to queue its copy) is
 * closed, after the device finished what was queued (caller holds lock). */
static void close_old_direct_mappings(struct device_context *dc)
{
    int direct = 0;
    for (int i = 0; i < ipc.nimports; i++) direct += ipc.imports[i].arena == IPC_DIRECT;
    if (direct < DIRECT_MAPPINGS_MAX) return;
    const struct cuda_driver *cu = cuda_driver();
    device_sync(dc);
    int closing = direct / 2, kept = 0;
    for (int i = 0; i < ipc.nimports; i++) {
        struct import *m = &ipc.imports[i];
        if (m->arena == IPC_DIRECT && !m->users && closing > 0) {
            closing--;
            if (m->dc != dc) { /* another context's copies: finish them too */
                cu->cuCtxSetCurrent(m->dc->context);
                device_sync(m->dc);
            }
            cu->cuIpcCloseMemHandle(m->base);
            continue;
        }
        ipc.imports[kept++] = *m;
    }
    ipc.nimports = kept;
    cu->cuCtxSetCurrent(dc->context);
}

/* Inside one completion call's device batch (one round of it, device_batch_round) every
 * descriptor it handles had arrived before the first was looked at (the host MPI completed
 * them all first), so each sender's pack for them was recorded on its arena's event before
 * our first wait on that event: one wait per event and context covers them all.  1 when
 * this batch waited for it already (else notes it). */
static int already_waited(const struct device_context *dc, CUevent event)
{
    static __thread struct {
        unsigned long long batch;
        int n;
        const struct device_context *dc[16];
        CUevent event[16];
    } w;
    unsigned long long batch = device_batch_id();
    if (!batch || !commlib_config.batch_unpack) return 0;
    if (w.batch != batch) {
        w.batch = batch;
        w.n = 0;
    }
    for (int i = 0; i < w.n; i++)
        if (w.event[i] == event && w.dc[i] == dc) return 1;
    if (w.n < 16) {
        w.dc[w.n] = dc;
        w.event[w.n++] = event;
    }
    return 0;
}

/* The newest burst of each sender's arena whose signal a context's stream was told to wait
 * for (ipc_message, under the context's device_lock, which also keeps the decision and the
 * queued wait together against other threads).  A message of an older or the same burst
 * needs no wait of its own: the stream's earlier wait holds back everything queued after
 * it.  An entry lost to a newer one only costs a wait; a sender's arena id used again for
 * a new arena gets its later, larger burst numbers. */
#define WAITED_SLOTS 64
static struct waited_burst {
    struct device_context *dc;
    int sender, arena;
    uint64_t number;
} waited_bursts[WAITED_SLOTS];
static int waited_next;
static pthread_mutex_t waited_lock = PTHREAD_MUTEX_INITIALIZER; /* the table's; taken last */

static struct waited_burst *waited_entry(struct device_context *dc, int sender, int arena)
{
    for (int i = 0; i < WAITED_SLOTS; i++) {
        struct waited_burst *w = &waited_bursts[i];
        if (w->dc == dc && w->sender == sender && w->arena == arena) return w;
    }
    return NULL;
}

static int burst_waited(struct device_context *dc, int sender, int arena, uint64_t number)
{
    if (ipc.wait_each) return 0;
    pthread_mutex_lock(&waited_lock);
    struct waited_burst *w = waited_entry(dc, sender, arena);
    int waited = w && w->number >= number;
    pthread_mutex_unlock(&waited_lock);
    return waited;
}

static void note_burst_waited(struct device_context *dc, int sender, int arena, uint64_t number)
{
    pthread_mutex_lock(&waited_lock);
    struct waited_burst *w = waited_entry(dc, sender, arena);
    if (!w) {
        w = &waited_bursts[waited_next];
        waited_next = (waited_next + 1) % WAITED_SLOTS;
        *w = (struct waited_burst){dc, sender, arena, 0};
    }
    if (number > w->number) w->number = number;
    pthread_mutex_unlock(&waited_lock);
}

const char *ipc_message(staged_transfer *t, const void *bytes, int64_t received, int64_t *message_bytes,
                        int *failed)
{
    struct ipc_descriptor d;
    *failed = 0;
    if (!ipc_enabled || received != (int64_t)sizeof d || !t->dc) return NULL;
    memcpy(&d, bytes, sizeof d);
    if (d.magic[0] != MAGIC0 || d.magic[1] != MAGIC1 || d.version != DESCRIPTOR_VERSION || d.sender < 0 ||
        d.sender >= ipc.world_size || (d.arena < 0 && d.arena != IPC_DIRECT))
        return NULL;
    uint64_t buffer_id = 0; /* a direct message: the sender's allocation */
    if (d.arena == IPC_DIRECT) memcpy(&buffer_id, d.event.reserved, sizeof buffer_id);
    t->ipc_strided = d.arena == IPC_DIRECT && d.extra_low == 1; /* and how the message lies in it */
    if (t->ipc_strided) {
        struct direct_layout l;
        memcpy(&l, d.event.reserved + 8, sizeof l);
        if (l.ndims < 1 || l.ndims > 3 || !l.block) return NULL;
        memset(&t->ipc_piece, 0, sizeof t->ipc_piece);
        t->ipc_piece.block = l.block;
        t->ipc_piece.ndims = (int)l.ndims;
        for (uint32_t i = 0; i < l.ndims; i++) t->ipc_piece.dims[i] = (stride_dim){l.count[i], l.stride[i]};
    }
    const struct cuda_driver *cu = cuda_driver();
    CUdeviceptr base = 0;
    CUevent event = NULL;
    pthread_mutex_lock(&lock);
    if (d.sender == ipc.world_rank) { /* to itself: the arena is ours (never direct) */
        if (d.arena >= 0 && d.arena < ipc.narenas) {
            base = ipc.arenas[d.arena]->base;
            event = ipc.arenas[d.arena]->event;
        }
    }
    struct import *known = base ? NULL : find_import(d.sender, d.arena, t->dc, buffer_id);
    if (known) {
        base = known->base;
        event = known->event;
        known->users++;
    }
    if (!base && d.arena == IPC_DIRECT) close_old_direct_mappings(t->dc);
    if (!base && d.sender != ipc.world_rank) {
        struct import *grown = realloc(ipc.imports, (size_t)(ipc.nimports + 1) * sizeof *grown);
        if (grown) ipc.imports = grown;
        if (grown && cuda_check(cu->cuIpcOpenMemHandle(&base, d.handle, CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS),
                                "cuIpcOpenMemHandle")) {
            if (d.has_event && !cuda_check(cu->cuIpcOpenEventHandle(&event, d.event), "cuIpcOpenEventHandle")) {
                cu->cuIpcCloseMemHandle(base);
                base = 0;
            } else {
                ipc.imports[ipc.nimports++] = (struct import){buffer_id, d.sender, d.arena, t->dc, base, event, 1};
            }
        } else {
            base = 0;
        }
    }
    pthread_mutex_unlock(&lock);
    /* the sender's pack, queued on its stream, comes before our reads: its event, or (a
     * burst's) the arena's signal reaching the burst's number - our own burst launched first */
    if (base && d.has_event == SIGNAL_VALUE) {
        uint64_t number = (uint64_t)d.extra_high << 32 | d.extra_low;
        int own = d.sender == ipc.world_rank;
        if (own) ipc_flush_pending();
        device_lock(t->dc); /* noted and queued together (device_async_try); and decided */
        if (burst_waited(t->dc, d.sender, d.arena, number)) {
            stat_add(STAT_P2P_IPC_WAITS_SHARED, 1);
        } else {
            device_before_peer_wait(t->dc);
            if (!cu->cuStreamWaitValue64 ||
                !cuda_check(cu->cuStreamWaitValue64(t->dc->stream, base, number, CU_STREAM_WAIT_VALUE_GEQ),
                            "cuStreamWaitValue64"))
                base = 0;
            else
                note_burst_waited(t->dc, d.sender, d.arena, number);
        }
        device_unlock(t->dc);
    } else if (base && d.has_event && event && !already_waited(t->dc, event)) {
        device_lock(t->dc);
        device_before_peer_wait(t->dc);
        if (!cuda_check(cu->cuStreamWaitEvent(t->dc->stream, event, 0), "cuStreamWaitEvent")) base = 0;
        device_unlock(t->dc);
    }
    t->ipc_pending = 1;
    t->ipc_sender = d.sender;
    t->ipc_arena = d.arena;
    t->ipc_seq = d.seq;
    t->ipc_buffer_id = buffer_id;
    t->ipc_import_held = base && d.sender != ipc.world_rank;
    if (!base) {
        *failed = 1;
        commlib_log(LOG_ERROR, "mapping rank %d's GPU memory failed: a GPU-to-GPU message is lost", d.sender);
        return NULL;
    }
    stat_add(STAT_P2P_IPC_RECV, 1);
    *message_bytes = (int64_t)d.bytes;
    return (const char *)(uintptr_t)(base + d.offset);
}

int ipc_truncated_descriptor(staged_transfer *t, const void *bytes, int64_t received)
{
    struct ipc_descriptor d;
    if (!ipc_enabled || received >= (int64_t)sizeof d || received < (int64_t)offsetof(struct ipc_descriptor, offset))
        return 0;
    memset(&d, 0, sizeof d);
    memcpy(&d, bytes, (size_t)received);
    if (d.magic[0] != MAGIC0 || d.magic[1] != MAGIC1 || d.version != DESCRIPTOR_VERSION || d.sender < 0 ||
        d.sender >= ipc.world_size || (d.arena < 0 && d.arena != IPC_DIRECT))
        return 0;
    t->ipc_pending = 1; /* the sender's space (or a direct sender's wait) ends with our acknowledgement */
    t->ipc_sender = d.sender;
    t->ipc_arena = d.arena;
    t->ipc_seq = d.seq;
    t->ipc_buffer_id = 0;
    t->ipc_import_held = 0;
    commlib_log(LOG_INFO, "a GPU-to-GPU message from rank %d truncated inside its descriptor (receive of %lld bytes)",
                d.sender, (long long)received);
    return 1;
}

/* Sends words uint64s to peer (caller holds lock); kept until the MPI is done with them. */
static void send_ack_locked(int peer, int tag, const uint64_t *payload, int words)
{
    struct pending_ack *ack = malloc(sizeof *ack + (size_t)words * sizeof *payload);
    if (ipc.nacks == ipc.ack_room) {
        int room = ipc.ack_room ? 2 * ipc.ack_room : 64;
        struct pending_ack **grown = realloc(ipc.pending, (size_t)room * sizeof *grown);
        if (grown) {
            ipc.pending = grown;
            ipc.ack_room = room;
        }
    }
    stat_add(STAT_P2P_IPC_ACK_MESSAGES, 1);
    if (ack && ipc.nacks < ipc.ack_room) {
        memcpy(ack->payload, payload, (size_t)words * sizeof *payload);
        if (PMPI_Isend(ack->payload, words, MPI_UINT64_T, peer, tag, ipc.acks, &ack->request) == MPI_SUCCESS)
            ipc.pending[ipc.nacks++] = ack;
        else
            free(ack);
    } else { /* no memory for a request: the small message goes out at once */
        free(ack);
        PMPI_Send(payload, words, MPI_UINT64_T, peer, tag, ipc.acks);
    }
}

/* Arena acknowledgements this thread holds back between ipc_ack_batch_begin and _end. */
static __thread struct {
    int depth, n, room;
    struct held_ack {
        int peer;
        uint64_t arena, seq;
    } *acks;
} ack_batch;

void ipc_ack_batch_begin(void) { ack_batch.depth++; }

void ipc_ack_batch_end(void)
{
    if (--ack_batch.depth > 0 || !ack_batch.n) return;
    uint64_t local[2 * 64];
    pthread_mutex_lock(&lock);
    for (int i = 0; i < ack_batch.n; i++) { /* one message per sender, its pairs in order */
        int peer = ack_batch.acks[i].peer, words = 0;
        if (peer < 0) continue;
        for (int j = i; j < ack_batch.n; j++)
            if (ack_batch.acks[j].peer == peer) words += 2;
        uint64_t *pairs = words <= 2 * 64 ? local : malloc((size_t)words * sizeof *pairs);
        for (int j = i, w = 0; j < ack_batch.n; j++) {
            if (ack_batch.acks[j].peer != peer) continue;
            if (pairs) {
                pairs[w++] = ack_batch.acks[j].arena;
                pairs[w++] = ack_batch.acks[j].seq;
            } else { /* no memory for the batch: one message each, as without it */
                uint64_t one[2] = {ack_batch.acks[j].arena, ack_batch.acks[j].seq};
                send_ack_locked(peer, ACK_TAG, one, 2);
            }
            ack_batch.acks[j].peer = -1;
        }
        if (pairs) send_ack_locked(peer, ACK_TAG, pairs, words);
        if (pairs != local) free(pairs);
    }
    ack_batch.n = 0;
    progress_locked();
    pthread_mutex_unlock(&lock);
}

void ipc_acknowledge(staged_transfer *t)
{
    if (!t->ipc_pending) return;
    t->ipc_pending = 0;
    pthread_mutex_lock(&lock);
    struct import *held = t->ipc_import_held ? find_import(t->ipc_sender, t->ipc_arena, t->dc, t->ipc_buffer_id) : NULL;
    if (held) held->users--; /* our reads are done: it may close */
    t->ipc_import_held = 0;
    if (t->ipc_sender == ipc.world_rank) { /* our own arena */
        arena_free(t->ipc_arena, t->ipc_seq);
        pthread_mutex_unlock(&lock);
        return;
    }
    stat_add(STAT_P2P_IPC_ACKS, 1);
    /* an arena's space can wait for the end of the batch; a direct sender waits for its own
     * acknowledgement (its tag) */
    if (ack_batch.depth > 0 && t->ipc_arena != IPC_DIRECT && !ipc.ack_each) {
        if (ack_batch.n == ack_batch.room) {
            int room = ack_batch.room ? 2 * ack_batch.room : 64;
            struct held_ack *grown = realloc(ack_batch.acks, (size_t)room * sizeof *grown);
            if (grown) {
                ack_batch.acks = grown;
                ack_batch.room = room;
            }
        }
        if (ack_batch.n < ack_batch.room) {
            ack_batch.acks[ack_batch.n++] = (struct held_ack){t->ipc_sender, (uint64_t)t->ipc_arena, t->ipc_seq};
            pthread_mutex_unlock(&lock);
            return;
        }
    }
    uint64_t payload[2] = {(uint64_t)t->ipc_arena, t->ipc_seq};
    send_ack_locked(t->ipc_sender, t->ipc_arena == IPC_DIRECT ? DIRECT_TAG(t->ipc_seq) : ACK_TAG, payload, 2);
    progress_locked();
    pthread_mutex_unlock(&lock);
}

void ipc_finalize(void)
{
    if (!ipc_enabled) return;
    pthread_mutex_lock(&burst_lock);
    burst_flush_locked(); /* sends freed by the program (MPI_Request_free) may still be queued */
    int flusher = burst.flusher_state > 0;
    burst.stopping = 1;
    if (flusher) pthread_cond_signal(&burst.wake);
    pthread_mutex_unlock(&burst_lock);
    if (flusher) pthread_join(burst.flusher, NULL);
    pthread_mutex_lock(&lock);
    /* every receive completed before MPI_Finalize: its acknowledgement is on the way */
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (;;) {
        progress_locked();
        if (!ipc.in_flight && !ipc.nacks) break;
        clock_gettime(CLOCK_MONOTONIC, &now);
        if (now.tv_sec - start.tv_sec > 5) {
            commlib_log(LOG_WARN, "GPU-to-GPU: %d message(s) never acknowledged at MPI_Finalize", ipc.in_flight);
            break;
        }
    }
    const struct cuda_driver *cu = ipc.nimports || ipc.narenas ? cuda_driver() : NULL;
    for (int i = 0; i < burst.nstreams; i++) { /* the last bursts' writes into our arenas */
        cu->cuCtxSetCurrent(burst.streams[i].dc->context);
        cu->cuStreamSynchronize(burst.streams[i].stream);
    }
    for (int i = 0; i < ipc.nimports; i++) {
        cu->cuCtxSetCurrent(ipc.imports[i].dc->context);
        cu->cuIpcCloseMemHandle(ipc.imports[i].base);
    }
    PMPI_Barrier(ipc.node); /* every mapping of our arenas is closed */
    for (int i = 0; i < ipc.narenas; i++) {
        cu->cuCtxSetCurrent(ipc.arenas[i]->dc->context);
        if (ipc.arenas[i]->event) cu->cuEventDestroy(ipc.arenas[i]->event);
        cu->cuMemFree(ipc.arenas[i]->base);
        free(ipc.arenas[i]);
    }
    for (int i = 0; i < ipc.nacks; i++) { /* never completed (logged above): the MPI may still read it */
        PMPI_Request_free(&ipc.pending[i]->request);
    }
    free(ipc.arenas);
    free(burst.packs);
    burst.packs = NULL;
    free(ipc.imports);
    free(ipc.pending);
    free(ipc.local);
    PMPI_Comm_free(&ipc.acks);
    PMPI_Comm_free(&ipc.node);
    world_ranks_finalize();
    __atomic_store_n(&ipc_small_receives, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&ipc_enabled, 0, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&lock);
}
