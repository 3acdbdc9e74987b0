#include "config.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <limits.h>
#include <string.h>
#include <strings.h>

#include "log.h"

/* the rest 0 */
struct commlib_config commlib_config = {.log_level = LOG_WARN, .max_pieces = 64, .gpu = 1, .method = -1, .cuda_aware = -1};

/* The one table of knobs: name, default, meaning.  README's table mirrors it and
 * `commlib info` prints it with the values in effect. */
static const struct knob {
    const char *name, *default_value, *meaning;
} knobs[] = {
    {"COMMLIB_DISABLE", "0", "1: forward every MPI call to the host MPI untouched"},
    {"COMMLIB_NO_PACK", "0", "1: forward MPI_Pack/MPI_Unpack to the host MPI"},
    {"COMMLIB_STATS", "0", "1: print per-rank counters at MPI_Finalize"},
    {"COMMLIB_LOG", "warn", "log level: error, warn, info, debug"},
    {"COMMLIB_MAX_PIECES", "64", "most strided pieces a datatype may reduce to before it is left to the host MPI"},
    {"COMMLIB_AVX512", "auto", "host MPI_Pack: blocks of 129-256 B with gaps between them copied by four 64-byte loads, then the stores; auto: on AMD CPUs with AVX-512 (Zen 4/5), 1/0 forces it (1 needs AVX-512F) (pack/host_pack.c)"},
    {"COMMLIB_ROW_PROBE", "auto", "host MPI_Pack/MPI_Unpack: 8 or more rows of 4 KiB and more (a 512^3 grid's z face) - the first one copied by the loop and timed, the rest by rep movsb when it came from cache (faster there), else by the loop (faster out of cache); auto: on AMD CPUs (x86-64 only), 1/0 forces it (pack/host_pack.c)"},
    {"COMMLIB_TAIL_FIRST", "auto", "host MPI_Pack/MPI_Unpack: rows of 256 B-16 KiB alone or in groups of under 8 (a halo's y face) copied last 128 bytes first; auto: on AMD CPUs with AVX-512, Zen 4/5 (faster out of cache there; not on Zen 3 nor Intel's, where the forward loops measured faster), 1/0 forces it (pack/host_pack.c)"},
    {"COMMLIB_UNPACK_PREFETCH", "auto", "host MPI_Unpack: blocks of 8-16 bytes 256 B to 4 KiB apart (a halo's x face) prefetched 16 blocks ahead; where off, no prefetch and the kernel's 16 blocks an iteration addressed from two bases; auto: on, but off on AMD CPUs (faster without it there, warm and out of cache; on Intel's it made these unpacks 1.3-2.2x faster out of cache), 1/0 forces it (pack/host_pack.c)"},
    {"COMMLIB_UNPACK_PROBE", "auto", "host MPI_Unpack: where blocks of 8-24 bytes 256 B to 4 KiB apart would be prefetched (COMMLIB_UNPACK_PREFETCH for 8-16 bytes; always for 24), a piece's (of 1024 blocks or more) first 64 are unpacked without the prefetch and timed, and the rest go without it when those came from cache (under 14 ns a block), with it otherwise (the prefetch pays out of cache: GPU host's Emerald Rapids, stop 49, the x faces unpacked cold 2.04-2.16x MPICH's with it, 0.95-1.10x without); unpack.probes, unpack.probes_warm and unpack.probe_ns count the probes, those found in cache and their time; auto: 24-byte blocks only, on x86-64 CPUs other than AMD's (stop 50 there: 24-byte rows unpacked warm 0.91-1.04x -> 0.96-0.98x MPICH's with it, 8-16-byte ones 1.08-1.34x -> 0.96-1.00x; on Zen 3, where only 24-byte blocks are prefetched, within noise); 24 the same anywhere, 1 all of 8-24 bytes, 0 off (pack/host_pack.c)"},
    {"COMMLIB_LOADS_FIRST", "auto", "host MPI_Pack: blocks of 65-256 B with gaps between them (a vector of 128 or 256 B blocks 512 B apart) copied all loads first, then the stores, in 32-byte moves (AVX2; glibc's memcpy pattern for these sizes) instead of commlib's load-store loop; where COMMLIB_AVX512 is on, 129-256 B keep its 64-byte moves; auto: on (x86-64 with AVX2: the GPU host's Emerald Rapids, stop 50, vec_1KiB_b128/b256_s512 0.99x/0.86x -> 1.19x/1.12x Open MPI's pack; Zen 3 1.06x/1.06x -> 1.32x/1.22x, 1 MiB of 128 B blocks 0.99x -> 1.12x; Zen 4/5 not measured), 0 turns it off (pack/host_pack.c)"},
    {"COMMLIB_GAP_MEMCPY", "auto", "host MPI_Pack: blocks of 512 B and more with gaps of 64 B-4 KiB between them (a vector of 512 B blocks 1 KiB apart) copied by the C library's memcpy per block instead of commlib's 32-byte loop; auto: on (Zen 3: 0.90x -> 0.96-1.00x Open MPI's pack; the GPU host's Emerald Rapids, stop 50: vec_1KiB_b512_s1024 0.79x -> 0.95x), 1/0 forces it (pack/host_pack.c)"},
    {"COMMLIB_ALIASED_CALLS", "auto", "host MPI_Pack: blocks of 12, 16 or 24 bytes a multiple of 1 KiB apart (a power-of-two grid's z face: 65536 x 24 bytes 2 KiB apart, the shape of issue 8) packed one block a step by a call of the C library's memcpy, as the host MPIs do, instead of 16 or 8 a step with prefetches; auto: off (since stop 51: the GPU host's Emerald Rapids, face_z_t2/t3 1.65x/1.46x -> 1.13x/1.12x Open MPI's pack with it and 1.00x/1.94x -> 0.74x/1.36x MPICH's; slower on Zen 3 too; before, on for Intel: the dev VM's Xeon of stops 42-45 had gone from 0.75-0.82x to 0.99-1.02x Open MPI's with it), 1/0 forces it (pack/host_pack.c)"},
    {"COMMLIB_WIDE_ROWS", "auto", "host MPI_Pack: blocks of 24 bytes 32-127 bytes apart (a vector of 24-byte blocks 48 apart) packed by one 32-byte load and store each (AVX2), reading up to 8 bytes of the gap after each block but the row's last; auto: on x86-64 CPUs other than AMD's (the dev VM's Xeon: vec_1MiB/4MiB_b24_s48 0.88-0.93x -> 1.03-1.09x Open MPI's pack; within noise on Zen 3), 1/0 forces it (pack/host_pack.c)"},
    {"COMMLIB_FEW_ROWS", "auto", "host MPI_Pack: rows of 256 B-16 KiB less than a line apart, under 8 a call (a y face's 1-3 rows a plane) copied by the C library's memcpy each, instead of the streaming loop with prefetches; auto: off (stop 48, the GPU host's Sapphire Rapids against MPICH: the y faces of radius 2-3 packed cold 0.95-1.11x with it, 1.34-1.40x without, warm 0.96-1.15x / 1.05-1.62x; the dev VM's Xeon had measured cold 0.90-0.98x -> 0.96-1.05x Open MPI's with it; Zen 3: the y faces packed 1.213x Open MPI's without, 1.179x with), 1/0 forces it (pack/host_pack.c)"},
    {"COMMLIB_LONG_ROWS", "auto", "host MPI_Pack: blocks of up to 8 bytes 256 B to 4 KiB apart, in rows of 262144 blocks or more (a vector of 4-byte elements 512 bytes apart over 128 MiB), packed one a step with a prefetch 16 blocks ahead instead of 16 a step, and rows of 8- to 32-byte blocks 256 B-4 KiB apart spanning 16-128 MiB (those aside) by a memcpy call a block; auto: on x86-64 CPUs other than AMD's (the dev VM's Xeon: vec_1MiB_b4_s512 0.87-0.91x -> 1.03-1.05x Open MPI's pack, the other 1-8-byte vectors of such rows 4-17 % faster against both MPIs; slower on Zen 3), 1/0 forces it (pack/host_pack.c)"},
    {"COMMLIB_ALIGNED_ROWS", "auto", "host MPI_Unpack: rows of 64 bytes and more at least a page apart that memcpy does not take (a 256^3 grid's y face of radius 1: one 2 KiB row a plane) stored by 32-byte moves aligned to the destination, first and last 32 bytes unaligned; auto: on x86-64 CPUs other than AMD's (the dev VM's Xeon: halo256_q1_r1_y_unpack_warm 0.93x -> 1.09-1.10x Open MPI's unpack, 1.36-1.39x -> 1.57-1.58x MPICH's; within noise on Zen 3), 1/0 forces it (pack/host_pack.c)"},
    {"COMMLIB_UNPACK_MEMCPY", "auto", "host MPI_Unpack: rows of 4 KiB and more at least a page apart (a 512^3 grid's y face of radius 1) copied by the C library's memcpy each instead of the 32-byte loop; auto: on x86-64 CPUs other than AMD's (the dev VM's Xeon: halo512_q1_r1_y_unpack_cold 0.93x -> 1.01-1.02x Open MPI's unpack; slower on Zen 3), 1/0 forces it (pack/host_pack.c)"},
    {"COMMLIB_ALIGNED_STREAM", "auto", "host MPI_Pack/MPI_Unpack: rows of 128 B and more less than a line apart (a z face: 2 KiB rows, the ghost cells between them) stored by 32-byte moves aligned to the destination (first and last 32 bytes unaligned), with the streaming loop's prefetches; auto: on x86-64 CPUs other than AMD's (the GPU host's Emerald Rapids: halo256_q1_r1_z warm 0.84-0.91x -> 1.09-1.12x Open MPI's, the warm z faces of radius 1 1.31x -> 1.43x MPICH's, cold within noise; Zen 3: the z faces 1.568x -> 1.537x MPICH's, cold 3-4 % slower), 1/0 forces it (pack/host_pack.c)"},
    {"COMMLIB_NEXT_GROUP", "auto", "host MPI_Pack/MPI_Unpack: groups of rows a page or more apart (a y face of radius 2-3: 2-3 rows a plane), and rows of 256 B and more alone that far apart (radius 1) - the next group's or row's first line prefetched before this one is copied; auto: on x86-64 (the dev VM's Xeon: the y faces of radius 2-3 out of cache 0.93-1.06x -> 1.05-1.25x Open MPI's; Zen 3, tail first off: the y faces 0.98x -> 1.15x Open MPI's, the rows of radius 1 then 1.00x -> 1.29x; the GPU host's Sapphire Rapids, stop 48: rows of radius 1 within noise of MPICH's but the 4 KiB ones unpacked cold 0.98x -> 1.10x, COMMLIB_ALIGNED_ROWS' loop not asking; Zen 4/5 not measured), 1/0 forces it (pack/host_pack.c)"},
    {"COMMLIB_PAGE_BLOCKS", "auto", "host MPI_Pack: blocks of 1-8 bytes 4 KiB or more apart (a 512^3 grid's x face: each block a TLB miss) - a piece's first 64 packed 16 a step and timed, the rest 4 a step when they came from cache (under 40 ns a block), else 16; auto: on x86-64 CPUs other than AMD's (the dev VM's Xeon: halo512_q1_r1_x_pack_warm 0.88-0.90x -> 1.03-1.08x Open MPI's pack, cold unchanged; slower on Zen 3), 1/0 forces it (pack/host_pack.c)"},
    {"COMMLIB_ROW_RACE", "auto", "host MPI_Pack: pieces of 16 rows or more of 8- or 16-byte blocks 256 B to a page apart (a 256^3 grid's x face), or of 8-byte blocks a page or more apart found in cache by COMMLIB_PAGE_BLOCKS' probe (a 512^3 grid's), race two loops - the kernel's own (16 or 4 a step) and one block a step: each shape's first 4 pieces (per thread; warm and cold apart) take them alternately, timed whole, its later pieces the faster; auto: on x86-64, 1/0 forces it (pack/host_pack.c)"},
    {"COMMLIB_ALIASED_ROWS", "auto", "host MPI_Pack: blocks of 1, 2, 4, 8, 12 or 16 bytes a multiple of 1 KiB apart (a power-of-two grid's z face: every block in the same few cache sets) packed one block a step with a prefetch 16 blocks ahead, instead of 16 blocks a step; auto: on x86-64 CPUs (Zen 3: 8-byte blocks 2 KiB apart 0.91-0.93x -> 1.02-1.09x MPICH's pack; a Xeon of the Sapphire Rapids class, stop 53: 0.86-0.98x -> 1.05-1.09x; Emerald Rapids not measured), off elsewhere; 1/0 forces it (pack/host_pack.c)"},
    {"COMMLIB_GPU", "1", "0: treat every buffer as host memory (no CUDA calls at all)"},
    {"COMMLIB_PLACEMENT", "0", "1 (opt-in, for programs written for it): MPI_Dist_graph_create_adjacent with reorder=1 gives new rank v the role of vertex v (the lists comm_old rank v passed) and places ranks on nodes; 0: left to the host MPI, each process keeps its own edges"},
    {"COMMLIB_RANKS_PER_NODE", "0", "placement: treat consecutive blocks of this many ranks as nodes (0: the real nodes)"},
    {"COMMLIB_STAGE_HOST", "0", "1 (testing): send host buffers through the staged GPU path, as if they were device memory"},
    {"COMMLIB_PROGRESS", "none", "thread: a progress thread per rank advances nonblocking operations (needs MPI_THREAD_MULTIPLE)"},
    {"COMMLIB_METHOD", "auto", "device buffers in point-to-point: auto (the model picks), oneshot, device or aware (forced)"},
    {"COMMLIB_PIPELINE", "0", "1 (opt-in): device sends of 1 MiB and more that cross the host (other nodes, or no GPU-to-GPU path) move in chunks, copies off and onto the GPU overlapping the host MPI's transfer; the receive must be a device receive through commlib, not probed (transfer/pipeline.h); set on every rank"},
    {"COMMLIB_IPC", "0", "1 (opt-in): device sends to ranks of the same node go GPU to GPU (CUDA IPC), not through the host; the receive must be a device receive through commlib, not probed (transfer/ipc.h); set on every rank"},
    {"COMMLIB_IPC_SMALL", "1", "with COMMLIB_IPC=1 (on only where no rank of the node turns it off): device messages under a descriptor's 192 bytes go GPU to GPU too, not staged (a halo's corners: no copy off the GPU and wait per message); a device receive of under 192 bytes is then posted for 192 (a longer message still truncates as MPI says); the same contract as COMMLIB_IPC, now for small messages too; 0: they are staged (before stop 36 the default)"},
    {"COMMLIB_IPC_DIRECT_BYTES", "0", "GPU to GPU with the progress thread on every rank, opt-in: nonblocking device sends of at least this many bytes (192 and up; 0: off), contiguous or one strided piece of up to 3 dimensions, are read from the sender's own buffer by the receiver (the sender launches nothing; the send completes when the receiver has the data, as MPI_Issend would); measured slower than the arena for a halo's messages, faster for large strided ones. 0: direct messages are contiguous sends of 1 MiB and more only"},
    {"COMMLIB_IPC_BURST_US", "20", "GPU to GPU (COMMLIB_IPC=1), without the progress thread: the packs of nonblocking device sends into the arena are left queued and launched together - by the next completion call, blocking receive or send, or by commlib's burst thread once no send came for this many microseconds - one kernel per burst instead of one launch and event record each (the receiver's stream waits for a value the sender writes after them); 0: every send launches its own pack"},
    {"COMMLIB_BATCH_UNPACK", "1", "0: a completion call's GPU-to-GPU receives are unpacked one launch each, each after its own wait for the sender's event, instead of in one launch per word size after one wait per sender (for A/B runs)"},
    {"COMMLIB_DEVICE_PACK_ASYNC", "0", "1 (opt-in): MPI_Pack/MPI_Unpack with input and output in device memory return once their kernel is queued, without waiting for it: the result is ready for commlib's later calls and for work on the legacy default stream (cudaMemcpy, kernels launched without a stream, torch and cupy's default streams), but work on a non-blocking or per-thread default stream must synchronise first (cudaDeviceSynchronize); a halo exchange in pack mode then skips its 52 waits (cuda/device.h); ignored over a CUDA-aware MPI"},
    {"COMMLIB_DEVICE_PACK_HOLD", "0", "1 (opt-in; implies COMMLIB_DEVICE_PACK_ASYNC, the same contract): such MPI_Pack/MPI_Unpack calls are held back and launched together, one kernel per direction and word size, at the entry of the process's next CUDA call that may queue work or read memory (seen through CUPTI's callbacks, which add ~0.5-0.8 us to each CUDA call while on), at MPI_Finalize, or before a call whose bytes overlap a held one's; a halo exchange in pack mode then launches a few kernels instead of 52 (pack/device_hold.h). Needs libcupti (COMMLIB_CUPTI) and CUPTI's one subscription (not under a profiler); without them, as COMMLIB_DEVICE_PACK_ASYNC=1"},
    {"COMMLIB_POINTER_CACHE", "1", "while CUPTI watches the process's CUDA calls (COMMLIB_DEVICE_PACK_HOLD=1): device allocations the driver named are kept by their range and reused by the next MPI calls on them instead of a pointer query each (156 an exchange in a 26-neighbour halo in pack mode), all forgotten at any CUDA call that may allocate, free or map memory (cuda/pointer_cache.h); and the context commlib made current on a thread is not made current again until a call that may switch contexts is seen; 0: every call asks the driver and sets the context"},
    {"COMMLIB_CUPTI", "auto", "libcupti.so for COMMLIB_DEVICE_PACK_HOLD, tried before the search (one already loaded, the sonames, CUDA_HOME, CUDA_PATH, /usr/local/cuda, the toolkit of the nvcc on PATH, /usr/local/cuda-*)"},
    {"COMMLIB_CUDA_AWARE", "auto", "auto: ask the MPI (MPIX_Query_cuda_support); 1: the MPI takes device pointers; 0: it does not"},
    {"COMMLIB_MODEL", "auto", "method model file: auto (~/.cache/commlib/model-HOST.txt, as written by commlib measure), a path, or 0 (built-in defaults)"},
    {"COMMLIB_KERNELS", "auto", "device pack kernels: auto (the embedded fatbin, else compiled by NVRTC), fatbin, nvrtc (compile at run time even with a fatbin), none (stage device buffers through the host)"},
    {"COMMLIB_NVRTC", "auto", "libnvrtc.so to compile the kernels with, tried before the search (sonames, CUDA_HOME, /usr/local/cuda, the nvidia pip wheels)"},
    {"COMMLIB_PROGRESS_INTERVAL_US", "0", "pause of the progress thread between polls; 0 yields the core instead (a sleep adds its wake-up latency, 50 us and more, to every completion)"},
    {"COMMLIB_PROGRESS_BUSY_US", "100", "pause of the progress thread after a poll during which the program called the MPI (it drives the MPI itself then, and polls of the thread's only contend with its calls for the MPI's and the CUDA driver's locks); while the program calls nothing the thread polls at full rate; longer pauses cost overlap (300: a 1 MiB Isend/Irecv overlapped 0-6 percent of its compute, against 47-58 percent at 100); 0: no such pause"},
    {"COMMLIB_ENGINE_TRANSPORT", "auto", "collective engine: auto (shared memory when every rank of the communicator is on one node, else the MPI's point-to-point) or mpi"},
    {"COMMLIB_ENGINE_THREAD", "1", "collective engine: 0 moves operations only inside wait/test (no thread of its own; also without MPI_THREAD_MULTIPLE)"},
    {"COMMLIB_ENGINE_CHECK", "1", "collective engine: 0 skips comparing the operation's signature across ranks on the MPI path (saves a small all-reduce per operation; a mismatch then may hang)"},
    {"COMMLIB_ENGINE_SLICE_KB", "64", "collective engine, shared memory: bytes per pipeline slice, in KiB"},
    {"COMMLIB_ENGINE_DEPTH", "4", "collective engine, shared memory: slices in flight per rank"},
    {"COMMLIB_ENGINE_CHUNK_KB", "128", "collective engine, MPI path: bytes per ring message, in KiB"},
    {"COMMLIB_ENGINE_SMALL_KB", "64", "collective engine, MPI path: all-reduces up to this many KiB use recursive doubling instead of the ring"},
    {"COMMLIB_ENGINE_IALLREDUCE", "1", "with COMMLIB_PROGRESS=thread: a program's MPI_Iallreduce of predefined types and ops is served by the collective engine (0: by the host MPI)"},
    /* The elastic engine (libcommlib_elastic.so, no MPI) reads these itself; listed here
     * so that README and `commlib info` show every knob in one place. */
    {"COMMLIB_ELASTIC_TIMEOUT", "2.5", "elastic: seconds of silence after which a peer (or the coordinator) counts as dead"},
    {"COMMLIB_ELASTIC_CONNECTIONS", "4", "elastic: TCP connections per ring neighbour; one all-reduce is striped over them"},
    {"COMMLIB_ELASTIC_CHUNK_KIB", "256", "elastic: pipeline chunk of the ring all-reduce, in KiB"},
    {"COMMLIB_ELASTIC_RATE_MBIT", "0", "elastic: per-peer egress rate of its data connections (ring, state transfer) in Mbit/s, shared by all of them; 0: unlimited (a slow link on one machine)"},
    {"COMMLIB_ELASTIC_LATENCY_MS", "0", "elastic: added one-way latency of the data connections: each ring chunk is sent this long after it became ready, each state-fetch answer this late"},
    {"COMMLIB_ELASTIC_JOIN_TIMEOUT", "300", "elastic: seconds update_topology and sync_state wait for the other members"},
    {"COMMLIB_ELASTIC_COORDINATOR", "none", "elastic: HOST:PORT[,HOST:PORT...] of the coordinator (and its standbys) when ElasticComm() is given none (set by elastic-run)"},
    {"COMMLIB_ELASTIC_FAILOVER_TIMEOUT", "10", "elastic: seconds a peer that lost its coordinator tries the other known coordinators (given, or standbys it was told) before CoordinatorLost"},
    {"COMMLIB_ELASTIC_TEST_HOLD_VERDICT", "0", "elastic, tests only: the coordinator never sends the verdict of its N-th commit (-N: sends it to rank 0 only), so a test can kill it mid-all-reduce"},
    {"COMMLIB_ELASTIC_QUIET", "0", "elastic: 1 silences the coordinator's membership log on stderr"},
    {"COMMLIB_SECRET", "none", "elastic: the shared secret when ElasticComm() is given none (set by elastic-run)"},
};

static int parse_bool(const char *name, const char *v, int fallback)
{
    if (!v || !*v) return fallback;
    if (!strcmp(v, "1") || !strcasecmp(v, "yes") || !strcasecmp(v, "on") || !strcasecmp(v, "true")) return 1;
    if (!strcmp(v, "0") || !strcasecmp(v, "no") || !strcasecmp(v, "off") || !strcasecmp(v, "false")) return 0;
    commlib_log(LOG_WARN, "%s=%s is not a boolean; using %d", name, v, fallback);
    return fallback;
}

/* An integer knob in [lo, hi]; a warning and the fallback otherwise. */
static int int_knob(const char *name, int fallback, long lo, long hi)
{
    const char *v = getenv(name);
    if (!v || !*v) return fallback;
    char *end;
    long x = strtol(v, &end, 10);
    if (*end || x < lo || x > hi) {
        commlib_log(LOG_WARN, "%s=%s invalid (%ld..%ld); using %d", name, v, lo, hi, fallback);
        return fallback;
    }
    return (int)x;
}

/* What the host-pack choices depend on: an AMD CPU, AVX-512F (0 and 0 off x86-64). */
static void cpu_traits(int *amd, int *avx512f)
{
    *amd = *avx512f = 0;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    *amd = __builtin_cpu_is("amd");
    *avx512f = __builtin_cpu_supports("avx512f");
#endif
}

/* The CPU choices set so far (`auto` differs by CPU): what each came to, for `commlib info`. */
#define CPU_CHOICES 32
static struct cpu_choice_set {
    const char *name;
    const int *field;
} cpu_choices[CPU_CHOICES];
static int n_cpu_choices;

/* A CPU-dependent choice, listed for `commlib info` (cpu_choice_effect). */
static void note_choice(const char *name, int *field)
{
    if (n_cpu_choices < CPU_CHOICES) cpu_choices[n_cpu_choices++] = (struct cpu_choice_set){name, field};
}

/* A CPU-dependent choice into *field: "auto" (or unset) takes `automatic`, else the boolean given. */
static void cpu_choice(const char *name, int *field, int automatic)
{
    const char *v = getenv(name);
    *field = v && *v && strcasecmp(v, "auto") ? parse_bool(name, v, automatic) : automatic;
    note_choice(name, field);
}

static void read_knobs(void)
{
    const char *level = getenv("COMMLIB_LOG");
    if (level && *level) {
        static const char *names[] = {"error", "warn", "info", "debug"};
        int found = -1;
        for (int i = 0; i < 4; i++)
            if (!strcasecmp(level, names[i])) found = i;
        if (found < 0 && level[0] >= '0' && level[0] <= '3' && !level[1]) found = level[0] - '0';
        if (found >= 0) commlib_config.log_level = found;
        else commlib_log(LOG_WARN, "COMMLIB_LOG=%s unknown; using warn", level);
    }
    commlib_config.disable = parse_bool("COMMLIB_DISABLE", getenv("COMMLIB_DISABLE"), 0);
    commlib_config.no_pack = parse_bool("COMMLIB_NO_PACK", getenv("COMMLIB_NO_PACK"), 0);
    commlib_config.stats = parse_bool("COMMLIB_STATS", getenv("COMMLIB_STATS"), 0);
    commlib_config.gpu = parse_bool("COMMLIB_GPU", getenv("COMMLIB_GPU"), 1);
    commlib_config.stage_host = parse_bool("COMMLIB_STAGE_HOST", getenv("COMMLIB_STAGE_HOST"), 0);
    commlib_config.ipc = parse_bool("COMMLIB_IPC", getenv("COMMLIB_IPC"), 0);
    commlib_config.pipeline = parse_bool("COMMLIB_PIPELINE", getenv("COMMLIB_PIPELINE"), 0);
    /* 0 (off) or from 192: a descriptor's size (transfer/ipc.h IPC_MIN_BYTES) */
    commlib_config.ipc_direct_bytes = int_knob("COMMLIB_IPC_DIRECT_BYTES", 0, 0, INT_MAX);
    if (commlib_config.ipc_direct_bytes > 0 && commlib_config.ipc_direct_bytes < 192) {
        commlib_log(LOG_WARN, "COMMLIB_IPC_DIRECT_BYTES=%d is under a descriptor's 192 bytes; using 192",
                    commlib_config.ipc_direct_bytes);
        commlib_config.ipc_direct_bytes = 192;
    }
    commlib_config.ipc_small = parse_bool("COMMLIB_IPC_SMALL", getenv("COMMLIB_IPC_SMALL"), 1);
    commlib_config.ipc_burst_us = int_knob("COMMLIB_IPC_BURST_US", 20, 0, 1000000);
    commlib_config.device_pack_async = parse_bool("COMMLIB_DEVICE_PACK_ASYNC", getenv("COMMLIB_DEVICE_PACK_ASYNC"), 0);
    commlib_config.device_pack_hold = parse_bool("COMMLIB_DEVICE_PACK_HOLD", getenv("COMMLIB_DEVICE_PACK_HOLD"), 0);
    if (commlib_config.device_pack_hold) commlib_config.device_pack_async = 1; /* held ops are stream-ordered ones */
    commlib_config.pointer_cache = parse_bool("COMMLIB_POINTER_CACHE", getenv("COMMLIB_POINTER_CACHE"), 1);
    commlib_config.batch_unpack = parse_bool("COMMLIB_BATCH_UNPACK", getenv("COMMLIB_BATCH_UNPACK"), 1);
    commlib_config.early_launch_bytes = int_knob("COMMLIB_EARLY_LAUNCH_BYTES", 1 << 20, 0, INT_MAX);
    const char *progress = getenv("COMMLIB_PROGRESS"), *interval = getenv("COMMLIB_PROGRESS_INTERVAL_US");
    if (progress && !strcasecmp(progress, "thread")) commlib_config.progress = 1;
    else if (progress && *progress && strcasecmp(progress, "none"))
        commlib_log(LOG_WARN, "COMMLIB_PROGRESS=%s unknown (none, thread); using none", progress);
    if (interval && *interval) {
        char *end;
        long v = strtol(interval, &end, 10);
        if (*end || v < 0 || v > 1000000) commlib_log(LOG_WARN, "COMMLIB_PROGRESS_INTERVAL_US=%s invalid; using 0", interval);
        else commlib_config.progress_interval_us = (int)v;
    }
    commlib_config.progress_busy_us = int_knob("COMMLIB_PROGRESS_BUSY_US", 100, 0, 1000000);
    const char *method = getenv("COMMLIB_METHOD"), *aware = getenv("COMMLIB_CUDA_AWARE");
    commlib_config.method = -1;
    if (method && *method && strcasecmp(method, "auto")) {
        static const char *names[] = {"oneshot", "device", "aware"};
        for (int i = 0; i < 3; i++)
            if (!strcasecmp(method, names[i])) commlib_config.method = i;
        if (commlib_config.method < 0) commlib_log(LOG_WARN, "COMMLIB_METHOD=%s unknown (auto, oneshot, device, aware); using auto", method);
    }
    commlib_config.cuda_aware = -1;
    if (aware && *aware && strcasecmp(aware, "auto")) {
        if (!strcmp(aware, "0") || !strcmp(aware, "1")) commlib_config.cuda_aware = aware[0] - '0';
        else commlib_log(LOG_WARN, "COMMLIB_CUDA_AWARE=%s unknown (auto, 0, 1); using auto", aware);
    }
    const char *model = getenv("COMMLIB_MODEL");
    commlib_config.model = model && *model && strcasecmp(model, "auto") ? model : NULL;
    const char *kernels = getenv("COMMLIB_KERNELS");
    if (kernels && *kernels) {
        static const char *routes[] = {"auto", "fatbin", "nvrtc", "none"};
        int found = -1;
        for (int i = 0; i < 4; i++)
            if (!strcasecmp(kernels, routes[i])) found = i;
        if (found < 0) commlib_log(LOG_WARN, "COMMLIB_KERNELS=%s unknown (auto, fatbin, nvrtc, none); using auto", kernels);
        else commlib_config.kernels = found;
    }
    const char *nvrtc = getenv("COMMLIB_NVRTC");
    if (nvrtc && *nvrtc && strcasecmp(nvrtc, "auto")) commlib_config.nvrtc = nvrtc;
    commlib_config.placement = parse_bool("COMMLIB_PLACEMENT", getenv("COMMLIB_PLACEMENT"), 0);
    const char *per_node = getenv("COMMLIB_RANKS_PER_NODE");
    if (per_node && *per_node) {
        char *end;
        long v = strtol(per_node, &end, 10);
        if (*end || v < 0 || v > 1 << 30) commlib_log(LOG_WARN, "COMMLIB_RANKS_PER_NODE=%s invalid; using the real nodes", per_node);
        else commlib_config.ranks_per_node = (int)v;
    }
    const char *transport = getenv("COMMLIB_ENGINE_TRANSPORT");
    if (transport && *transport && strcasecmp(transport, "auto")) {
        if (!strcasecmp(transport, "mpi")) commlib_config.engine_transport_mpi = 1;
        else commlib_log(LOG_WARN, "COMMLIB_ENGINE_TRANSPORT=%s unknown (auto, mpi); using auto", transport);
    }
    commlib_config.engine_thread = parse_bool("COMMLIB_ENGINE_THREAD", getenv("COMMLIB_ENGINE_THREAD"), 1);
    commlib_config.engine_check = parse_bool("COMMLIB_ENGINE_CHECK", getenv("COMMLIB_ENGINE_CHECK"), 1);
    commlib_config.engine_iallreduce = parse_bool("COMMLIB_ENGINE_IALLREDUCE", getenv("COMMLIB_ENGINE_IALLREDUCE"), 1);
    commlib_config.engine_slice_kb = int_knob("COMMLIB_ENGINE_SLICE_KB", 64, 4, 1 << 20);
    commlib_config.engine_depth = int_knob("COMMLIB_ENGINE_DEPTH", 4, 1, 64);
    commlib_config.engine_chunk_kb = int_knob("COMMLIB_ENGINE_CHUNK_KB", 128, 1, 1 << 20);
    commlib_config.engine_small_kb = int_knob("COMMLIB_ENGINE_SMALL_KB", 64, 0, 1 << 20);
    int amd, avx512f;
    cpu_traits(&amd, &avx512f);
    /* Tail first: measured faster on AMD's Zen 4 and Zen 5, slower on Zen 3 (stop 46: the y faces
     * against Open MPI 1.04-1.05x with it off, 0.99-1.01x on); AVX-512 tells Zen 4 and later apart. */
    cpu_choice("COMMLIB_TAIL_FIRST", &commlib_config.tail_first, amd && avx512f);
    cpu_choice("COMMLIB_AVX512", &commlib_config.avx512, amd && avx512f);
    commlib_config.avx512 &= avx512f; /* never where the CPU lacks it */
    cpu_choice("COMMLIB_ROW_PROBE", &commlib_config.row_probe, amd);
    cpu_choice("COMMLIB_UNPACK_PREFETCH", &commlib_config.unpack_prefetch, !amd);
    cpu_choice("COMMLIB_GAP_MEMCPY", &commlib_config.gap_memcpy, 1); /* Zen 3, then Emerald Rapids (stop 50) */
#if defined(__x86_64__)
    const int avx2 = __builtin_cpu_supports("avx2");
#else
    const int avx2 = 0;
#endif
    cpu_choice("COMMLIB_LOADS_FIRST", &commlib_config.loads_first, avx2); /* Emerald Rapids and Zen 3 measured (stop 50) */
    /* one a step with a prefetch for tiny blocks a multiple of 1 KiB apart: AMD's Zen 3 (stop 35) and,
     * from stop 53, Intel's too - the dev VM's Xeon (Sapphire Rapids class) packed face_z_t1 (8-byte
     * blocks every 2 KiB) in 616-665 us so, 771-825 us 16 a step (both MPIs, 5 processes each, three
     * A/Bs over 80 minutes); Emerald Rapids not measured.  Off elsewhere (not measured) */
#if defined(__x86_64__)
    cpu_choice("COMMLIB_ALIASED_ROWS", &commlib_config.aliased_rows, 1);
#else
    cpu_choice("COMMLIB_ALIASED_ROWS", &commlib_config.aliased_rows, 0);
#endif
    /* memcpy calls for 12-24-byte blocks a multiple of 1 KiB apart: on for Intel until stop 51, where the
     * GPU host's Emerald Rapids packed them 1.3-1.5x faster without (face_z_t2/t3, both MPIs, 3 runs) */
    cpu_choice("COMMLIB_ALIASED_CALLS", &commlib_config.aliased_calls, 0);
#if defined(__x86_64__)
    const int intel = !amd; /* the choices below measured faster on Intel's Xeons; on AMD's Zen 3
                               within noise or slower (stop 46, README's knobs table) */
#else
    const int intel = 0;
#endif
    cpu_choice("COMMLIB_WIDE_ROWS", &commlib_config.wide_rows, intel);
    cpu_choice("COMMLIB_UNPACK_MEMCPY", &commlib_config.unpack_memcpy, intel);
    cpu_choice("COMMLIB_LONG_ROWS", &commlib_config.long_rows, intel);
    cpu_choice("COMMLIB_ALIGNED_ROWS", &commlib_config.aligned_rows, intel);
    cpu_choice("COMMLIB_ALIGNED_STREAM", &commlib_config.aligned_stream, intel); /* stop 52: Emerald Rapids */
    /* (AMD unpacks 8-16-byte blocks without the prefetch; its 24-byte ones with or without the probe
     * within noise on Zen 3, stop 49: 1.42-1.46x MPICH's either way) */
    /* The probe: 24-byte blocks only where `auto` (or "24") turns it on - the 8-16-byte ones unpacked
     * warm went at 1.08-1.34x MPICH's prefetched and 0.96-1.00x probed on the GPU host's Emerald
     * Rapids (stop 50); 1 probes them too. */
    const char *probe = getenv("COMMLIB_UNPACK_PROBE");
    const int only_24 = probe && !strcmp(probe, "24");
    if (only_24) {
        commlib_config.unpack_probe = 1;
        note_choice("COMMLIB_UNPACK_PROBE", &commlib_config.unpack_probe);
    } else {
        cpu_choice("COMMLIB_UNPACK_PROBE", &commlib_config.unpack_probe, intel);
    }
    commlib_config.unpack_probe_small = commlib_config.unpack_probe && !only_24 && probe && *probe &&
                                        strcasecmp(probe, "auto");
    /* memcpy per row for a y face's 2-3 rows a plane: faster on the dev VM's Xeon, slower than the
     * streaming loop on the GPU host's Sapphire Rapids (stop 48: 1.34-1.40x MPICH's cold without
     * it, 0.95-1.11x with it), slower on Zen 3 too (1.18x against 1.21x Open MPI's) */
    cpu_choice("COMMLIB_FEW_ROWS", &commlib_config.few_rows, 0);
#if defined(__x86_64__)
    cpu_choice("COMMLIB_NEXT_GROUP", &commlib_config.next_group, 1); /* Intel's Xeon and AMD's Zen 3 measured */
#else
    cpu_choice("COMMLIB_NEXT_GROUP", &commlib_config.next_group, 0);
#endif
    cpu_choice("COMMLIB_PAGE_BLOCKS", &commlib_config.page_blocks, !amd);
#if defined(__x86_64__)
    cpu_choice("COMMLIB_ROW_RACE", &commlib_config.row_race, 1);
#else
    cpu_choice("COMMLIB_ROW_RACE", &commlib_config.row_race, 0);
#endif
    const char *pieces = getenv("COMMLIB_MAX_PIECES");
    if (pieces && *pieces) {
        char *end;
        long v = strtol(pieces, &end, 10);
        if (*end || v < 1 || v > 1 << 20) commlib_log(LOG_WARN, "COMMLIB_MAX_PIECES=%s invalid; using 64", pieces);
        else commlib_config.max_pieces = (int)v;
    }
}

static pthread_once_t once = PTHREAD_ONCE_INIT;
int commlib_config_ready;

static void read_knobs_once(void)
{
    read_knobs();
    __atomic_store_n(&commlib_config_ready, 1, __ATOMIC_RELEASE);
}

void commlib_config_init_slow(void) { pthread_once(&once, read_knobs_once); }

static const int *cpu_choice_effect(const char *name)
{
    for (int i = 0; i < n_cpu_choices; i++)
        if (!strcmp(cpu_choices[i].name, name)) return cpu_choices[i].field;
    return NULL;
}

size_t commlib_config_knobs_json(char *buf, size_t len)
{
    commlib_config_init();
    size_t used = 0;
    used += (size_t)snprintf(buf, len, "[");
    for (size_t i = 0; i < sizeof knobs / sizeof knobs[0]; i++) {
        const char *value = getenv(knobs[i].name);
        used += (size_t)snprintf(buf + (used < len ? used : len), used < len ? len - used : 0,
                                 "%s{\"name\":\"%s\",\"default\":\"%s\",\"value\":\"%s\",\"meaning\":\"%s\"",
                                 i ? "," : "", knobs[i].name, knobs[i].default_value,
                                 value ? value : knobs[i].default_value, knobs[i].meaning);
        const int *effect = cpu_choice_effect(knobs[i].name);
        if (effect) /* a CPU choice: what it came to on this machine */
            used += (size_t)snprintf(buf + (used < len ? used : len), used < len ? len - used : 0,
                                     ",\"in_effect\":%d", *effect ? 1 : 0);
        used += (size_t)snprintf(buf + (used < len ? used : len), used < len ? len - used : 0, "}");
    }
    used += (size_t)snprintf(buf + (used < len ? used : len), used < len ? len - used : 0, "]");
    return used;
}
