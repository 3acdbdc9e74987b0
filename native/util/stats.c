#include "stats.h"

#include <string.h>
#include <time.h>

#include "commlib.h"

#include <pthread.h>
#include <stdlib.h>

/* Counters live in per-thread blocks so that the pack fast path adds to memory no other
 * thread writes (no atomic read-modify-write); readers sum every block ever created.
 * Blocks outlive their threads so that counts are never lost. */
typedef struct counter_block {
    uint64_t counters[STAT_COUNTER_COUNT];
    struct counter_block *next;
} counter_block;

static counter_block *blocks;
static pthread_mutex_t blocks_lock = PTHREAD_MUTEX_INITIALIZER;
__thread uint64_t *stat_my_counters;
static counter_block overflow_block; /* if a block cannot be allocated: atomic adds */

static uint64_t fallbacks[FALLBACK_REASON_COUNT];
static uint64_t type_reasons[TYPE_REASON_COUNT];

static const char *const counter_name[] = {
    "pack.calls", "pack.fast", "pack.fallback", "pack.bytes", "pack.ns",
    "unpack.calls", "unpack.fast", "unpack.fallback", "unpack.bytes", "unpack.ns",
    "pack_size.calls",
    "types.committed", "types.canonical", "types.unsupported",
    "p2p.staged_send", "p2p.staged_recv", "p2p.staged_typed", "p2p.partitions",
    "method.send_oneshot", "method.send_device", "method.send_aware",
    "method.recv_oneshot", "method.recv_device", "method.recv_aware",
    "p2p.handed_off", "p2p.ipc_send", "p2p.ipc_recv", "p2p.ipc_fallback", "p2p.ipc_direct", "p2p.ipc_direct_settled", "p2p.ipc_acks", "p2p.ipc_ack_messages", "p2p.ipc_one_pass", "p2p.ipc_burst", "p2p.ipc_burst_launches", "p2p.ipc_waits_shared",
    "p2p.pipelined_send", "p2p.pipelined_recv", "p2p.pipelined_chunks",
    "collective.staged",
    "placement.calls", "placement.cut_before", "placement.cut_after",
    "progress.completed", "progress.polls", "progress.busy_pauses", "device.settled", "device.deferred", "device.batch_launches", "device.async",
    "device.held", "device.hold_launches", "device.hold_flushes", "device.hold_overlaps",
    "pointer_cache.hits", "pointer_cache.asked", "pointer_cache.forgets", "staging.allocs",
    "kernels.fatbin", "kernels.nvrtc", "kernels.cached", "kernels.none", "kernels.compile_ns",
    "engine.ops", "engine.shm_steps", "engine.mpi_steps", "engine.device_staged", "engine.mismatch",
    "engine.iallreduce",
    "waitall.rounds_calls", "waitall.rounds", "waitall.early_launches",
    "pack.races", "pack.races_one_a_step",
    "unpack.probes", "unpack.probes_warm", "unpack.probe_ns",
};
_Static_assert(sizeof counter_name / sizeof *counter_name == STAT_COUNTER_COUNT, "a name for every stat_counter");

const char *const fallback_reason_name[FALLBACK_REASON_COUNT] = {
    "no-pack-knob", "unknown-type", "unsupported-type", "bad-argument", "truncate",
};

const char *const type_reason_name[TYPE_REASON_COUNT] = {
    "none", "combiner", "predefined-with-holes", "too-many-pieces", "too-many-dims",
    "large-count", "overflow", "mpi-error", "padded-element", "mpi-disagrees", "empty-part",
};

/* The thread's first count: its block, linked for the readers. */
void stat_add_slow(enum stat_counter c, uint64_t v)
{
    counter_block *b = calloc(1, sizeof *b);
    if (!b) {
        __atomic_fetch_add(&overflow_block.counters[c], v, __ATOMIC_RELAXED);
        return;
    }
    pthread_mutex_lock(&blocks_lock);
    b->next = blocks;
    __atomic_store_n(&blocks, b, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&blocks_lock);
    stat_my_counters = b->counters;
    stat_add(c, v);
}

static uint64_t counter(int c)
{
    /* calls are not counted on the fast path: they are the fast plus the fallback ones */
    if (c == STAT_PACK_CALLS) return counter(STAT_PACK_FAST) + counter(STAT_PACK_FALLBACK);
    if (c == STAT_UNPACK_CALLS) return counter(STAT_UNPACK_FAST) + counter(STAT_UNPACK_FALLBACK);
    uint64_t sum = __atomic_load_n(&overflow_block.counters[c], __ATOMIC_RELAXED);
    for (counter_block *b = __atomic_load_n(&blocks, __ATOMIC_ACQUIRE); b; b = b->next)
        sum += __atomic_load_n(&b->counters[c], __ATOMIC_RELAXED);
    return sum;
}
void stat_fallback(enum fallback_reason r) { __atomic_fetch_add(&fallbacks[r], 1, __ATOMIC_RELAXED); }
void stat_type_unsupported(enum type_reason r)
{
    __atomic_fetch_add(&type_reasons[r], 1, __ATOMIC_RELAXED);
    stat_add(STAT_TYPES_UNSUPPORTED, 1);
}

uint64_t stat_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static uint64_t load(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }

long long commlib_stat(const char *name)
{
    if (!name) return -1;
    for (int i = 0; i < STAT_COUNTER_COUNT; i++)
        if (!strcmp(name, counter_name[i])) return (long long)counter(i);
    if (!strncmp(name, "fallback.", 9))
        for (int i = 0; i < FALLBACK_REASON_COUNT; i++)
            if (!strcmp(name + 9, fallback_reason_name[i])) return (long long)load(&fallbacks[i]);
    if (!strncmp(name, "unsupported.", 12))
        for (int i = 0; i < TYPE_REASON_COUNT; i++)
            if (!strcmp(name + 12, type_reason_name[i])) return (long long)load(&type_reasons[i]);
    return -1;
}

#define APPEND(...) \
    (used += (size_t)snprintf(buf + (used < len ? used : len), used < len ? len - used : 0, __VA_ARGS__))

size_t commlib_stats_json(char *buf, size_t len)
{
    size_t used = 0;
    APPEND("{");
    for (int i = 0; i < STAT_COUNTER_COUNT; i++)
        APPEND("%s\"%s\":%llu", i ? "," : "", counter_name[i], (unsigned long long)counter(i));
    for (int i = 0; i < FALLBACK_REASON_COUNT; i++)
        APPEND(",\"fallback.%s\":%llu", fallback_reason_name[i], (unsigned long long)load(&fallbacks[i]));
    for (int i = 1; i < TYPE_REASON_COUNT; i++)
        APPEND(",\"unsupported.%s\":%llu", type_reason_name[i], (unsigned long long)load(&type_reasons[i]));
    APPEND("}");
    return used;
}

void stats_print(FILE *out, int rank)
{
    char line[1024];
    size_t len = sizeof line, used = 0;
    char *buf = line;
    uint64_t c[STAT_COUNTER_COUNT];
    for (int i = 0; i < STAT_COUNTER_COUNT; i++) c[i] = counter(i);
    APPEND("commlib[rank %d]: MPI_Pack calls=%llu fast=%llu fallback=%llu bytes=%llu time=%.3fms"
           " | MPI_Unpack calls=%llu fast=%llu fallback=%llu bytes=%llu time=%.3fms | MPI_Pack_size calls=%llu",
           rank, (unsigned long long)c[STAT_PACK_CALLS], (unsigned long long)c[STAT_PACK_FAST],
           (unsigned long long)c[STAT_PACK_FALLBACK], (unsigned long long)c[STAT_PACK_BYTES],
           c[STAT_PACK_NS] / 1e6, (unsigned long long)c[STAT_UNPACK_CALLS],
           (unsigned long long)c[STAT_UNPACK_FAST], (unsigned long long)c[STAT_UNPACK_FALLBACK],
           (unsigned long long)c[STAT_UNPACK_BYTES], c[STAT_UNPACK_NS] / 1e6,
           (unsigned long long)c[STAT_PACK_SIZE_CALLS]);
    fprintf(out, "%s\n", line);
    used = 0;
    APPEND("commlib[rank %d]: types committed=%llu canonical=%llu unsupported=%llu", rank,
           (unsigned long long)c[STAT_TYPES_COMMITTED], (unsigned long long)c[STAT_TYPES_CANONICAL],
           (unsigned long long)c[STAT_TYPES_UNSUPPORTED]);
    for (int i = 1; i < TYPE_REASON_COUNT; i++)
        if (load(&type_reasons[i])) APPEND(" %s=%llu", type_reason_name[i], (unsigned long long)load(&type_reasons[i]));
    APPEND(" | p2p staged send=%llu recv=%llu typed=%llu", (unsigned long long)c[STAT_P2P_STAGED_SEND],
           (unsigned long long)c[STAT_P2P_STAGED_RECV], (unsigned long long)c[STAT_P2P_STAGED_TYPED]);
    if (c[STAT_P2P_PARTITIONS]) APPEND(" partitions=%llu", (unsigned long long)c[STAT_P2P_PARTITIONS]);
    if (c[STAT_P2P_HANDED_OFF]) APPEND(" handed-off=%llu", (unsigned long long)c[STAT_P2P_HANDED_OFF]);
    uint64_t methods = 0;
    for (int i = STAT_METHOD_SEND_ONESHOT; i <= STAT_METHOD_RECV_AWARE; i++) methods += c[i];
    if (methods)
        APPEND(" | methods send oneshot=%llu device=%llu aware=%llu recv oneshot=%llu device=%llu aware=%llu",
               (unsigned long long)c[STAT_METHOD_SEND_ONESHOT], (unsigned long long)c[STAT_METHOD_SEND_DEVICE],
               (unsigned long long)c[STAT_METHOD_SEND_AWARE], (unsigned long long)c[STAT_METHOD_RECV_ONESHOT],
               (unsigned long long)c[STAT_METHOD_RECV_DEVICE], (unsigned long long)c[STAT_METHOD_RECV_AWARE]);
    if (c[STAT_KERNELS_FATBIN] + c[STAT_KERNELS_NVRTC] + c[STAT_KERNELS_CACHED] + c[STAT_KERNELS_NONE])
        APPEND(" | kernels fatbin=%llu nvrtc=%llu cached=%llu none=%llu", (unsigned long long)c[STAT_KERNELS_FATBIN],
               (unsigned long long)c[STAT_KERNELS_NVRTC], (unsigned long long)c[STAT_KERNELS_CACHED],
               (unsigned long long)c[STAT_KERNELS_NONE]);
    if (c[STAT_PROGRESS_COMPLETED]) APPEND(" | progress completed=%llu", (unsigned long long)c[STAT_PROGRESS_COMPLETED]);
    if (c[STAT_P2P_IPC_SEND] + c[STAT_P2P_IPC_RECV] + c[STAT_P2P_IPC_FALLBACK])
        APPEND(" | gpu-to-gpu send=%llu recv=%llu fallback=%llu direct=%llu one-pass=%llu",
               (unsigned long long)c[STAT_P2P_IPC_SEND], (unsigned long long)c[STAT_P2P_IPC_RECV],
               (unsigned long long)c[STAT_P2P_IPC_FALLBACK], (unsigned long long)c[STAT_P2P_IPC_DIRECT],
               (unsigned long long)c[STAT_P2P_IPC_ONE_PASS]);
    if (c[STAT_P2P_IPC_ACKS])
        APPEND(" | gpu-to-gpu acks=%llu in messages=%llu", (unsigned long long)c[STAT_P2P_IPC_ACKS],
               (unsigned long long)c[STAT_P2P_IPC_ACK_MESSAGES]);
    if (c[STAT_P2P_IPC_DIRECT_SETTLED])
        APPEND(" | direct sends after legacy-stream work=%llu", (unsigned long long)c[STAT_P2P_IPC_DIRECT_SETTLED]);
    if (c[STAT_P2P_IPC_BURST])
        APPEND(" | gpu-to-gpu burst=%llu in launches=%llu", (unsigned long long)c[STAT_P2P_IPC_BURST],
               (unsigned long long)c[STAT_P2P_IPC_BURST_LAUNCHES]);
    if (c[STAT_P2P_IPC_WAITS_SHARED])
        APPEND(" | gpu-to-gpu receives waited with an earlier one=%llu", (unsigned long long)c[STAT_P2P_IPC_WAITS_SHARED]);
    if (c[STAT_P2P_PIPELINED_SEND] + c[STAT_P2P_PIPELINED_RECV])
        APPEND(" | pipelined send=%llu recv=%llu chunks=%llu", (unsigned long long)c[STAT_P2P_PIPELINED_SEND],
               (unsigned long long)c[STAT_P2P_PIPELINED_RECV], (unsigned long long)c[STAT_P2P_PIPELINED_CHUNKS]);
    if (c[STAT_PACK_RACES])
        APPEND(" | pack races=%llu one a step won=%llu", (unsigned long long)c[STAT_PACK_RACES],
               (unsigned long long)c[STAT_PACK_RACES_ONE]);
    if (c[STAT_UNPACK_PROBES])
        APPEND(" | unpack probes=%llu warm=%llu (%.0f ns a probe)", (unsigned long long)c[STAT_UNPACK_PROBES],
               (unsigned long long)c[STAT_UNPACK_PROBES_WARM], (double)c[STAT_UNPACK_PROBE_NS] / (double)c[STAT_UNPACK_PROBES]);
    if (c[STAT_DEVICE_SETTLED]) APPEND(" | device settled together=%llu", (unsigned long long)c[STAT_DEVICE_SETTLED]);
    if (c[STAT_DEVICE_ASYNC]) APPEND(" | device packs not waited for=%llu", (unsigned long long)c[STAT_DEVICE_ASYNC]);
    if (c[STAT_DEVICE_HELD])
        APPEND(" | device packs held=%llu in launches=%llu flushes=%llu (overlap %llu)",
               (unsigned long long)c[STAT_DEVICE_HELD], (unsigned long long)c[STAT_DEVICE_HOLD_LAUNCHES],
               (unsigned long long)c[STAT_DEVICE_HOLD_FLUSHES], (unsigned long long)c[STAT_DEVICE_HOLD_OVERLAPS]);
    if (c[STAT_POINTER_CACHE_HITS] + c[STAT_POINTER_CACHE_ASKED])
        APPEND(" | device pointers kept: hits=%llu asked=%llu forgotten=%llu", (unsigned long long)c[STAT_POINTER_CACHE_HITS],
               (unsigned long long)c[STAT_POINTER_CACHE_ASKED], (unsigned long long)c[STAT_POINTER_CACHE_FORGETS]);
    if (c[STAT_DEVICE_DEFERRED])
        APPEND(" | unpacks batched=%llu in launches=%llu", (unsigned long long)c[STAT_DEVICE_DEFERRED],
               (unsigned long long)c[STAT_DEVICE_BATCH_LAUNCHES]);
    if (c[STAT_WAITALL_ROUNDS_CALLS])
        APPEND(" | waitall in rounds=%llu rounds=%llu early launches=%llu", (unsigned long long)c[STAT_WAITALL_ROUNDS_CALLS],
               (unsigned long long)c[STAT_WAITALL_ROUNDS], (unsigned long long)c[STAT_WAITALL_EARLY_LAUNCHES]);
    if (c[STAT_STAGING_ALLOCS]) APPEND(" | staging allocated=%llu", (unsigned long long)c[STAT_STAGING_ALLOCS]);
    if (c[STAT_PLACEMENT_CALLS])
        APPEND(" | placement calls=%llu cut before=%llu after=%llu", (unsigned long long)c[STAT_PLACEMENT_CALLS],
               (unsigned long long)c[STAT_PLACEMENT_CUT_BEFORE], (unsigned long long)c[STAT_PLACEMENT_CUT_AFTER]);
    APPEND(" | fallbacks:");
    int any = 0;
    for (int i = 0; i < FALLBACK_REASON_COUNT; i++)
        if (load(&fallbacks[i])) {
            APPEND(" %s=%llu", fallback_reason_name[i], (unsigned long long)load(&fallbacks[i]));
            any = 1;
        }
    if (!any) APPEND(" none");
    fprintf(out, "%s\n", line);
    fflush(out);
}
