/* Knobs: every COMMLIB_* environment variable, read once (first MPI_Init or first use). */
#ifndef COMMLIB_CONFIG_H
#define COMMLIB_CONFIG_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

enum log_level { LOG_ERROR = 0, LOG_WARN = 1, LOG_INFO = 2, LOG_DEBUG = 3 };

struct commlib_config {
    int disable;    /* COMMLIB_DISABLE: forward every call to PMPI_* untouched */
    int no_pack;    /* COMMLIB_NO_PACK: forward MPI_Pack/Unpack to the host MPI */
    int stats;      /* COMMLIB_STATS: print per-rank counters at MPI_Finalize */
    int log_level;  /* COMMLIB_LOG */
    int max_pieces; /* COMMLIB_MAX_PIECES: strided pieces a type may reduce to */
    int tail_first; /* COMMLIB_TAIL_FIRST: host pack copies far rows last bytes first (pack/host_pack.c) */
    int avx512;     /* COMMLIB_AVX512: host pack moves 129-256-byte blocks in 64-byte loads (pack/host_pack.c) */
    int row_probe;  /* COMMLIB_ROW_PROBE: host pack times a first row of 4 KiB+, rep movsb if cached (pack/host_pack.c) */
    int unpack_prefetch; /* COMMLIB_UNPACK_PREFETCH: host unpack prefetches 8-16-byte blocks far apart (pack/host_pack.c) */
    int unpack_probe;    /* COMMLIB_UNPACK_PROBE: 24-byte blocks' prefetch only where a piece's first blocks came out of cache (pack/host_pack.c) */
    int unpack_probe_small; /* ... and 8-16-byte blocks' (COMMLIB_UNPACK_PROBE=1 only, not auto) */
    int loads_first;     /* COMMLIB_LOADS_FIRST: host pack moves 65-256-byte blocks with gaps all loads first (pack/host_pack.c) */
    int gap_memcpy; /* COMMLIB_GAP_MEMCPY: host pack copies 512 B+ blocks with gaps by memcpy (pack/host_pack.c) */
    int aliased_rows; /* COMMLIB_ALIASED_ROWS: host pack of tiny blocks 1 KiB-multiples apart one a step (pack/host_pack.c) */
    int aliased_calls; /* COMMLIB_ALIASED_CALLS: ... of 12-, 16-, 24-byte blocks so, one a step by a memcpy call (pack/host_pack.c) */
    int wide_rows;     /* COMMLIB_WIDE_ROWS: host pack of 24-byte blocks 32-127 bytes apart by 32-byte moves (pack/host_pack.c) */
    int few_rows;      /* COMMLIB_FEW_ROWS: host pack of under 8 rows back to back by memcpy each (pack/host_pack.c) */
    int long_rows;     /* COMMLIB_LONG_ROWS: host pack of blocks <= 8 bytes 256 B-4 KiB apart in long rows with prefetches, 8-32 bytes over 16-128 MiB by memcpy calls (pack/host_pack.c) */
    int unpack_memcpy; /* COMMLIB_UNPACK_MEMCPY: host unpack of 4 KiB+ rows a page apart by memcpy each (pack/host_pack.c) */
    int aligned_rows;  /* COMMLIB_ALIGNED_ROWS: host unpack of 64 B+ rows a page apart (below 4 KiB where COMMLIB_UNPACK_MEMCPY is on) with 32-byte-aligned stores (pack/host_pack.c) */
    int aligned_stream; /* COMMLIB_ALIGNED_STREAM: host pack/unpack of 128 B+ rows back to back (a z face) with 32-byte-aligned stores (pack/host_pack.c) */
    int next_group;    /* COMMLIB_NEXT_GROUP: host pack/unpack asks for the next group of rows' first line (pack/host_pack.c) */
    int page_blocks;  /* COMMLIB_PAGE_BLOCKS: host pack of 1-8-byte blocks a page apart 4 a step when cached (pack/host_pack.c) */
    int row_race;     /* COMMLIB_ROW_RACE: host pack of 8/16-byte blocks far apart races the kernel's loop and one a step on a piece's first rows (pack/host_pack.c) */
    int gpu;        /* COMMLIB_GPU: 0 = treat every buffer as host memory (no CUDA calls) */
    int stage_host; /* COMMLIB_STAGE_HOST: send host buffers through the staged device path
                       (exercises the request machinery on machines without a GPU) */
    int placement;      /* COMMLIB_PLACEMENT: place ranks on MPI_Dist_graph_create_adjacent(reorder=1) */
    int ranks_per_node; /* COMMLIB_RANKS_PER_NODE: pretend nodes of this many ranks (0: real nodes) */
    int ipc;            /* COMMLIB_IPC: device sends within a node go GPU to GPU (transfer/ipc.h) */
    int pipeline;       /* COMMLIB_PIPELINE: large device sends across the host in chunks (transfer/pipeline.h) */
    int ipc_small;      /* COMMLIB_IPC_SMALL: device messages under 192 bytes GPU to GPU too (transfer/ipc.h) */
    int ipc_burst_us; /* COMMLIB_IPC_BURST_US: a burst of GPU-to-GPU sends' packs launches after this idle time (0: off) */
    int ipc_direct_bytes; /* COMMLIB_IPC_DIRECT_BYTES: nonblocking sends this long may be direct (transfer/ipc.h) */
    int device_pack_async; /* COMMLIB_DEVICE_PACK_ASYNC: device-to-device MPI_Pack/MPI_Unpack stream-ordered (cuda/device.h) */
    int device_pack_hold;  /* COMMLIB_DEVICE_PACK_HOLD: ... and held back, launched together (pack/device_hold.h) */
    int pointer_cache;     /* COMMLIB_POINTER_CACHE: device allocations kept while CUPTI watches (cuda/pointer_cache.h) */
    int early_launch_bytes; /* COMMLIB_EARLY_LAUNCH_BYTES: a Waitall's device receives arrived launch once this much is queued (0: off; interpose/request.c) */
    int batch_unpack;   /* COMMLIB_BATCH_UNPACK: a completion call's GPU-to-GPU unpacks in one launch (pack/device_pack.h) */
    int method;         /* COMMLIB_METHOD: -1 auto, else a forced transfer_method (transfer/model.h) */
    int cuda_aware;     /* COMMLIB_CUDA_AWARE: -1 auto (ask the MPI), 0 no, 1 yes (the user asserts it) */
    const char *model;  /* COMMLIB_MODEL: NULL auto (the cache file), "0" none, else a path */
    int progress;             /* COMMLIB_PROGRESS: 0 none, 1 thread (progress/thread.h) */
    int progress_interval_us; /* COMMLIB_PROGRESS_INTERVAL_US: pause between polls, 0 = yield */
    int progress_busy_us;     /* COMMLIB_PROGRESS_BUSY_US: pause after a poll the program's MPI calls overlapped */
    int kernels;              /* COMMLIB_KERNELS: where the device pack kernels come from (enum kernel_route) */
    const char *nvrtc;        /* COMMLIB_NVRTC: libnvrtc to try first; NULL: search (pack/nvrtc.c) */
    /* the collective engine (native/engine/engine.h) */
    int engine_transport_mpi; /* COMMLIB_ENGINE_TRANSPORT=mpi: no shared-memory transport */
    int engine_thread;        /* COMMLIB_ENGINE_THREAD */
    int engine_check;         /* COMMLIB_ENGINE_CHECK: compare signatures on the MPI path */
    int engine_iallreduce;    /* COMMLIB_ENGINE_IALLREDUCE: serve MPI_Iallreduce (with the progress thread) */
    int engine_slice_kb, engine_depth, engine_chunk_kb, engine_small_kb;
};

enum kernel_route {
    KERNELS_AUTO,   /* the embedded fatbin; NVRTC when there is none or it does not load */
    KERNELS_FATBIN, /* the embedded fatbin only */
    KERNELS_NVRTC,  /* compiled at run time by NVRTC even when a fatbin exists */
    KERNELS_NONE    /* no kernels: device buffers are staged through the host */
};

extern struct commlib_config commlib_config;

/* Reads the knobs exactly once; cheap to call on every entry (one load once they are
 * read: pthread_once's call showed in the profile of a 1 KiB MPI_Pack). */
extern int commlib_config_ready;
void commlib_config_init_slow(void);
static inline void commlib_config_init(void)
{
    if (__builtin_expect(!__atomic_load_n(&commlib_config_ready, __ATOMIC_ACQUIRE), 0)) commlib_config_init_slow();
}
size_t commlib_config_knobs_json(char *buf, size_t len);

/* A measuring hook (COMMLIB_TEST_*, not a user knob, not in the knob table), read once into
 * *cached (start at -1; a race writes the same value): 1 when the variable `name` is set to
 * a positive number. */
static inline int test_hook(const char *name, int *cached)
{
    if (*cached < 0) {
        const char *v = getenv(name);
        *cached = v && atoi(v) > 0;
    }
    return *cached;
}

/* A hook that forces a choice either way: 1 or 0 where the variable `name` is set (a positive
 * number or not), -1 where it is unset or empty; read once into *cached (start at -2). */
static inline int test_choice(const char *name, int *cached)
{
    if (*cached == -2) {
        const char *v = getenv(name);
        *cached = v && *v ? atoi(v) > 0 : -1;
    }
    return *cached;
}

/* A test hook's positive number, read once into *cached (0 until then; a race writes the same
 * value); `fallback` where the variable is unset or not positive. */
static inline int64_t test_number(const char *name, int64_t *cached, int64_t fallback)
{
    if (!*cached) {
        const char *v = getenv(name);
        long long test = v && *v ? atoll(v) : 0;
        *cached = test > 0 ? test : fallback;
    }
    return *cached;
}

#endif
