/* Per-process counters: always counted (relaxed atomics), printed at MPI_Finalize when
 * COMMLIB_STATS=1, readable any time through commlib_stat(). */
#ifndef COMMLIB_STATS_H
#define COMMLIB_STATS_H

#include <stdint.h>
#include <stdio.h>

enum stat_counter {
    STAT_PACK_CALLS, STAT_PACK_FAST, STAT_PACK_FALLBACK, STAT_PACK_BYTES, STAT_PACK_NS,
    STAT_UNPACK_CALLS, STAT_UNPACK_FAST, STAT_UNPACK_FALLBACK, STAT_UNPACK_BYTES, STAT_UNPACK_NS,
    STAT_PACK_SIZE_CALLS,
    STAT_TYPES_COMMITTED, STAT_TYPES_CANONICAL, STAT_TYPES_UNSUPPORTED,
    STAT_P2P_STAGED_SEND, STAT_P2P_STAGED_RECV, /* point-to-point calls through host staging */
    STAT_P2P_STAGED_TYPED, /* of those, typed span copies (types commlib does not pack) */
    STAT_P2P_PARTITIONS,   /* partitions of staged partitioned requests moved (MPI_Pready, on arrival) */
    /* the method of each device message (transfer/model.h), in transfer_method order;
       aware contiguous messages are handed to the MPI unstaged, counted here only */
    STAT_METHOD_SEND_ONESHOT, STAT_METHOD_SEND_DEVICE, STAT_METHOD_SEND_AWARE,
    STAT_METHOD_RECV_ONESHOT, STAT_METHOD_RECV_DEVICE, STAT_METHOD_RECV_AWARE,
    STAT_P2P_HANDED_OFF, /* device buffers handed to a CUDA-aware MPI as they are (no staging) */
    STAT_P2P_IPC_SEND, STAT_P2P_IPC_RECV, STAT_P2P_IPC_FALLBACK, /* GPU to GPU (transfer/ipc.h); fallback: staged instead */
    STAT_P2P_IPC_DIRECT, /* of the GPU-to-GPU sends, those the receiver copied from the program's buffer itself */
    STAT_P2P_IPC_DIRECT_SETTLED, /* of those, the ones that first waited for the program's legacy-stream work */
    STAT_P2P_IPC_ACKS,         /* GPU-to-GPU receives acknowledged to another process */
    STAT_P2P_IPC_ACK_MESSAGES, /* the messages that carried them (ipc_ack_batch_end: several in one) */
    STAT_P2P_IPC_ONE_PASS, /* of the strided direct receives, those moved piece to piece in one pass */
    STAT_P2P_IPC_BURST, /* of the GPU-to-GPU sends, those whose pack waited for its burst's one launch */
    STAT_P2P_IPC_BURST_LAUNCHES, /* the launches of those packs */
    STAT_P2P_IPC_WAITS_SHARED, /* GPU-to-GPU receives whose burst a wait queued for an earlier one covered */
    STAT_P2P_PIPELINED_SEND, STAT_P2P_PIPELINED_RECV, STAT_P2P_PIPELINED_CHUNKS, /* transfer/pipeline.h */
    STAT_COLLECTIVE_STAGED,
    STAT_PLACEMENT_CALLS, STAT_PLACEMENT_CUT_BEFORE, STAT_PLACEMENT_CUT_AFTER, /* rank placement (edge weights) */
    STAT_PROGRESS_COMPLETED, /* staged operations the progress thread finished before any completion call */
    STAT_PROGRESS_POLLS,     /* the progress thread's polls of the host MPI */
    STAT_PROGRESS_BUSY_PAUSES, /* its pauses of COMMLIB_PROGRESS_BUSY_US: the program had called the MPI since its last poll */
    STAT_DEVICE_SETTLED, /* device unpacks and copies that completion calls waited for together (device_batch) */
    STAT_DEVICE_DEFERRED, STAT_DEVICE_BATCH_LAUNCHES, /* unpacks (and a direct receive's packs) queued for batched launches; the launches (device_pack.h) */
    STAT_DEVICE_ASYNC,   /* device MPI_Pack/MPI_Unpack left queued, not waited for (COMMLIB_DEVICE_PACK_ASYNC, cuda/device.h) */
    /* of those, held back and launched together (COMMLIB_DEVICE_PACK_HOLD, pack/device_hold.h): the ops, their
       launches, the times held ops were launched, of those the times an op overlapping a held one made them */
    STAT_DEVICE_HELD, STAT_DEVICE_HOLD_LAUNCHES, STAT_DEVICE_HOLD_FLUSHES, STAT_DEVICE_HOLD_OVERLAPS,
    /* device pointers answered from the allocations kept while CUPTI watches, those the driver was asked
       about then, and the times a CUDA call that may allocate, free or map memory emptied it (cuda/pointer_cache.h) */
    STAT_POINTER_CACHE_HITS, STAT_POINTER_CACHE_ASKED, STAT_POINTER_CACHE_FORGETS,
    STAT_STAGING_ALLOCS, /* pinned and device staging buffers allocated: the pool had none (transfer/staging.c) */
    /* device contexts by where their pack kernels came from (pack/device_pack.c) */
    STAT_KERNELS_FATBIN, STAT_KERNELS_NVRTC, STAT_KERNELS_CACHED, STAT_KERNELS_NONE,
    STAT_KERNELS_COMPILE_NS, /* time NVRTC spent compiling them */
    /* the collective engine (native/engine) */
    STAT_ENGINE_OPS, STAT_ENGINE_SHM_OPS, STAT_ENGINE_MPI_OPS, /* operations; steps by transport */
    STAT_ENGINE_DEVICE_STAGED, STAT_ENGINE_MISMATCH,
    STAT_ENGINE_IALLREDUCE, /* a C program's MPI_Iallreduce served by the engine */
    /* MPI_Waitall calls over large device receives finished in rounds as messages arrived, their
       rounds, and the launches of queued copies a round made before the last message (interpose/request.c) */
    STAT_WAITALL_ROUNDS_CALLS, STAT_WAITALL_ROUNDS, STAT_WAITALL_EARLY_LAUNCHES,
    /* host pack pieces whose rows raced two loops (COMMLIB_ROW_RACE), and of those the ones one
       block a step won (pack/host_pack.c) */
    STAT_PACK_RACES, STAT_PACK_RACES_ONE,
    /* host unpack pieces whose first blocks were timed to decide the prefetch (COMMLIB_UNPACK_PROBE),
       of those the ones found in cache (unpacked without it), and the probes' time, ns (pack/host_pack.c) */
    STAT_UNPACK_PROBES, STAT_UNPACK_PROBES_WARM, STAT_UNPACK_PROBE_NS,
    STAT_COUNTER_COUNT
};

/* Why a call went to the host MPI instead of commlib's own path. */
enum fallback_reason {
    FALLBACK_NO_PACK_KNOB,   /* COMMLIB_NO_PACK=1 */
    FALLBACK_UNKNOWN_TYPE,   /* handle never committed through commlib (or invalid) */
    FALLBACK_UNSUPPORTED,    /* type did not reduce to strided pieces */
    FALLBACK_BAD_ARGUMENT,   /* left to the host MPI so it raises its own error */
    FALLBACK_TRUNCATE,       /* buffer too small: the host MPI raises the error */
    FALLBACK_REASON_COUNT
};

/* Why a committed type is left to the host MPI (see datatype/canonical.c). */
enum type_reason {
    TYPE_REASON_NONE,
    TYPE_REASON_COMBINER,        /* darray, f90, value-index, unknown */
    TYPE_REASON_NAMED_HOLES,     /* predefined type with gaps (MPI_SHORT_INT, ...) */
    TYPE_REASON_TOO_MANY_PIECES, /* irregular: more pieces than COMMLIB_MAX_PIECES */
    TYPE_REASON_TOO_MANY_DIMS,
    TYPE_REASON_LARGE_COUNT,     /* large-count constructor layout not decoded */
    TYPE_REASON_OVERFLOW,        /* sizes beyond 64-bit arithmetic */
    TYPE_REASON_MPI_ERROR,       /* the MPI refused an envelope/contents query */
    TYPE_REASON_PADDED_ELEMENT,  /* long double: the MPI copies only its value bytes */
    TYPE_REASON_MPI_DISAGREES,   /* the MPI's true bounds differ from the type map's */
    TYPE_REASON_EMPTY_PART,      /* a count-0 / length-0 / size-0 part somewhere in the tree */
    TYPE_REASON_COUNT
};

extern const char *const fallback_reason_name[FALLBACK_REASON_COUNT];
extern const char *const type_reason_name[TYPE_REASON_COUNT];

/* Adds to this thread's own counters (no atomic read-modify-write: only this thread writes
 * them; a relaxed store keeps concurrent readers tear-free).  Inline: it is on every pack. */
extern __thread uint64_t *stat_my_counters; /* 0 until this thread's first count */
void stat_add_slow(enum stat_counter c, uint64_t v);
static inline void stat_add(enum stat_counter c, uint64_t v)
{
    uint64_t *mine = stat_my_counters;
    if (__builtin_expect(mine != 0, 1)) __atomic_store_n(&mine[c], mine[c] + v, __ATOMIC_RELAXED);
    else stat_add_slow(c, v);
}
void stat_fallback(enum fallback_reason r);
void stat_type_unsupported(enum type_reason r);
uint64_t stat_now_ns(void);

/* Writes the per-rank report (several lines, each prefixed). */
void stats_print(FILE *out, int rank);

#endif
